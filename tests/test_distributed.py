"""Several processes train like one; precision, gradient accumulation and checkpointing keep the maths exact."""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MEMORY_SET, REPO, train_args, train_in_process, write_split
from safetensors import safe_open
from safetensors.torch import load_file

from optqa.checkpoints import format as ckpt
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


def launch(launcher: list[str], *args: str) -> subprocess.CompletedProcess:
    """``python -m <launcher...> <args>`` from the checkout, one torch thread per process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *launcher, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


def torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """``python -m optqa`` in ``processes`` CPU processes (gloo), as torchrun starts them; must succeed.

    --standalone: the rendezvous store listens on a port the system picks as it binds (port 0), and the
    processes meet through it; no port is chosen beforehand that another program could take in between."""
    done = launch(["torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1", "--nproc_per_node",
                   str(processes)], "-m", "optqa", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def accelerate_launch(*args: str) -> subprocess.CompletedProcess:
    """``accelerate launch ARGS``. Its --main_process_port 0 only picks a free port that is bound later, but
    given a port in use it starts torchrun --standalone (see torchrun above): so it is given a port this test
    keeps listening on, which no other program can take either."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        return launch(["accelerate.commands.launch", "--main_process_port", str(busy.getsockname()[1])], *args)


def held_parameters(stderr: str) -> tuple[int, int]:
    """(parameters this process holds, parameters of the model) from the FSDP log line; the whole model must be
    what was counted before sharding, in the delta's log line."""
    held = re.search(r"FSDP: each of 2 processes holds its shard of the backbone, here ([\d,]+) of ([\d,]+) "
                     r"parameters", stderr)
    assert held, stderr[-2000:]
    mine, total = (int(n.replace(",", "")) for n in held.groups())
    assert f"/ total {total:,} (" in stderr
    return mine, total


# 8 questions, global batch 7, two batches per step: the step's second batch holds one question, so one
# process runs a zero-weight stand-in and no_sync covers the first batch
SPLIT_FLAGS = (*EXACT, "--batch_size", "7", "--gradient_accumulation_steps", "2", "--train_epochs", "3")


@pytest.fixture(scope="module")
def one_process_run(tiny_opt, memory_data, tmp_path_factory):
    """The single-process run that the multi-process runs below must reproduce: (output folder, summary)."""
    out = tmp_path_factory.mktemp("one-process")
    return out, train_in_process(tiny_opt, memory_data, out, *SPLIT_FLAGS)


def assert_trained_like_one_process(out: Path, done, one_process_run, scored: int) -> None:
    one, summary = one_process_run
    assert_same_delta(final_delta(out), final_delta(one), atol=2e-4)
    runs = list((out / "runs").iterdir())
    assert len(runs) == 1
    assert step_losses(runs[0]) == pytest.approx(step_losses(Path(summary.run_dir)), abs=1e-4)
    # every question scored once: not doubled by the two processes, none dropped
    manifest = json.loads((out / "delta_ckpts" / ckpt.MANIFEST_NAME).read_text())
    assert manifest["metrics"]["test"]["count"] == manifest["metrics"]["dev"]["count"] == scored
    predictions = [json.loads(line) for line in (runs[0] / "predictions_test.jsonl").read_text().splitlines()]
    assert sorted(row["question_id"] for row in predictions) == sorted(f"test-{i}" for i in range(scored))
    metrics = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [row.get("epoch", row.get("split")) for row in metrics] == [1, 2, 3, "test"]
    # one writer: one summary, one log line per epoch, one progress bar per epoch
    assert done.stdout.count("best epoch") == 1
    assert done.stderr.count("epoch 1: train loss") == 1
    assert len(re.findall(r"epoch 1/3:\s+0%\|[^|]*\| 0/2 \[00:00<\?, \?it/s\]", done.stderr)) == 1
    assert sorted(p.name for p in (out / "delta_ckpts").iterdir()) == [ckpt.WEIGHTS_NAME, ckpt.MANIFEST_NAME]
    assert not [p for p in out.rglob("*") if p.name.endswith((".partial", ".previous"))]


def test_two_processes_train_like_one(tiny_opt, memory_data, tmp_path, one_process_run):
    done = torchrun(train_args(tiny_opt, memory_data, tmp_path, *SPLIT_FLAGS))
    assert_trained_like_one_process(tmp_path, done, one_process_run, scored=len(MEMORY_SET))
    manifest = json.loads((tmp_path / "delta_ckpts" / ckpt.MANIFEST_NAME).read_text())
    assert manifest["metrics"]["best_epoch"] == one_process_run[1].best_epoch
    assert "FSDP" not in done.stderr


END_ORDER_PROBE = """
import sys, weakref
from optqa.run import training

def end_process_group(self):  # the recipe's own, with a look at DDP's wrapper (its Reducer) before the group ends
    wrapper = weakref.ref(self.prepared)
    end_training, accelerator = self.accelerator.end_training, self.accelerator

    def probed():
        # one write: lines of the two processes, each shorter than a pipe's atomic write, never interleave
        sys.stdout.write(f"rank {accelerator.process_index}: DDP wrapper freed before the group ended: "
                         f"{wrapper() is None}\\n")
        sys.stdout.flush()
        end_training()

    accelerator.end_training = probed
    original(self)

original, training.TrainingRecipe.end_process_group = training.TrainingRecipe.end_process_group, end_process_group
from optqa.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ddps_reducer_is_freed_before_the_process_group_ends(tiny_opt, memory_data, tmp_path):
    # ~Reducer releases the process group keeping the GIL, while a gloo worker finishing its last work needs the
    # GIL: freed after destroy_process_group it deadlocked now and then under load (one rank hung at exit)
    probe = tmp_path / "probe.py"
    probe.write_text(END_ORDER_PROBE, encoding="utf-8")
    done = launch(["torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1", "--nproc_per_node", "2"],
                  str(probe), *train_args(tiny_opt, memory_data, tmp_path, "--train_epochs", "1", "--precision",
                                          "fp32", "--max_new_tokens", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("rank ")) == [
        f"rank {r}: DDP wrapper freed before the group ended: True" for r in (0, 1)]


FINALISATION_PROBE = """
import atexit, runpy
atexit.register(lambda: print("interpreter finalised", flush=True))
runpy.run_module("optqa", run_name="__main__")
"""


@pytest.mark.parametrize("world_size,finalised", [("1", True), ("2", False)])
def test_a_process_of_a_multi_process_run_ends_without_the_interpreters_finalisation(tmp_path, world_size,
                                                                                    finalised):
    # FSDP2's sharded model (and its gloo group) outlives the run; torn down with the interpreter, a gloo worker
    # aborted one rank now and then under load: such a process ends with os._exit, its streams flushed
    probe = tmp_path / "probe.py"
    probe.write_text(FINALISATION_PROBE, encoding="utf-8")
    done = subprocess.run([sys.executable, str(probe), "--mode", "inspect", "--delta_save_path",
                           str(tmp_path / "none")], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": world_size})
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert ("interpreter finalised" in done.stdout) is finalised


def test_fsdp_shards_the_backbone_and_trains_like_one_process(tiny_opt, memory_data, tmp_path, one_process_run):
    # seven dev/test questions answered one per batch: one process has 4 batches, the other 3, and must run
    # an idle batch so that the sharded backbone computes with both
    seven = [write_split(tmp_path / "seven", MEMORY_SET[:7], split) for split in ("dev", "test")]
    done = torchrun(train_args(tiny_opt, memory_data, tmp_path, *SPLIT_FLAGS, "--fsdp", "--eval_batch_size", "1",
                               "--dev_file", str(seven[0]), "--test_file", str(seven[1])))
    mine, total = held_parameters(done.stderr)
    assert total / 2 <= mine < total / 2 + 100  # half, up to the rounding of each tensor's split
    assert "returned a view tensor" not in done.stderr
    assert_trained_like_one_process(tmp_path, done, one_process_run, scored=7)


def test_accumulation_equals_the_bigger_batch(tiny_opt, memory_data, tmp_path):
    # with 8 questions both runs see all 8 in each optimiser step, in two batches of 4 or one of 8
    accumulated = train_in_process(tiny_opt, memory_data, tmp_path / "acc", *EXACT, "--batch_size", "4",
                                   "--gradient_accumulation_steps", "2", "--train_epochs", "2")
    whole = train_in_process(tiny_opt, memory_data, tmp_path / "whole", *EXACT, "--batch_size", "8",
                             "--train_epochs", "2")
    assert_same_delta(final_delta(tmp_path / "acc"), final_delta(tmp_path / "whole"), atol=1e-4)
    assert [len(step_losses(Path(s.run_dir))) for s in (accumulated, whole)] == [2, 2]


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
    losses = step_losses(Path(recomputed.run_dir))
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses == pytest.approx(step_losses(Path(plain.run_dir)), abs=1e-5)
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


@pytest.mark.parametrize("sharding", [(), ("--fsdp",)], ids=["ddp", "fsdp"])
def test_two_process_run_resumes_exactly(tiny_opt, memory_data, tmp_path, sharding):
    # LoRA dropout: each process draws its own masks, so each one's RNG must be saved and restored; under
    # FSDP the AdamW moments are sharded and are gathered into the resume state and split again
    flags = ("--delta_type", "lora", "--lora_dropout", "0.1", "--batch_size", "4", "--train_epochs", "2", *EXACT,
             *sharding)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    torchrun(train_args(tiny_opt, memory_data, whole, *flags))
    torchrun(train_args(tiny_opt, memory_data, parts, *flags, "--max_steps", "3"))  # stops within epoch 2
    state = torch.load(parts / "raw_delta_ckpts" / ckpt.RESUME_DIR_NAME / ckpt.RESUME_STATE_NAME, weights_only=True)
    assert state["train_state"]["global_step"] == 3
    first, second = (rng["torch"] for rng in state["process_rngs"])
    assert not torch.equal(first, second)
    assert {len(moment) for moment in state["optimizer"]["state"].values()} == {3}  # step, exp_avg, exp_avg_sq
    torchrun(train_args(tiny_opt, memory_data, parts, *flags, "--resume"))
    resumed, uninterrupted = final_delta(parts), final_delta(whole)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    (run,) = (parts / "runs").iterdir()
    assert step_losses(run) == step_losses(next((whole / "runs").iterdir()))


def test_fsdp_run_stopped_at_an_epochs_end_scores_dev_then_trains_on(tiny_opt, memory_data, tmp_path,
                                                                     one_process_run):
    # one optimiser step an epoch: --max_steps 1 ends epoch 1, and its resume state is turned back into the one
    # saved at that step before dev was scored (what a kill right then leaves): the resumed run scores dev first,
    # in inference mode, where FSDP2 allocates the buffers it gathers the layers into; training then reuses them
    torchrun(train_args(tiny_opt, memory_data, tmp_path, *SPLIT_FLAGS, "--fsdp", "--max_steps", "1"))
    resume = tmp_path / "raw_delta_ckpts" / ckpt.RESUME_DIR_NAME
    _, manifest, delta = ckpt.read_checkpoint(resume)
    blob = torch.load(resume / ckpt.RESUME_STATE_NAME, weights_only=True)
    (run,) = (tmp_path / "runs").iterdir()
    blob["train_state"].update(epoch=0, batches_done=2, epoch_losses=step_losses(run), history=[], best_epoch=-1,
                               best_dev={})
    ckpt.save_checkpoint(resume, delta, manifest, lambda folder: torch.save(blob, folder / ckpt.RESUME_STATE_NAME))
    done = torchrun(train_args(tiny_opt, memory_data, tmp_path, *SPLIT_FLAGS, "--fsdp", "--resume"))
    assert "resuming at epoch 1, batch 2 (optimiser step 1)" in done.stderr
    assert_same_delta(final_delta(tmp_path), final_delta(one_process_run[0]), atol=2e-4)
    assert step_losses(run) == pytest.approx(step_losses(Path(one_process_run[1].run_dir)), abs=1e-4)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row.get("epoch", row.get("split")) for row in metrics] == [1, 2, 3, "test"]


def test_fsdp_in_one_process_warns_and_trains_unsharded(tiny_opt, memory_data, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train_in_process(tiny_opt, memory_data, tmp_path, *EXACT, "--fsdp", "--train_epochs", "1")
    assert "--fsdp: a single process has nothing to shard with; training unsharded" in caplog.text
    assert "FSDP: each of" not in caplog.text
    assert (tmp_path / "delta_ckpts" / ckpt.WEIGHTS_NAME).is_file()
    # --fsdp is this run's: the process (and what it starts next) is not left flagged as an FSDP launch
    assert "ACCELERATE_USE_FSDP" not in os.environ
    train_in_process(tiny_opt, memory_data, tmp_path / "next", *EXACT, "--train_epochs", "1")


def test_accelerate_launch_use_fsdp_trains_like_one_process(tiny_opt, memory_data, tmp_path, one_process_run):
    # accelerate's launcher defaults to loading the weights on the first process only and re-tying them
    # after a trip to the meta device: the head must stay tied to the embedding (same parameter count)
    done = accelerate_launch("--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "-m", "optqa",
                             *train_args(tiny_opt, memory_data, tmp_path, *SPLIT_FLAGS))
    assert done.returncode == 0, done.stderr[-3000:]
    held_parameters(done.stderr)
    assert_trained_like_one_process(tmp_path, done, one_process_run, scored=len(MEMORY_SET))


def test_accelerate_launch_with_fsdp1_is_refused(tiny_opt, memory_data, tmp_path):
    done = accelerate_launch("--use_fsdp", "--num_processes", "2", "-m", "optqa",
                             *train_args(tiny_opt, memory_data, tmp_path))
    assert done.returncode != 0
    assert "error: optqa shards with FSDP2: launch with accelerate launch --use_fsdp --fsdp_version 2" in done.stderr
    assert "Traceback" not in done.stderr.split("error: optqa shards")[0]
    assert not (tmp_path / "delta_ckpts").exists()
