"""Several processes train like one; precision, gradient accumulation and checkpointing keep the maths exact."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import MEMORY_SET, REPO, train_args, train_in_process
from optqa import checkpoint as ckpt
from optqa.errors import OptqaError

# fp32: the runs compared below differ only in summation order, so their deltas agree to ~1e-5
EXACT = ("--precision", "fp32", "--lr", "2e-2", "--max_new_tokens", "4")


def final_delta(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "delta_ckpts" / ckpt.WEIGHTS_NAME))


def step_losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train_loss.jsonl").read_text().splitlines()]


def assert_same_delta(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, f"deltas differ by up to {worst}"
    assert max(v.abs().max().item() for v in a.values()) > 10 * atol  # the deltas did move


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tiny_opt, memory_data, tmp_path):
    # 8 questions, global batch 7, two batches per step: the step's second batch holds one question, so
    # one process runs a zero-weight stand-in and no_sync covers the first batch
    flags = (*EXACT, "--batch_size", "7", "--gradient_accumulation_steps", "2", "--train_epochs", "3")
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "optqa",
                           *train_args(tiny_opt, memory_data, two, *flags)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = tmp_path / "one"
    summary = train_in_process(tiny_opt, memory_data, one, *flags)

    assert_same_delta(final_delta(two), final_delta(one), atol=2e-4)
    runs = list((two / "runs").iterdir())
    assert len(runs) == 1
    assert step_losses(runs[0]) == pytest.approx(step_losses(Path(summary["run_dir"])), abs=1e-4)
    # every question scored once: not doubled by the two processes, none dropped
    manifest = json.loads((two / "delta_ckpts" / ckpt.MANIFEST_NAME).read_text())
    assert manifest["metrics"]["test"]["count"] == manifest["metrics"]["dev"]["count"] == len(MEMORY_SET)
    assert manifest["metrics"]["best_epoch"] == summary["best_epoch"]
    predictions = [json.loads(line) for line in (runs[0] / "predictions_test.jsonl").read_text().splitlines()]
    assert sorted(row["question_id"] for row in predictions) == sorted(f"test-{i}" for i in range(len(MEMORY_SET)))
    metrics = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [row.get("epoch", row.get("split")) for row in metrics] == [1, 2, 3, "test"]
    # one writer: one summary, one log line per epoch, one progress bar per epoch
    assert done.stdout.count("best epoch") == 1
    assert done.stderr.count("epoch 1: train loss") == 1
    assert len(re.findall(r"epoch 1/3:\s+0%\|[^|]*\| 0/2 \[00:00<\?, \?it/s\]", done.stderr)) == 1
    assert sorted(p.name for p in (two / "delta_ckpts").iterdir()) == [ckpt.WEIGHTS_NAME, ckpt.MANIFEST_NAME]
    assert not [p for p in two.rglob("*") if p.name.endswith((".partial", ".previous"))]


def test_accumulation_equals_the_bigger_batch(tiny_opt, memory_data, tmp_path):
    # with 8 questions both runs see all 8 in each optimiser step, in two batches of 4 or one of 8
    accumulated = train_in_process(tiny_opt, memory_data, tmp_path / "acc", *EXACT, "--batch_size", "4",
                                   "--gradient_accumulation_steps", "2", "--train_epochs", "2")
    whole = train_in_process(tiny_opt, memory_data, tmp_path / "whole", *EXACT, "--batch_size", "8",
                             "--train_epochs", "2")
    assert_same_delta(final_delta(tmp_path / "acc"), final_delta(tmp_path / "whole"), atol=1e-4)
    assert [len(step_losses(Path(s["run_dir"]))) for s in (accumulated, whole)] == [2, 2]


def test_gradient_checkpointing_gives_the_same_losses(tiny_opt, memory_data, tmp_path, monkeypatch):
    from transformers.models.opt import modeling_opt

    # counted inside the layers (patching the layer's own forward would undo transformers' checkpoint wrapper)
    calls = []
    forward = modeling_opt.OPTAttention.forward
    monkeypatch.setattr(modeling_opt.OPTAttention, "forward",
                        lambda self, *a, **k: calls.append(self.training) or forward(self, *a, **k))
    flags = (*EXACT, "--batch_size", "4", "--train_epochs", "2")
    plain = train_in_process(tiny_opt, memory_data, tmp_path / "plain", *flags)
    plain_calls = calls.count(True)
    recomputed = train_in_process(tiny_opt, memory_data, tmp_path / "ckpt", *flags, "--gradient_checkpointing")
    # 2 layers x 4 batches: each layer's attention ran again during backward
    assert calls.count(True) - plain_calls == plain_calls + 2 * 4
    losses = step_losses(Path(recomputed["run_dir"]))
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses == pytest.approx(step_losses(Path(plain["run_dir"])), abs=1e-5)
    assert_same_delta(final_delta(tmp_path / "ckpt"), final_delta(tmp_path / "plain"), atol=1e-5)


def test_delta_trained_under_bf16_is_saved_as_fp32_cpu_tensors(tiny_opt, memory_data, tmp_path):
    train_in_process(tiny_opt, memory_data, tmp_path, "--precision", "bf16", "--train_epochs", "1",
                     "--max_new_tokens", "2")
    with safe_open(str(tmp_path / "delta_ckpts" / ckpt.WEIGHTS_NAME), framework="pt") as weights:
        dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}
    assert dtypes == {"F32"}
    _, _, state = ckpt.read_checkpoint(tmp_path / "delta_ckpts")
    assert {v.device.type for v in state.values()} == {"cpu"}


def test_fp16_training_on_a_cpu_is_refused(tiny_opt, memory_data, tmp_path):
    with pytest.raises(OptqaError, match="fp16 trains only on a CUDA GPU"):
        train_in_process(tiny_opt, memory_data, tmp_path, "--precision", "fp16", "--cpu")
