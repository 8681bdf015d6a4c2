"""--resume: a run killed part-way and resumed ends exactly where an uninterrupted run with the same seed ends
(delta weights, per-step and per-epoch losses), and a resume with other settings is refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli, train_args

from optqa.checkpoints.format import RESUME_DIR_NAME, WEIGHTS_NAME

# batch 1 on the 8 memory questions: 8 steps an epoch, 24 in all. LoRA dropout makes every step draw from the
# torch RNG, and length grouping gives every epoch its own batch order: both must be restored on resume.
SETTINGS = ("--delta_type", "lora", "--lora_dropout", "0.1", "--batch_size", "1", "--train_epochs", "3",
            "--lr", "2e-2", "--save_steps", "1", "--max_new_tokens", "4", "--precision", "fp32",
            "--template", str(REPO / "templates" / "answer_template.txt"))
KILL_AFTER_STEP = 10  # early in the second epoch (steps 9-16)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run_folder(out: Path) -> Path:
    (folder,) = (out / "runs").iterdir()  # a resumed run continues its run folder
    return folder


def _weights(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "delta_ckpts" / WEIGHTS_NAME))


def _start(args: list[str], out: Path) -> subprocess.Popen:
    # output to a file: a pipe nobody reads would fill up with progress bars and stall the run
    with (out / "stderr.txt").open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "optqa", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=log, env={**os.environ, "PYTHONPATH": str(REPO)})


def _train_until_killed(args: list[str], out: Path) -> subprocess.Popen:
    """Start a training run and kill it (SIGKILL / TerminateProcess) once step KILL_AFTER_STEP was logged."""
    process = _start(args, out)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        steps = list((out / "runs").glob("*/train_loss.jsonl"))
        if steps and len(steps[0].read_text(encoding="utf-8").splitlines()) >= KILL_AFTER_STEP:
            break
        time.sleep(0.01)
    process.kill()
    process.wait()
    return process


@pytest.fixture(scope="module")
def runs(tiny_opt, memory_data, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted run, and the same run killed mid-epoch then resumed (the two started side by side)."""
    whole, killed = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("killed")
    reference = _start(train_args(tiny_opt, memory_data, whole, *SETTINGS), whole)
    process = _train_until_killed(train_args(tiny_opt, memory_data, killed, *SETTINGS), killed)
    assert process.returncode != 0, "the run finished before it could be killed"
    assert not (killed / "delta_ckpts").exists()
    assert reference.wait(timeout=600) == 0, (whole / "stderr.txt").read_text(errors="replace")[-2000:]
    resumed = run_cli(*train_args(tiny_opt, memory_data, killed, *SETTINGS, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return {"whole": whole, "killed": killed, "log": resumed.stderr}


def test_killed_run_resumes_mid_epoch(runs):
    assert "integrity check passed" in runs["log"]
    line = next(line for line in runs["log"].splitlines() if line.startswith("resuming at epoch"))
    epoch, batch = (int(word.strip(",")) for word in line.split()[3:6:2])
    assert epoch == 2 and 0 < batch < 8, line


def test_resumed_run_matches_the_uninterrupted_one(runs):
    whole, resumed = _run_folder(runs["whole"]), _run_folder(runs["killed"])
    steps = _rows(whole / "train_loss.jsonl")
    assert [row["step"] for row in steps] == list(range(1, 25))
    assert _rows(resumed / "train_loss.jsonl") == steps  # every step's loss, to the logged 6 decimals
    epochs = [row for row in _rows(whole / "metrics.jsonl") if "epoch" in row]
    assert len(epochs) == 3 and [row for row in _rows(resumed / "metrics.jsonl") if "epoch" in row] == epochs
    a, b = _weights(runs["whole"]), _weights(runs["killed"])
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit for bit


def test_resume_with_other_settings_is_refused(runs, tiny_opt, memory_data):
    args = train_args(tiny_opt, memory_data, runs["killed"], *SETTINGS, "--resume", "--lr", "3e-2")
    result = run_cli(*args)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: --resume: lr was 0.02 in the interrupted run, now 0.03; resume with the same settings"]


def test_resume_without_a_saved_run_is_refused(tiny_opt, memory_data, tmp_path):
    result = run_cli(*train_args(tiny_opt, memory_data, tmp_path, *SETTINGS, "--resume"))
    assert result.returncode == 2
    assert f"error: --resume: no interrupted run to continue in {tmp_path / 'raw_delta_ckpts' / RESUME_DIR_NAME}" \
        in result.stderr
