"""--resume: a run stopped part-way and resumed ends exactly where an uninterrupted run with the same seed ends
(delta weights, per-step and per-epoch losses), and a resume with other settings is refused.

The run is stopped by the recipe's ``on_step`` hook raising KeyboardInterrupt (what Ctrl-C raises) after an
exact optimiser step, in this process: no timing, no killed process. Killing a process in the middle of writing
a checkpoint is test_checkpoint.py's concern (atomic files)."""
from __future__ import annotations

import json
import logging
import logging.handlers
from pathlib import Path

import pytest
from conftest import REPO, stop_at, train_args, train_in_process

from optqa.checkpoints.format import RESUME_DIR_NAME, WEIGHTS_NAME
from optqa.cli import main

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
