"""``--mode inspect`` and ``--mode export``: describe, verify and share checkpoints.

Inspecting reads only the manifest and the safetensors header (a JSON block at the start of the file), so it
never loads the backbone and never imports transformers or PEFT. Exporting writes a ``.optqa`` bundle and,
where PEFT has the method, a PEFT adapter folder for people who use PEFT directly.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from .bundle import (BUNDLE_SUFFIX, default_bundle_path, open_checkpoint, open_source, read_bundle_comment,
                     write_bundle)
from .checkpoint import WEIGHTS_NAME, read_manifest, verify_files, write_folder_atomically
from .errors import OptqaError
from .hub import default_export_name, pin_source

PEFT_SUFFIX = "-peft"
PEFT_TEMPLATE_NAME = "optqa_template.txt"
# Delta types PEFT implements; optqa's adapter and BitFit have no PEFT counterpart.
PEFT_METHODS = {"lora": "LoRA", "soft_prompt": "prompt tuning", "prefix": "prefix tuning"}
# The training settings that change what a delta learns (the rest are paths and switches).
TRAINING_KEYS = ("lr", "train_epochs", "batch_size", "gradient_accumulation_steps", "warmup_steps", "weight_decay",
                 "max_grad_norm", "train_targets", "max_seq_l", "precision", "seed")
BACKBONE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "vocab_size")


def safetensors_summary(path: Path) -> dict[str, Any]:
    """Tensor count, parameter count and dtypes from a safetensors header, without reading the tensors."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < length <= size - 8:
            raise OptqaError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OptqaError(f"{path}: not a safetensors file (unreadable header)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    return {"bytes": size, "tensors": len(tensors),
            "parameters": sum(math.prod(v["shape"]) for v in tensors.values()),
            "dtypes": sorted({v["dtype"] for v in tensors.values()}), "names": sorted(tensors)}


def inspect_checkpoint(path: str | Path) -> list[str]:
    """What the checkpoint (folder or bundle) is, as printable lines; raises OptqaError if it fails to verify."""
    from .peft_import import is_peft_adapter

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
                  f"{name} {entry['sha256'][:12]}" for name, entry in sorted(manifest["files"].items())))]
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
    lines.append(("metrics", _metrics_text(manifest.get("metrics") or {})))
    width = max(len(label) for label, _ in lines)
    return [f"{label:<{width}}  {text}" for label, text in lines]


def _peft_adapter_lines(path: str | Path, folder: Path, pulled) -> list[str]:
    from .peft_import import ADAPTER_WEIGHTS_NAME, delta_config_from_peft, read_adapter_config

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
    shape = ", ".join(f"{k} {config[k]}" for k in BACKBONE_KEYS if k in config)
    return [("backbone", f"{backbone.get('name_or_path')} ({backbone.get('architecture')}, {shape})"),
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
    training = ", ".join(f"{k} {hyper[k]}" for k in TRAINING_KEYS if k in hyper)
    data = hyper.get("train_file") or hyper.get("data_path")
    return [("training", training), ("data", str(data))]


def _metrics_text(metrics: dict[str, Any]) -> str:
    parts = []
    if "best_epoch" in metrics:
        parts.append(f"best epoch {metrics['best_epoch']}")
    for split in ("dev", "test"):
        scores = metrics.get(split)
        if isinstance(scores, dict) and "f1" in scores:
            parts.append(f"{split} F1 {scores['f1']:.2f} EM {scores.get('em', 0):.2f} ({scores.get('count', '?')} "
                         "questions)")
    if metrics.get("history"):
        parts.append(f"{len(metrics['history'])} epochs logged")
    if "test_result" in metrics:  # what a script passed to save_finetuned(test_result=...)
        parts.append(f"test_result {json.dumps(metrics['test_result'], default=str)}")
    return "; ".join(parts) or "none recorded"


def peft_folder_for(bundle: Path) -> Path:
    stem = bundle.name[:-len(BUNDLE_SUFFIX)] if bundle.name.endswith(BUNDLE_SUFFIX) else bundle.name
    return bundle.with_name(stem + PEFT_SUFFIX)


def export_checkpoint(source: str | Path, export_path: str | Path | None = None, peft: bool = True,
                      plm_path: str | None = None, ignore_backbone_mismatch: bool = False,
                      template: str | None = None) -> list[str]:
    """Write ``source`` (folder, bundle or ``hf://`` name) as a bundle, and as a PEFT adapter folder where PEFT
    has the method. A plain PEFT adapter (given its ``template``) is converted: the bundle holds an optqa
    checkpoint whose manifest's ``imported_from`` names the adapter.

    Returns:
        The lines to print. A bundle source is re-written only if ``export_path`` names a new file.
    """
    from .peft_import import is_peft_adapter

    hub_name = default_export_name(source)
    source = pin_source(source)  # the bundle and the PEFT folder are made from one and the same commit
    with open_source(source) as (folder, _):
        if is_peft_adapter(folder):
            bundle = Path(export_path) if export_path else (
                Path(hub_name + BUNDLE_SUFFIX) if hub_name else default_bundle_path(source))
            return _export_peft_adapter(source, bundle, plm_path, ignore_backbone_mismatch, template)
    lines = []
    if hub_name is None and Path(source).is_file() and export_path is None:
        bundle = Path(source)
        with open_checkpoint(source) as folder:
            _, manifest = read_manifest(folder)
        lines.append(f"bundle {bundle} verified (already a bundle; pass --export_path to write a copy)")
    else:
        # a pulled snapshot lives in the shared Hugging Face cache: its bundle goes to the working folder
        bundle = Path(export_path) if export_path else (
            Path(hub_name + BUNDLE_SUFFIX) if hub_name else default_bundle_path(source))
        with open_checkpoint(source) as folder:
            _, manifest = read_manifest(folder)
            write_bundle(folder, bundle)
        lines.append(f"bundle written: {bundle} ({bundle.stat().st_size:,} bytes; manifest + weights, SHA-256 "
                     "checked on import)")
    if not peft:
        return lines
    problem = peft_export_problem(manifest)
    if problem:
        lines.append(f"no PEFT export: {problem}; only the bundle was written")
        return lines
    delta_type = manifest["delta"]["delta_type"]
    target = peft_folder_for(bundle)
    write_peft_adapter(source, target, manifest, plm_path, ignore_backbone_mismatch)
    lines.append(f"PEFT adapter ({PEFT_METHODS[delta_type]}) written: {target}/ - load it with "
                 f"PeftModel.from_pretrained(backbone, {str(target)!r}); prompt template in {PEFT_TEMPLATE_NAME}")
    return lines


def _export_peft_adapter(source: str | Path, bundle: Path, plm_path: str | None, ignore_backbone_mismatch: bool,
                        template: str | None) -> list[str]:
    """A plain PEFT adapter as an optqa bundle: loaded onto its backbone (which gives the fingerprint), saved as
    a checkpoint in a temporary folder, bundled."""
    import tempfile

    from .build import load_trained
    from .checkpoint import save_checkpoint

    model, manifest, _ = load_trained(source, plm_path=plm_path, ignore_backbone_mismatch=ignore_backbone_mismatch,
                                      template=template)
    kept = {k: v for k, v in manifest.items() if k not in ("files", "pulled_from")}
    with tempfile.TemporaryDirectory(prefix="optqa-peft-import-") as temp:
        folder = save_checkpoint(Path(temp) / "checkpoint", model.delta_state_dict(), kept)
        write_bundle(folder, bundle)
    return [f"bundle written: {bundle} ({bundle.stat().st_size:,} bytes), converted from the PEFT "
            f"{manifest['imported_from']['peft_type']} adapter {source} (its manifest's imported_from names it)"]


def peft_export_problem(manifest: dict[str, Any]) -> str | None:
    """Why PEFT cannot hold this delta (None when it can)."""
    delta_type = manifest["delta"]["delta_type"]
    if delta_type not in PEFT_METHODS:
        return f"PEFT has no {delta_type} method (optqa implements it itself)"
    if _soft_template_pieces(manifest["template"]):
        return "the template has {\"soft\"} tokens, which live in optqa's template, not in a PEFT adapter"
    return None


def _soft_template_pieces(text: str) -> int:
    from .template import parse_template

    return sum(piece.kind == "soft" for piece in parse_template(text, "checkpoint template"))


def write_peft_adapter(source: Path, target: Path, manifest: dict[str, Any], plm_path: str | None,
                       ignore_backbone_mismatch: bool) -> Path:
    """Rebuild the delta on its backbone (checked against the fingerprint) and save it with PEFT's own writer,
    with a model card (README.md) that gives the exact prompt string, in place of PEFT's blank template."""
    from .build import load_trained

    model, _, saved = load_trained(source, plm_path=plm_path, ignore_backbone_mismatch=ignore_backbone_mismatch)
    card = model_card(manifest, model.template.prompt_format(), saved.max_new_tokens, target.name)

    def write(folder: Path) -> None:
        model.delta.model.save_pretrained(str(folder))
        # PEFT stores no prompt format; answers match optqa's only with the same rendering
        (folder / PEFT_TEMPLATE_NAME).write_bytes(manifest["template"].encode("utf-8"))
        (folder / MODEL_CARD_NAME).write_bytes(card.encode("utf-8"))

    return write_folder_atomically(target, write)


MODEL_CARD_NAME = "README.md"


def model_card(manifest: dict[str, Any], prompt: str, max_new_tokens: int, folder_name: str) -> str:
    """The exported PEFT folder's README.md: what the adapter is, the exact prompt, how to load and run it with
    plain transformers + PEFT, how it was trained and how it scored.

    Args:
        manifest: the checkpoint's manifest.
        prompt: the template as a format string with ``{text_a}`` (``ManualTemplate.prompt_format``).
        max_new_tokens: the answer length the delta was used with.
        folder_name: the PEFT folder's name, for the snippet.
    Returns:
        Markdown text with a Hugging Face metadata header.
    """
    from . import __version__

    delta = dict(manifest["delta"])
    method = PEFT_METHODS[delta.pop("delta_type")]
    backbone = manifest["backbone"]
    hyper = manifest.get("hyperparameters") or {}
    training = ", ".join(f"{k} {hyper[k]}" for k in TRAINING_KEYS if k in hyper) or "not recorded"
    base = backbone["name_or_path"]
    return f"""---
base_model: {json.dumps(base)}
library_name: peft
tags:
- optqa
- {method.replace(" ", "-").lower()}
- question-answering
---

# {method} adapter for {base}, direct-answer question answering

Exported by optqa {__version__} from a delta checkpoint (`python -m optqa --mode export`). It answers a question
with a short phrase, greedily decoded after the prompt below.

- **Method**: PEFT {method}, {json.dumps(delta)}
- **Backbone**: `{base}` ({backbone.get("architecture")}); optqa's weight fingerprint
  `{backbone.get("fingerprint")}` (SHA-256 over sampled weights, see optqa's README): any other weights give
  other answers.
- **Training**: {training}; data {hyper.get("train_file") or hyper.get("data_path")}
- **Scores** (SQuAD-style token F1 and exact match, percent): {_metrics_text(manifest.get("metrics") or {})}

## Prompt

The exact prompt string, with the question in place of `{{text_a}}` (the question stripped of surrounding
white space):

```
{prompt}
```

Tokenise it with the backbone's tokenizer as it is (`add_special_tokens=True`: OPT's tokenizer puts its bos
`</s>` first, as optqa does), decode greedily for at most {max_new_tokens} new tokens, and cut the answer at the
first `</s>`. optqa's template for the same prompt is in `{PEFT_TEMPLATE_NAME}`: `{manifest["template"].strip()}`

## Use with transformers + PEFT

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = {json.dumps(prompt)}
tokenizer = AutoTokenizer.from_pretrained({json.dumps(base)})
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({json.dumps(base)}), {json.dumps(folder_name)}).eval()

question = "What is frozen water called?"
inputs = tokenizer(PROMPT.format(text_a=question.strip()), return_tensors="pt")
out = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False, eos_token_id=tokenizer.eos_token_id)
answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
print(answer)
```
"""

