"""Checkpoint size per delta type on an OPT-125m-shaped backbone (random weights), against the backbone's size.

    python benchmarks/checkpoint_sizes.py [--backbone_dir DIR]

Each delta type is attached with its default settings (the CLI's), and saved as a real optqa checkpoint
(manifest with backbone fingerprint + safetensors weights). Prints a markdown table: trainable parameters,
weights file and manifest bytes, the share of the backbone's weights file, and how long verifying and reading
the checkpoint takes. Weights are random: sizes depend only on shapes, so they equal a real opt-125m's. The table
also goes into its section of ``benchmarks/RESULTS.md`` (``--results``), with the machine and the date.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_BACKBONE = Path(tempfile.gettempdir()) / "optqa-bench" / "opt-125m-random"
TITLE = "Checkpoint size per delta type (`benchmarks/checkpoint_sizes.py`)"


def opt_125m_folder(folder: Path = DEFAULT_BACKBONE) -> Path:
    """An OPT-125m-shaped random backbone saved like a hub folder (built once, then reused)."""
    from optqa.tiny import OPT_125M_SHAPE, build_opt, build_tokenizer

    if not (folder / "model.safetensors").is_file():
        texts = []
        for split in ("train", "dev", "test"):
            for line in (REPO / "data" / "sample" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                texts += [row["question"], *row["answers"]]
        # a small tokenizer whose ids index the first rows of the 50272-row embedding: shapes stay 125m's
        # (given texts, build_opt would size the embedding to the tokenizer's vocabulary)
        build_opt(folder, seed=0, **OPT_125M_SHAPE)
        build_tokenizer(texts, folder)
    return folder


def measure(backbone: Path, delta_type: str, out: Path) -> dict:
    from optqa.checkpoints import format as ckpt
    from optqa.config import DEFAULT_TEMPLATE, RunConfig
    from optqa.deltas import AutoDeltaConfig, AutoDeltaModel
    from optqa.plm import load_plm

    config = RunConfig(delta_type=delta_type, plm_path=str(backbone))
    if delta_type == "lora":
        config.modified_modules = ["self_attn.q_proj", "self_attn.v_proj"]  # the CLI's default for lora
    plm, tokenizer, _, _ = load_plm("opt", str(backbone))
    identity = ckpt.backbone_record(plm, str(backbone))
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(config.delta_config()), backbone_model=plm,
                                       tokenizer=tokenizer)
    manifest = ckpt.build_manifest(delta_config=delta.config.to_dict(),
                                   template_text=(REPO / DEFAULT_TEMPLATE).read_text(encoding="utf-8"),
                                   backbone=identity, hyperparameters=config.to_dict(), metrics={},
                                   trainable_parameters=delta.num_trainable_parameters())
    folder = ckpt.save_checkpoint(out / delta_type, delta.delta_state_dict(), manifest)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        ckpt.read_checkpoint(folder)
        times.append(time.perf_counter() - started)
    settings = {k: v for k, v in config.delta_config().items() if k not in ("delta_type", "init_text")}
    return {"delta": delta_type, "settings": " ".join(f"{k}={' '.join(v) if isinstance(v, list) else v}"
                                                      for k, v in settings.items()) or "-",
            "trainable": delta.num_trainable_parameters(), "total": delta.num_total_parameters(),
            "weights": (folder / ckpt.WEIGHTS_NAME).stat().st_size,
            "manifest": (folder / ckpt.MANIFEST_NAME).stat().st_size,
            "verify_ms": 1000 * statistics.median(times)}


def main() -> None:
    import logging

    logging.disable(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone_dir", type=Path, default=DEFAULT_BACKBONE)
    common.add_results_option(parser)
    args = parser.parse_args()
    backbone = opt_125m_folder(args.backbone_dir)
    backbone_bytes = (backbone / "model.safetensors").stat().st_size
    with tempfile.TemporaryDirectory() as out:
        rows = [measure(backbone, t, Path(out)) for t in ("adapter", "lora", "bitfit", "soft_prompt", "prefix")]
    body = report(rows, backbone_bytes)
    print(body)
    common.write_run(args, "checkpoint_sizes", TITLE, body)


def report(rows: list[dict], backbone_bytes: int) -> str:
    """The backbone's size, then one table row per delta type (Markdown)."""
    backbone_params = rows[0]["total"] - rows[0]["trainable"]
    fp16_bytes = 2 * backbone_params  # facebook/opt-125m is shared in fp16 (~250 MB)
    lines = [f"backbone: OPT-125m shape, {backbone_params:,} parameters; weights file {backbone_bytes / 1e6:.1f} MB "
             f"(fp32), {fp16_bytes / 1e6:.1f} MB in fp16 as facebook/opt-125m is shared", "",
             "| delta | settings | trainable params | % of backbone params | weights file | manifest | "
             "share of fp32 / fp16 backbone file | verify + read |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['delta']} | {row['settings']} | {row['trainable']:,} | "
                     f"{100 * row['trainable'] / backbone_params:.3f}% | {row['weights'] / 1e6:.3f} MB | "
                     f"{row['manifest'] / 1e3:.1f} kB | {100 * row['weights'] / backbone_bytes:.2f}% / "
                     f"{100 * row['weights'] / fp16_bytes:.2f}% | {row['verify_ms']:.1f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
