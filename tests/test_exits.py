"""Issue 13, class 7: every way out ends in one clear line and a known exit status, never a traceback:
a closed pipe (`| head`), Ctrl-C during training (with the exact command that continues), evaluate without gold
answers."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from functools import partial

import pytest
from conftest import REPO, stop_at, train_args, train_in_process

from optqa.cli import BROKEN_PIPE_STATUS, main
from optqa.run import training as trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def closed_pipe_run(*args: str) -> subprocess.CompletedProcess:
    """``python -m optqa ARGS | head`` where head has already gone: stdout's reader is closed before the command
    starts: closing it after the start would race the command's first write."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run([sys.executable, "-m", "optqa", *args], stdout=writer, stderr=subprocess.PIPE, cwd=REPO,
                              env=env, text=True, timeout=120, check=False)
    finally:
        os.close(writer)


@pytest.fixture(scope="module")
def checkpoint(tiny_opt, memory_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("exits")
    train_in_process(tiny_opt, memory_data, out, "--train_epochs", "1", "--precision", "fp32", "--max_new_tokens", "2")
    return out / "delta_ckpts"


def test_a_closed_pipe_ends_quietly_with_status_141(checkpoint):
    done = closed_pipe_run("--mode", "inspect", "--delta_save_path", str(checkpoint))
    assert (done.returncode, done.stderr) == (BROKEN_PIPE_STATUS, "")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_stdout_that_refuses_writes_is_one_line(checkpoint):
    # `> /dev/full`: every write fails with ENOSPC, as on a full disk
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "optqa", "--mode", "inspect", "--delta_save_path", str(checkpoint)],
                              stdout=full, stderr=subprocess.PIPE, cwd=REPO, text=True, timeout=120, check=False,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (done.returncode, done.stderr) == (2, "error: could not write to standard output: No space left on device\n")


def test_a_closed_stdout_is_one_line(checkpoint):
    # `>&-`: the program starts without a stdout at all
    done = subprocess.run([sys.executable, "-m", "optqa", "--mode", "inspect", "--delta_save_path", str(checkpoint)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, text=True, timeout=120,
                          check=False, env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=lambda: os.close(1))
    assert (done.returncode, done.stderr) == (2, "error: standard output is closed: nothing could be shown; redirect "
                                                 f"it to a file or to {os.devnull} instead\n")


def test_help_into_a_closed_pipe_ends_quietly():
    # argparse drops what a closed pipe refuses, and the help was asked for: status 0, no traceback
    done = closed_pipe_run("--help")
    assert (done.returncode, done.stderr) == (0, "")


def test_help_whose_closed_pipe_argparse_lets_through_ends_with_0(monkeypatch):
    # Python 3.11.2's argparse raises the closed pipe's BrokenPipeError from print_help (3.11.7's drops it): the
    # same status 0 either way, where CI's Python is the older one
    def closed(self, file=None):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", closed)
    assert main(["--help"]) == 0
    assert main(["--mode", "no_such_mode"]) == 2  # a usage error still ends with argparse's 2


def press_ctrl_c_after_step(monkeypatch, step: int) -> None:
    """The CLI's training run, with Ctrl-C pressed right after optimiser step ``step`` (the recipe's hook)."""
    monkeypatch.setattr(trainer, "train", partial(trainer.train, on_step=stop_at(step)))


def test_ctrl_c_during_training_prints_the_command_that_continues(tiny_opt, memory_data, tmp_path, monkeypatch,
                                                                   capsys, caplog):
    argv = train_args(tiny_opt, memory_data, tmp_path, "--train_epochs", "2", "--batch_size", "2", "--save_steps", "1",
                      "--precision", "fp32", "--max_new_tokens", "2")
    press_ctrl_c_after_step(monkeypatch, 2)  # after the resume state of step 2 was saved (--save_steps 1)
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("interrupted; continue from the last saved state with: python -m optqa "
                                    + shlex.join([*argv, "--resume"]))
    assert "Traceback" not in err
    # the printed command continues the run to its end
    monkeypatch.undo()
    caplog.set_level(logging.INFO)
    command = shlex.split(err.splitlines()[-1].split(" with: ", 1)[1])
    assert command[:3] == ["python", "-m", "optqa"]
    assert main(command[3:]) == 0
    assert "resuming at epoch 1, batch 2 (optimiser step 2)" in caplog.text
    assert "best epoch" in capsys.readouterr().out


def test_ctrl_c_before_any_saved_state_says_to_start_again(tiny_opt, memory_data, tmp_path, monkeypatch, capsys):
    argv = train_args(tiny_opt, memory_data, tmp_path, "--precision", "fp32")
    press_ctrl_c_after_step(monkeypatch, 1)
    capsys.readouterr()
    assert main(argv) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted before any resume state was saved in {tmp_path / 'raw_delta_ckpts' / 'resume'}; start again "
        "with the same command (state is saved every --save_steps 50 steps and at each epoch end)")


def test_ctrl_c_in_other_modes_says_interrupted(monkeypatch, capsys):
    from optqa import cli

    def press_ctrl_c(config):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.MODE_RUNNERS, "download", press_ctrl_c)
    assert main(["--mode", "download"]) == 130
    assert capsys.readouterr().err.splitlines() == ["interrupted"]


@pytest.mark.parametrize("extra, what", [(["--predictions_file", "predictions_test.jsonl"], "--predictions_file"),
                                         ([], "the model's answers")], ids=["file", "model"])
def test_evaluate_without_gold_answers_names_what_is_missing(tmp_path, monkeypatch, capsys, extra, what):
    monkeypatch.chdir(tmp_path)  # no ./data/ARC-DA-v1.1 here
    capsys.readouterr()
    assert main(["--mode", "evaluate", *extra]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --mode evaluate scores {what} against the gold answers of --split test, and "
        "data/ARC-DA-v1.1/test.jsonl does not exist; name them with --test_file FILE (any jsonl with 'question_id', "
        "'question' and 'answers') or --data_path FOLDER holding test.jsonl"]


NO_DELTA_YET = ("error: no delta in ./delta_ckpts/ yet (the default --delta_save_path): train one first (python -m "
                "optqa --mode train --plm_path facebook/opt-125m), or run the offline demo (python -m optqa --mode "
                "demo) and pass the --delta_save_path it prints; or name a checkpoint with --delta_save_path (a "
                "folder, a .optqa bundle or hf://OWNER/NAME)")


def test_a_fresh_clone_asked_a_question_says_to_train_or_run_the_demo_first(tmp_path):
    """Issue 29: `echo q | python -m optqa --mode interactive_inference` in a fresh clone, whose delta_ckpts/ holds
    only its README."""
    (tmp_path / "delta_ckpts").mkdir()
    shutil.copy(REPO / "delta_ckpts" / "README.md", tmp_path / "delta_ckpts")
    done = subprocess.run([sys.executable, "-m", "optqa", "--mode", "interactive_inference"], input="What is ice?\n",
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (done.returncode, done.stdout, done.stderr) == (2, "", NO_DELTA_YET + "\n")


@pytest.mark.parametrize("mode", ["interactive_inference", "evaluate", "inspect", "export", "serve", "push"])
@pytest.mark.parametrize("holds", [None, [], [".gitkeep"], ["README.md", ".gitkeep"]],
                         ids=["no folder", "empty", "gitkeep", "readme"])
def test_every_mode_reading_the_default_checkpoint_says_how_to_get_one(tmp_path, monkeypatch, capsys, mode, holds):
    monkeypatch.chdir(tmp_path)
    if holds is not None:
        (tmp_path / "delta_ckpts").mkdir()
        for name in holds:
            (tmp_path / "delta_ckpts" / name).write_text("placeholder\n", encoding="utf-8")
    if mode == "evaluate":  # the gold answers are read first
        (tmp_path / "data" / "ARC-DA-v1.1").mkdir(parents=True)
        (tmp_path / "data" / "ARC-DA-v1.1" / "test.jsonl").write_text(
            '{"question_id": "q1", "question": "What is ice?", "answers": ["frozen water"]}\n', encoding="utf-8")
    extra = ["--hub_repo", "someone/delta", "--dry_run"] if mode == "push" else []
    assert main(["--mode", mode, *extra]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == NO_DELTA_YET


def test_a_typed_or_occupied_checkpoint_folder_gets_the_loaders_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "delta_ckpts").mkdir()
    (tmp_path / "delta_ckpts" / "README.md").write_text("placeholder\n", encoding="utf-8")
    # typed: the user named this folder, so the loader's own reason is the answer
    assert main(["--mode", "inspect", "--delta_save_path", "delta_ckpts"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: delta_ckpts is not an optqa checkpoint: optqa_manifest.json is missing")
    # something else is in the default folder (a half-copied checkpoint): the loader says what is wrong with it
    (tmp_path / "delta_ckpts" / "delta_model.safetensors").write_bytes(b"")
    assert main(["--mode", "inspect"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: delta_ckpts is not an optqa checkpoint: optqa_manifest.json is missing")


def test_ctrl_c_at_the_question_prompt_is_status_130(checkpoint):
    """Issue 29: SIGINT (Ctrl-C) while the question loop waits for a question ends it as "Ways out" says: one
    `interrupted` line, status 130, the answers given so far kept."""
    # SIGINT as a terminal leaves it: a job a shell started in the background (CI run with `&`) inherits it ignored,
    # and Python then keeps ignoring it, as nohup means
    process = subprocess.Popen([sys.executable, "-m", "optqa", "--mode", "interactive_inference", "--delta_save_path",
                                str(checkpoint)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        process.stdin.write("What is frozen water called?\n")
        process.stdin.flush()
        lines = [process.stdout.readline() for _ in range(3)]  # prompt, answer, the prompt waiting for the next
        assert [lines[0], lines[2]] == ["Input a question:\n"] * 2 and lines[1].startswith("Answer: "), lines
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert (process.returncode, out) == (130, "\n")  # the shell's prompt comes back on a fresh line
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err
