"""``--mode inspect``: what a checkpoint holds and whether it verifies, read without loading the backbone."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from optqa.checkpoints.bundle import open_source, read_bundle_comment
from optqa.checkpoints.format import (
    MANIFEST_HASH_KEY,
    SHAPE_KEYS,
    WEIGHTS_NAME,
    read_manifest,
    safetensors_header,
    verify_files,
)
from optqa.config import RunConfig


# The training settings that change what a delta learns (the rest are paths and switches).
def safetensors_summary(path: Path) -> dict[str, Any]:
    """Tensor count, parameter count and dtypes from a safetensors header, without reading the tensors; the header
    is checked as loading checks it, so a file that cannot load is never reported as OK."""
    tensors = safetensors_header(path)
    return {"bytes": path.stat().st_size, "tensors": len(tensors),
            "parameters": sum(math.prod(shape) for _, shape in tensors.values()),
            "dtypes": sorted({dtype for dtype, _ in tensors.values()}), "names": sorted(tensors)}


def inspect_checkpoint(path: str | Path) -> list[str]:
    """What the checkpoint (folder or bundle) is, as printable lines; raises OptqaError if it fails to verify."""
    from optqa.checkpoints.peft import is_peft_adapter

    with open_source(path) as (extracted, pulled):
        if is_peft_adapter(extracted):
            return _peft_adapter_lines(path, extracted, pulled)
        folder, manifest = read_manifest(extracted)
        verify_files(folder, manifest)
        weights = safetensors_summary(folder / WEIGHTS_NAME)
    local = Path(path) if pulled is None else pulled.folder
    if pulled is not None:
        kind = "Hugging Face Hub snapshot"
    else:
        kind = f"bundle ({local.stat().st_size:,} bytes)" if local.is_file() else "folder"
    lines = [("checkpoint", f"{path} [{kind}]")]
    if pulled is not None:
        lines.append(("pulled", pulled.describe()))
    lines += [("format", f"{manifest['format']} v{manifest['format_version']} (optqa {manifest.get('optqa_version')}, "
                         f"created {manifest.get('created')})"),
              ("integrity", "OK, SHA-256 verified: " + ", ".join(
                  f"{name} {entry['sha256'][:12]}" for name, entry in sorted(manifest["files"].items()))),
              ("manifest", manifest_text(manifest))]
    if manifest.get("versions"):
        lines.append(("saved with", _versions_text(manifest["versions"])))
    if local.is_file():
        exported = read_bundle_comment(local).get("exported_with")
        if exported:
            lines.append(("bundled", "with " + _versions_text(exported)))
    delta = dict(manifest.get("delta") or {})
    lines.append(("delta", f"{delta.pop('delta_type', '?')} " + json.dumps(delta)))
    lines.append(("weights", f"{WEIGHTS_NAME}: {weights['bytes']:,} bytes, {weights['tensors']} tensors, "
                             f"{weights['parameters']:,} parameters ({', '.join(weights['dtypes'])})"))
    declared = manifest.get("trainable_parameters")
    note = "" if declared == weights["parameters"] else f" (the weights file holds {weights['parameters']:,})"
    lines.append(("trainable", f"{declared:,} parameters{note}" if isinstance(declared, int) else "not recorded"))
    lines += _backbone_lines(manifest.get("backbone") or {})
    lines.append(("template", (manifest.get("template") or "").strip()))
    lines += _origin_lines(manifest)
    lines.append(("metrics", metrics_text(manifest.get("metrics") or {})))
    width = max(len(label) for label, _ in lines)
    return [f"{label:<{width}}  {text}" for label, text in lines]


def manifest_text(manifest: dict[str, Any]) -> str:
    """What :func:`~optqa.checkpoints.format.read_manifest` verified of a manifest itself, as one line."""
    checked = "its delta config and recorded settings checked (types, choices, ranges)"
    if MANIFEST_HASH_KEY in manifest:
        return f"OK, its own SHA-256 verified ({manifest[MANIFEST_HASH_KEY][:12]}); {checked}"
    return (f"format version 1: not covered by a hash of its own (an edit to its settings or template cannot be "
            f"detected); {checked}")


def _peft_adapter_lines(path: str | Path, folder: Path, pulled) -> list[str]:
    from optqa.checkpoints.format import ADAPTER_WEIGHTS_NAME
    from optqa.checkpoints.peft import delta_config_from_peft, read_adapter_config

    config = read_adapter_config(folder)
    delta = delta_config_from_peft(config, str(path))
    weights = safetensors_summary(folder / ADAPTER_WEIGHTS_NAME)
    lines = [("checkpoint", f"{path} [plain PEFT adapter, no optqa manifest]")]
    if pulled is not None:
        lines.append(("pulled", pulled.describe()))
    lines += [("peft", f"{config['peft_type']} (peft {config.get('peft_version', '?')}), base model "
                       f"{config.get('base_model_name_or_path')}"),
              ("delta", f"{delta.pop('delta_type')} {json.dumps(delta)} (optqa's counterpart)"),
              ("weights", f"{ADAPTER_WEIGHTS_NAME}: {weights['bytes']:,} bytes, {weights['tensors']} tensors, "
                          f"{weights['parameters']:,} parameters ({', '.join(weights['dtypes'])})"),
              ("integrity", "no manifest: no recorded hashes to check; the backbone is checked by name only"),
              ("loading", "needs --template (the adapter records no prompt format); --mode export converts it "
                          "into an optqa bundle")]
    width = max(len(label) for label, _ in lines)
    return [f"{label:<{width}}  {text}" for label, text in lines]


def _versions_text(versions: dict[str, Any]) -> str:
    return ", ".join(f"{name} {version}" for name, version in versions.items())


def _backbone_lines(backbone: dict[str, Any]) -> list[tuple[str, str]]:
    config = backbone.get("config") or {}
    shape = ", ".join(f"{k} {config[k]}" for k in SHAPE_KEYS if k in config)
    gguf = backbone.get("gguf")
    return [("backbone", f"{backbone.get('name_or_path')} ({backbone.get('architecture')}, {shape})"),
            *([("gguf file", f"{gguf['file']} (SHA-256 {gguf['sha256']})")] if gguf else []),
            ("fingerprint", str(backbone.get("fingerprint")))]


def _origin_lines(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    imported = manifest.get("imported_from")
    if imported and imported.get("format") == "PEFT":
        return [("imported", f"from PEFT {imported.get('peft_type')} adapter {imported.get('path')} (peft "
                             f"{imported.get('peft_version')}, base model {imported.get('base_model_name_or_path')}); "
                             "not trained by optqa")]
    if imported:
        return [("imported", f"from {imported.get('format')} {imported.get('opendelta_version', '')} checkpoint "
                             f"{imported.get('path')} (backbone {imported.get('backbone_checkpoint_name')}); "
                             "not trained by optqa")]
    hyper = manifest.get("hyperparameters") or {}
    if hyper.get("mode") == "save_finetuned":
        return [("saved", "by a script's delta_model.save_finetuned (its training settings are its own; not "
                          "recorded)")]
    training = training_text(hyper)
    data = hyper.get("train_file") or hyper.get("data_path")
    return [("training", training), ("data", str(data))]


def training_text(hyper: dict[str, Any]) -> str:
    """The training settings a checkpoint recorded (RunConfig's ``training`` fields), as one line."""
    return ", ".join(f"{k} {hyper[k]}" for k in RunConfig.names_where("training") if k in hyper)


def metrics_text(metrics: dict[str, Any]) -> str:
    parts = []
    if "best_epoch" in metrics:
        parts.append(f"best epoch {metrics['best_epoch']}")
    for split in ("dev", "test"):
        scores = metrics.get(split)
        # informational, so not refused when odd: shown only where it holds numbers
        if isinstance(scores, dict) and isinstance(scores.get("f1"), (int, float)) and isinstance(
                scores.get("em", 0), (int, float)):
            parts.append(f"{split} F1 {scores['f1']:.2f} EM {scores.get('em', 0):.2f} ({scores.get('count', '?')} "
                         "questions)")
    if metrics.get("history"):
        parts.append(f"{len(metrics['history'])} epochs logged")
    if "test_result" in metrics:  # what a script passed to save_finetuned(test_result=...)
        parts.append(f"test_result {json.dumps(metrics['test_result'], default=str)}")
    return "; ".join(parts) or "none recorded"
