"""Memory per process when N processes train a delta: DDP (each holds the whole backbone) against FSDP (--fsdp).

    python benchmarks/fsdp_memory.py                    # opt-350m shape, 2 CPU processes (torchrun, gloo)
    python benchmarks/fsdp_memory.py --size 1.3b --processes 2

Three ways to start the processes: torchrun without sharding (DDP), torchrun with --fsdp, and
``accelerate launch --use_fsdp --fsdp_version 2``, whose defaults also load the weights on the first process only.

Both runs are optqa's own training (``optqa.run.training.train``) on a random-weight backbone of the real shape, fp32,
global batch 8, three optimiser steps, then the test questions answered. Per process it reports the RSS after
the last optimiser step (what training holds) and the peak RSS of the whole run, which includes loading the
whole backbone before it is sharded. The two modes run back to back on the same machine, so the ratio is what
to read, not the megabytes. The table also goes into the script's section of ``benchmarks/RESULTS.md``
(``--results``), with the machine and the date.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

TITLE = "Memory per process: DDP against FSDP (`benchmarks/fsdp_memory.py`)"
STEPS = 3  # Adam's moments appear at the first step; later steps show the steady state
BATCH = 8  # global batch, split across the processes
LABELS = {"ddp": "DDP (torchrun)", "fsdp": "FSDP (torchrun, --fsdp)",
          # accelerate's launcher also loads the weights on the first process only (cpu_ram_efficient_loading)
          "accelerate_fsdp": "FSDP (accelerate launch --use_fsdp --fsdp_version 2)",
          "accelerate_fsdp_every": "same, --fsdp_cpu_ram_efficient_loading false"}
QUESTIONS = 16  # dev and test questions answered (each process answers its share)


def _resident_mb() -> dict[str, float]:
    """Resident memory by kind (Linux): private (anonymous) and file-backed (the memory-mapped weights file,
    one page-cache copy shared by every process that maps it)."""
    kinds = {"RssAnon": "private_mb", "RssFile": "file_mb"}
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in kinds:
            found[kinds[key]] = int(line.split()[1]) / 1024
    return found


def worker(args: list[str], out_prefix: str) -> None:
    """One process of a torchrun job: optqa's training with the RSS read after each optimiser step."""
    import os

    from common import peak_rss_mb, reset_peak_rss

    from optqa.cli import parse_args
    from optqa.config import RunConfig
    from optqa.hardware import parameter_counts
    from optqa.run import training as trainer

    reset_peak_rss()
    after_step: list[dict] = []
    step = trainer._optimiser_step

    def measured_step(window, prepared, *rest, **k):
        value = step(window, prepared, *rest, **k)
        held, total = parameter_counts(prepared)
        after_step.append({**_resident_mb(), "held": held, "total": total})
        return value

    trainer._optimiser_step = measured_step
    config = RunConfig.of(parse_args(args))
    trainer.train(config)
    rank = os.environ.get("RANK", "0")
    Path(f"{out_prefix}-{rank}.json").write_text(json.dumps({"rank": int(rank), "after_steps": after_step,
                                                             "peak_mb": peak_rss_mb()}))


def build_backbone(size: str, folder: Path) -> Path:
    """A random-weight OPT of the real ``size`` shape, with the benchmark assets' tokenizer."""
    from common import build_assets
    from memory_table import OPT_FAMILY

    from optqa.tiny import build_opt

    assets = build_assets(folder)
    plm = folder / f"opt-{size}-shape"
    if not (plm / "config.json").is_file():
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(assets["plm"]) / name).is_file():
                plm.mkdir(parents=True, exist_ok=True)
                shutil.copy(Path(assets["plm"]) / name, plm / name)
        hidden, layers, heads, ffn, embed = OPT_FAMILY[size]
        print(f"building an opt-{size}-shaped backbone with random weights in {plm} (once; cached)", file=sys.stderr)
        build_opt(plm, None, seed=0, vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, ffn_dim=ffn, word_embed_proj_dim=embed,
                  do_layer_norm_before=size != "350m", max_position_embeddings=2048)
    return plm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, plm: Path, data: Path, processes: int, scratch: Path) -> list[dict]:
    from common import child_env

    out = scratch / mode
    out.mkdir(parents=True, exist_ok=True)
    # one epoch of STEPS batches, then the dev and test questions answered
    for split, count in (("train", STEPS * BATCH), ("dev", QUESTIONS), ("test", QUESTIONS)):
        lines = (data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["--mode", "train", "--plm_path", str(plm), "--data_path", str(out), "--delta_type", "lora",
            "--precision", "fp32", "--batch_size", str(BATCH), "--train_epochs", "1", "--max_new_tokens", "8",
            "--save_steps", "0",
            "--delta_save_path", str(out / "delta"), "--raw_delta_save_path", str(out / "raw"),
            "--output_dir", str(out / "runs"), *(["--fsdp"] if mode == "fsdp" else [])]
    print(f"training with {processes} processes, {LABELS[mode]} ...", file=sys.stderr, flush=True)
    if mode.startswith("accelerate_fsdp"):
        launcher = ["accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes",
                    str(processes), "--main_process_port", str(_free_port()),
                    *(["--fsdp_cpu_ram_efficient_loading", "false"] if mode.endswith("every") else [])]
    else:
        launcher = ["torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                    "--master_port", str(_free_port())]
    done = subprocess.run([sys.executable, "-m", *launcher, str(Path(__file__)), "--worker", str(out / "rss"), "--",
                           *args],
                          capture_output=True, text=True, env=child_env(OMP_NUM_THREADS="1"), timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed (exit {done.returncode}):\n" + "\n".join(done.stderr.splitlines()[-60:]))
    return [json.loads((out / f"rss-{rank}.json").read_text()) for rank in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="350m", help="OPT shape (125m, 350m, 1.3b, ...)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "optqa-bench",
                        help="cache for the random-weight backbones and data")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    from common import add_results_option

    add_results_option(parser)
    options, rest = parser.parse_known_args()
    if options.worker:
        worker(rest[1:] if rest[:1] == ["--"] else rest, options.worker)
        return

    from common import machine, machine_markdown, write_run

    plm = build_backbone(options.size, options.work)
    data = Path(json.loads((options.work / "assets.json").read_text())["data"])
    scratch = Path(tempfile.mkdtemp(prefix="optqa-fsdp-"))
    rows = {mode: run(mode, plm, data, options.processes, scratch) for mode in LABELS}
    shutil.rmtree(scratch, ignore_errors=True)
    info = machine()
    print(machine_markdown(info))
    body = report(rows, options.size, options.processes)
    print("\n" + body)
    write_run(options, "fsdp_memory", TITLE, body, info)


def report(rows: dict[str, list[dict]], size: str, processes: int) -> str:
    """Per launch mode: parameters held, private and file-backed memory after the last step, peak RSS (Markdown)."""
    lines = [f"opt-{size} shape, {processes} CPU processes, LoRA, fp32, global batch 8, {STEPS} optimiser steps, then "
             f"{QUESTIONS} test questions answered", "",
             "| | parameters held per process | private memory per process after the last step | file-backed "
             "(weights file, shared) | peak RSS, first process / others |", "| --- | --- | --- | --- | --- |"]
    last = {mode: [r["after_steps"][-1] for r in rows[mode]] for mode in rows}
    for mode, label in LABELS.items():
        held = max(r["held"] for r in last[mode])
        lines.append(f"| {label} | {held:,} of {last[mode][0]['total']:,} | "
                     f"{max(r['private_mb'] for r in last[mode]):.0f} MB | {max(r['file_mb'] for r in last[mode]):.0f} "
                     f"MB | {rows[mode][0]['peak_mb']:.0f} / {max(r['peak_mb'] for r in rows[mode][1:]):.0f} MB |")
    ratio = max(r["held"] for r in last["fsdp"]) / max(r["held"] for r in last["ddp"])
    lines += ["", f"FSDP: each process holds {ratio:.2f}x the parameters DDP's processes hold (what a GPU's memory "
                  "must fit)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
