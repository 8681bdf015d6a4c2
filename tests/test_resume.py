"""--resume: a run stopped part-way and resumed ends exactly where an uninterrupted run with the same seed ends
(delta weights, per-step and per-epoch losses), and a resume with other settings is refused.

The run is stopped by the recipe's ``on_step`` hook raising KeyboardInterrupt (what Ctrl-C raises) after an
exact optimiser step, in this process: no timing, no killed process. Killing a process in the middle of writing
a checkpoint is test_checkpoint.py's concern (atomic files)."""
from __future__ import annotations

import errno
import json
import logging
import logging.handlers
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, stop_at, train_args, train_in_process

from optqa.checkpoints import format as ckpt
from optqa.checkpoints.format import RESUME_DIR_NAME, RESUME_STATE_NAME, WEIGHTS_NAME
from optqa.cli import main
from optqa.run import training

# batch 1 on the 8 memory questions: 8 steps an epoch, 24 in all. LoRA dropout makes every step draw from the
# torch RNG, and length grouping gives every epoch its own batch order: both must be restored on resume.
SETTINGS = ("--delta_type", "lora", "--lora_dropout", "0.1", "--batch_size", "1", "--train_epochs", "3",
            "--lr", "2e-2", "--save_steps", "5", "--max_new_tokens", "4", "--precision", "fp32",
            "--template", str(REPO / "templates" / "answer_template.txt"))
# stopped after step 11 (early in the second epoch, steps 9-16), one step past the last saved state (step 10):
# the resumed run must redo step 11 from the saved RNGs and optimiser, not from the stopped run's memory
STOP_AFTER_STEP, LAST_SAVED_STEP = 11, 10


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run_folder(out: Path) -> Path:
    (folder,) = (out / "runs").iterdir()  # a resumed run continues its run folder
    return folder


def _weights(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "delta_ckpts" / WEIGHTS_NAME))


@pytest.fixture(scope="module")
def runs(one_torch_thread, tiny_opt, memory_data, tmp_path_factory) -> dict:
    """An uninterrupted run, and the same run stopped after step STOP_AFTER_STEP then resumed."""
    whole, stopped = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("stopped")
    train_in_process(tiny_opt, memory_data, whole, *SETTINGS)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(tiny_opt, memory_data, stopped, *SETTINGS, on_step=stop_at(STOP_AFTER_STEP))
    at_stop = {"steps": [row["step"] for row in _rows(_run_folder(stopped) / "train_loss.jsonl")],
               "final checkpoint": (stopped / "delta_ckpts").exists()}
    # the resumed run's log lines, as the CLI would show them
    logger, records = logging.getLogger("optqa"), logging.handlers.BufferingHandler(capacity=10_000)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    try:
        train_in_process(tiny_opt, memory_data, stopped, *SETTINGS, "--resume")
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    return {"whole": whole, "stopped": stopped, "at stop": at_stop,
            "log": [record.getMessage() for record in records.buffer]}


def test_stopped_run_resumes_mid_epoch_from_its_last_saved_step(runs):
    # the stopped run logged its steps up to the last save; step 11 is lost with the process's memory
    assert runs["at stop"] == {"steps": list(range(1, LAST_SAVED_STEP + 1)), "final checkpoint": False}
    assert "integrity check passed" in " ".join(runs["log"])
    assert f"resuming at epoch 2, batch 2 (optimiser step {LAST_SAVED_STEP})" in runs["log"]


def test_resumed_run_matches_the_uninterrupted_one(runs):
    whole, resumed = _run_folder(runs["whole"]), _run_folder(runs["stopped"])
    steps = _rows(whole / "train_loss.jsonl")
    assert [row["step"] for row in steps] == list(range(1, 25))
    assert _rows(resumed / "train_loss.jsonl") == steps  # every step's loss, to the logged 6 decimals
    epochs = [row for row in _rows(whole / "metrics.jsonl") if "epoch" in row]
    assert len(epochs) == 3 and [row for row in _rows(resumed / "metrics.jsonl") if "epoch" in row] == epochs
    a, b = _weights(runs["whole"]), _weights(runs["stopped"])
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit for bit


def _cli_errors(capsys, argv: list[str]) -> tuple[int, list[str]]:
    """``python -m optqa ARGV`` in this process: the exit status and the error lines."""
    capsys.readouterr()
    status = main(argv)
    return status, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_resume_with_other_settings_is_refused(runs, tiny_opt, memory_data, capsys):
    argv = train_args(tiny_opt, memory_data, runs["stopped"], *SETTINGS, "--resume", "--lr", "3e-2")
    assert _cli_errors(capsys, argv) == (2, [
        "error: --resume: lr was 0.02 in the interrupted run, now 0.03; resume with the same settings"])


def test_resume_without_a_saved_run_is_refused(one_torch_thread, tiny_opt, memory_data, tmp_path, capsys):
    argv = train_args(tiny_opt, memory_data, tmp_path, *SETTINGS, "--resume")
    assert _cli_errors(capsys, argv) == (2, [
        f"error: --resume: no interrupted run to continue in {tmp_path / 'raw_delta_ckpts' / RESUME_DIR_NAME} "
        "(check --raw_delta_save_path)"])


def test_bf16_run_stopped_at_an_epochs_end_resumes(one_torch_thread, tiny_opt, memory_data, tmp_path):
    # 4 steps an epoch and a resume state every 4: stopped right after the save at epoch 1's last step, the resumed
    # run starts by scoring dev (inside inference_mode) before its first training step. The bf16 path casts the
    # frozen weights on their first use, then in inference mode: those tensors could not be saved for backward.
    # --precision bf16 takes that path on any CPU (native bf16 or not).
    settings = ("--delta_type", "lora", "--batch_size", "2", "--train_epochs", "2", "--save_steps", "4",
                "--precision", "bf16", "--max_new_tokens", "2")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train_in_process(tiny_opt, memory_data, whole, *settings)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(tiny_opt, memory_data, stopped, *settings, on_step=stop_at(4))
    assert [row["step"] for row in _rows(_run_folder(stopped) / "train_loss.jsonl")] == [1, 2, 3, 4]
    assert not (_run_folder(stopped) / "metrics.jsonl").exists()  # stopped before epoch 1's dev scores
    train_in_process(tiny_opt, memory_data, stopped, *settings, "--resume")
    assert _rows(_run_folder(stopped) / "train_loss.jsonl") == _rows(_run_folder(whole) / "train_loss.jsonl")
    assert _rows(_run_folder(stopped) / "metrics.jsonl")[:2] == _rows(_run_folder(whole) / "metrics.jsonl")[:2]
    a, b = _weights(whole), _weights(stopped)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# 4 steps an epoch, a resume state after every step: a run stopped in its first epoch has one to continue from
QUICK = ("--delta_type", "lora", "--batch_size", "2", "--train_epochs", "1", "--save_steps", "1",
         "--precision", "fp32", "--max_new_tokens", "2")


def _saved_step(resume: Path) -> int:
    folder, _, _ = ckpt.read_checkpoint(resume)  # complete and hash-checked
    return torch.load(folder / RESUME_STATE_NAME, weights_only=True)["train_state"]["global_step"]


def _stopped_writing(capsys, argv: list[str], what: str, path: Path, reason: str, resume: Path, step: int) -> str:
    """``python -m optqa ARGV`` stops with status 2 and one line: ``what`` could not be written to ``path`` for
    ``reason``, the resume state of ``step`` is intact, and the command that continues; returns the line."""
    status, errors = _cli_errors(capsys, argv)
    assert (status, errors) == (2, [
        f"error: could not write {what} ({path}): {reason}; the last complete resume state (optimiser step {step}) "
        f"in {resume} is intact; continue from the last saved state with: python -m optqa "
        f"{shlex.join([*argv, '--resume'])}"])
    return errors[0]


def _continues(capsys, caplog, error: str, step: int) -> None:
    """The command at the end of ``error`` continues the run from ``step`` to its end."""
    command = shlex.split(error.split(" with: ", 1)[1])
    assert command[:3] == ["python", "-m", "optqa"] and command[-1] == "--resume"
    caplog.set_level(logging.INFO)
    assert main(command[3:]) == 0
    assert f"resuming at epoch 1, batch {step} (optimiser step {step})" in caplog.text
    assert "best epoch" in capsys.readouterr().out


@pytest.mark.parametrize("failure, reason", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device (errno 28)"),
    # torch.save's own report of a full disk, which names no reason
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3648 vs 3538"),
     "torch.save could not write its file (it gives no reason; is the disk full?)")],
    ids=["oserror", "torch"])
def test_a_full_disk_while_saving_the_resume_state_says_how_to_continue(one_torch_thread, tiny_opt, memory_data,
                                                                         tmp_path, monkeypatch, capsys, caplog,
                                                                         failure, reason):
    write, calls = training._write_training_state, []

    def full_disk(folder, **kwargs):  # the second save finds the disk full, half-way through its file
        calls.append(folder)
        if len(calls) == 2:
            (folder / RESUME_STATE_NAME).write_bytes(b"PK\x03\x04 cut short")
            raise failure
        write(folder, **kwargs)

    monkeypatch.setattr(training, "_write_training_state", full_disk)
    resume = tmp_path / "raw_delta_ckpts" / RESUME_DIR_NAME
    error = _stopped_writing(capsys, train_args(tiny_opt, memory_data, tmp_path, *QUICK), "the resume state", resume,
                             reason, resume, step=1)
    assert _saved_step(resume) == 1  # the state before, whole; the half-written one is gone
    assert sorted(p.name for p in resume.parent.iterdir()) == [RESUME_DIR_NAME]
    monkeypatch.undo()
    _continues(capsys, caplog, error, step=1)


def test_a_full_disk_at_the_first_save_says_to_start_again(one_torch_thread, tiny_opt, memory_data, tmp_path,
                                                            monkeypatch, capsys):
    def full_disk(folder, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(training, "_write_training_state", full_disk)
    status, errors = _cli_errors(capsys, train_args(tiny_opt, memory_data, tmp_path, *QUICK))
    resume = tmp_path / "raw_delta_ckpts" / RESUME_DIR_NAME
    assert (status, errors) == (2, [f"error: could not write the resume state ({resume}): No space left on device "
                                    "(errno 28); "
                                    "no resume state was saved yet; start again with the same command"])
    assert list(resume.parent.iterdir()) == []


def test_a_full_disk_at_the_final_save_keeps_the_resume_state(one_torch_thread, tiny_opt, memory_data, tmp_path,
                                                              monkeypatch, capsys, caplog):
    from safetensors import SafetensorError

    save, final = ckpt.save_checkpoint, tmp_path / "delta_ckpts"

    def full_disk(folder, *args, **kwargs):
        if Path(folder) == final:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save(folder, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk)
    error = _stopped_writing(capsys, train_args(tiny_opt, memory_data, tmp_path, *QUICK), "the final checkpoint",
                             final, "No space left on device (errno 28)",
                             tmp_path / "raw_delta_ckpts" / RESUME_DIR_NAME, step=4)
    assert not final.exists()
    monkeypatch.undo()
    caplog.set_level(logging.INFO)
    command = shlex.split(error.split(" with: ", 1)[1])
    assert main(command[3:]) == 0
    assert "already finished its 1 epochs; scoring and saving its best delta" in caplog.text
    assert (final / WEIGHTS_NAME).is_file()


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode(errors='replace').strip()}")


def test_a_really_full_disk_while_saving_the_resume_state(one_torch_thread, tiny_opt, memory_data, tmp_path, capsys,
                                                          caplog):
    # a 320 KiB file system holds one resume state (~200 KB) but not a second beside it while it is written
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "320k")
    try:
        argv = [*train_args(tiny_opt, memory_data, tmp_path, *QUICK), "--raw_delta_save_path", str(disk / "raw")]
        status, errors = _cli_errors(capsys, argv)
        resume = disk / "raw" / RESUME_DIR_NAME
        assert status == 2 and len(errors) == 1
        assert errors[0].startswith(f"error: could not write the resume state ({resume}): torch.save could not "
                                    "write its file (it gives no reason; is the disk full?)")
        assert errors[0].endswith(f"; the last complete resume state (optimiser step 1) in {resume} is intact; "
                                  f"continue from the last saved state with: python -m optqa "
                                  f"{shlex.join([*argv, '--resume'])}")
        assert _saved_step(resume) == 1
        assert sorted(p.name for p in resume.parent.iterdir()) == [RESUME_DIR_NAME]
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # space freed
        _continues(capsys, caplog, errors[0], step=1)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


class _RunsCode:
    """Pickled as a call of os.mkdir: loading it without weights_only would create the folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("kind", ["code", "truncated", "other_shape"])
def test_a_forged_or_damaged_training_state_is_refused(one_torch_thread, tiny_opt, memory_data, tmp_path, capsys,
                                                       kind):
    with pytest.raises(KeyboardInterrupt):
        train_in_process(tiny_opt, memory_data, tmp_path, *QUICK, on_step=stop_at(1))
    resume, marker = tmp_path / "raw_delta_ckpts" / RESUME_DIR_NAME, tmp_path / "code-ran"
    state = resume / RESUME_STATE_NAME
    good = state.read_bytes()

    def forge(folder: Path) -> None:
        if kind == "code":
            torch.save({"train_state": {}, "optimizer": _RunsCode(marker)}, folder / RESUME_STATE_NAME)
        elif kind == "truncated":
            (folder / RESUME_STATE_NAME).write_bytes(good[:len(good) // 2])
        else:
            torch.save({"optimizer": {}}, folder / RESUME_STATE_NAME)

    # a consistent forgery: the manifest lists the new file's hash, as optqa's own writer computes it
    _, manifest, delta = ckpt.read_checkpoint(resume)
    ckpt.save_checkpoint(resume, delta, manifest, forge)
    forged = state.read_bytes()
    expected = {
        "code": f"error: --resume: {state}: refused, the pickle holds code or objects other than tensors "
                "(posix.mkdir); it was not executed",
        # torch's own words for a cut-off file vary with its version: the reason in brackets is its
        "truncated": f"error: --resume: {state}: not a readable torch checkpoint (",
        "other_shape": f"error: --resume: {state} is not a resume state of this optqa (train_state is missing or of "
                       "another type): refused"}[kind]
    argv = train_args(tiny_opt, memory_data, tmp_path, *QUICK, "--resume")
    status, errors = _cli_errors(capsys, argv)
    assert status == 2 and len(errors) == 1 and errors[0].startswith(expected)
    assert errors[0] == expected or kind == "truncated"
    assert not marker.exists() and state.read_bytes() == forged  # nothing ran, nothing was rewritten
