"""What the backbone check costs: backbone_fingerprint against loading the backbone, on an OPT-125m shape.

    python benchmarks/fingerprint_cost.py [--backbone_dir DIR] [--repeats N]

Measured in the same run on the same saved folder (random weights, the real shape), medians over --repeats
after one warm-up load that brings the file into the page cache:
- ``from_pretrained``: transformers maps the safetensors file, so this returns before most weights are read;
- ``load_plm``: optqa's backbone load (config, tokenizer, model), what every checkpoint load pays;
- ``from_pretrained`` + reading every weight once: what the backbone costs by its first forward pass;
- ``backbone_fingerprint`` on a freshly loaded model (its sampled pages read from the mapping) and again;
- for comparison, a full SHA-256 of the weights file (what an exact whole-weights hash would cost).

The table also goes into its section of ``benchmarks/RESULTS.md`` (``--results``), with the machine and the date.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import common
from checkpoint_sizes import DEFAULT_BACKBONE, opt_125m_folder

TITLE = "What the backbone fingerprint costs (`benchmarks/fingerprint_cost.py`)"


def timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from optqa.checkpoints.format import backbone_fingerprint, sha256_file
    from optqa.plm import load_plm

    logging.disable(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone_dir", type=Path, default=DEFAULT_BACKBONE)
    parser.add_argument("--repeats", type=int, default=5)
    common.add_results_option(parser)
    args = parser.parse_args()
    folder = opt_125m_folder(args.backbone_dir)
    weights = folder / "model.safetensors"

    def load():
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)

    def load_and_read():
        model = load()
        with torch.no_grad():
            for param in model.parameters():
                param.sum()
        return model

    def fresh_fingerprint() -> float:
        model = load()
        started = time.perf_counter()
        backbone_fingerprint(model)
        return time.perf_counter() - started

    load()  # warm-up: imports, page cache
    load_s, model = timed(load, args.repeats)
    load_plm_s, _ = timed(lambda: load_plm("opt", str(folder)), args.repeats)
    read_s, _ = timed(load_and_read, args.repeats)
    fresh_s = statistics.median(fresh_fingerprint() for _ in range(args.repeats))
    fingerprint_s, fingerprint = timed(lambda: backbone_fingerprint(model), args.repeats)
    bf16_fingerprint = backbone_fingerprint(model.to(torch.bfloat16))
    sha_s, _ = timed(lambda: sha256_file(weights), max(1, args.repeats // 2))

    lines = [f"backbone: {folder} ({weights.stat().st_size / 1e6:.1f} MB fp32, "
             f"{sum(p.numel() for p in model.parameters()):,} parameters); torch threads {torch.get_num_threads()}; "
             f"median of {args.repeats}", "",
             "| step | time | fingerprint (fresh) as a share of it |", "| --- | ---: | ---: |"]
    for label, seconds in (("from_pretrained (weights mapped, mostly unread)", load_s),
                           ("load_plm: config + tokenizer + from_pretrained (optqa's load)", load_plm_s),
                           ("from_pretrained + every weight read once (paid by the first forward)", read_s)):
        lines.append(f"| {label} | {seconds * 1000:.0f} ms | {100 * fresh_s / seconds:.1f}% |")
    lines += [f"| backbone_fingerprint on a freshly loaded model | {fresh_s * 1000:.1f} ms | |",
              f"| backbone_fingerprint again (pages already read) | {fingerprint_s * 1000:.1f} ms | |",
              f"| full SHA-256 of the weights file, for comparison | {sha_s * 1000:.0f} ms | |", "",
              f"fingerprint {fingerprint[:16]}...; same model cast to bf16: "
              f"{'same' if bf16_fingerprint == fingerprint else 'DIFFERENT'}"]
    body = "\n".join(lines)
    print(body)
    common.write_run(args, "fingerprint_cost", TITLE, body)


if __name__ == "__main__":
    main()
