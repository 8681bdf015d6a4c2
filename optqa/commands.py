"""One function per --mode: each turns a RunConfig into calls to the library and prints the outcome."""
from __future__ import annotations

import logging
from pathlib import Path

from .config import RunConfig
from .errors import OptqaError

log = logging.getLogger("optqa")


def _load_for_inference(config: RunConfig, explicit: set[str]):
    """A checkpoint rebuilds everything; only flags the user typed override what it recorded."""
    from .build import load_trained
    from .runtime import autocast_dtype, configure_threads

    configure_threads(config.num_threads)
    overrides = {k: getattr(config, k) for k in ("max_new_tokens", "eval_batch_size", "precision")
                 if k in explicit}
    model, manifest, saved = load_trained(config.delta_save_path,
                                          plm_path=config.plm_path if "plm_path" in explicit else None,
                                          ignore_backbone_mismatch=config.ignore_backbone_mismatch,
                                          overrides=overrides)
    model.autocast_dtype = autocast_dtype(saved.precision, model.device)
    if config.merge_lora and model.delta.merge_lora():
        log.info("LoRA merged into the backbone weights for answering")
    return model, manifest, saved


def train(config: RunConfig, explicit: set[str]) -> int:
    from .trainer import train as run_training

    summary = run_training(config)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    size = summary.get("checkpoint_bytes")
    print(f"best epoch {summary['best_epoch']}: dev F1 {summary['dev_f1']:.2f} EM {summary['dev_em']:.2f} | "
          f"test F1 {summary['test_f1']:.2f} EM {summary['test_em']:.2f}")
    print(f"delta saved to {summary['delta_save_path']}" + (f" ({size / 1e6:.2f} MB)" if size else "")
          + f"; results in {summary['run_dir']}; wall time {summary['wall_time_s']:.1f} s")


def evaluate(config: RunConfig, explicit: set[str]) -> int:
    from .data import load_split
    from .evaluation import evaluate as score_model
    from .results import METRICS_NAME, RunFolder

    model, manifest, saved = _load_for_inference(config, explicit)
    examples = load_split(config, config.split)
    encoded = model.wrapper.encode_all(examples, desc=f"tokenising {config.split}")
    metrics, rows = score_model(model, encoded, saved.eval_batch_size, config.split)
    run = RunFolder.create(config.output_dir, "evaluate")
    run.write_config(config)
    path = run.write_predictions(config.split, rows)
    run.append(METRICS_NAME, [{"split": config.split, f"{config.split}_f1": metrics["f1"],
                               f"{config.split}_em": metrics["em"], "count": metrics["count"]}])
    print(f"{config.split}: F1 {metrics['f1']:.2f} EM {metrics['em']:.2f} on {metrics['count']} questions; "
          f"predictions in {path}")
    return 0


def interactive_inference(config: RunConfig, explicit: set[str]) -> int:
    from .interactive import repl

    model, manifest, saved = _load_for_inference(config, explicit)
    log.info("delta %s on %s ready; type quit() to stop", manifest["delta"]["delta_type"],
             manifest["backbone"]["name_or_path"])
    repl(lambda question: model.answer([question])[0])
    return 0


def demo(config: RunConfig, explicit: set[str]) -> int:
    from .demo import run_demo

    run_demo(config, explicit)
    return 0


def download(config: RunConfig, explicit: set[str]) -> int:
    from .download import download_arc_da, has_data

    target = Path(config.data_path)
    if has_data(target):
        print(f"ARC-DA already in {target}")
        return 0
    download_arc_da(target, url=config.data_url, allow_checksum_mismatch=config.allow_checksum_mismatch)
    print(f"ARC-DA v1.1 in {target} (train/dev/test.jsonl, checksums verified)")
    return 0


def inspect(config: RunConfig, explicit: set[str]) -> int:
    raise OptqaError("--mode inspect is not available yet")


def export(config: RunConfig, explicit: set[str]) -> int:
    raise OptqaError("--mode export is not available yet")


def import_opendelta(config: RunConfig, explicit: set[str]) -> int:
    raise OptqaError("--mode import_opendelta is not available yet")
