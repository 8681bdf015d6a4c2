"""``--mode inspect`` and ``--mode export``: describe, verify and share checkpoints.

Inspecting reads only the manifest and the safetensors header (a JSON block at the start of the file), so it
never loads the backbone and never imports transformers or PEFT. Exporting writes a ``.optqa`` bundle and,
where PEFT has the method, a PEFT adapter folder for people who use PEFT directly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optqa.checkpoints.bundle import BUNDLE_SUFFIX, default_bundle_path, open_checkpoint, open_source, write_bundle
from optqa.checkpoints.format import read_manifest, write_folder_atomically
from optqa.checkpoints.hub import default_export_name, pin_source
from optqa.checkpoints.inspect import metrics_text, training_text
from optqa.config import REGISTRY

PEFT_SUFFIX = "-peft"
PEFT_TEMPLATE_NAME = "optqa_template.txt"
# Delta types PEFT implements, by the name cards give them (the registry's); optqa implements the others itself.
PEFT_METHODS = {name: entry.title for name, entry in REGISTRY.items() if entry.peft_type}


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
    from optqa.checkpoints.peft import is_peft_adapter

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

    from optqa.checkpoints.assemble import load_trained
    from optqa.checkpoints.format import save_checkpoint

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
    from optqa.template import parse_template

    return sum(piece.kind == "soft" for piece in parse_template(text, "checkpoint template"))


def write_peft_adapter(source: Path, target: Path, manifest: dict[str, Any], plm_path: str | None,
                       ignore_backbone_mismatch: bool) -> Path:
    """Rebuild the delta on its backbone (checked against the fingerprint) and save it with PEFT's own writer,
    with a model card (README.md) that gives the exact prompt string, in place of PEFT's blank template."""
    from optqa.checkpoints.assemble import load_trained

    model, _, saved = load_trained(source, plm_path=plm_path, ignore_backbone_mismatch=ignore_backbone_mismatch)
    card = model_card(manifest, model.template.prompt_format(), saved.max_new_tokens, target.name)

    def write(folder: Path) -> None:
        model.delta.model.save_pretrained(str(folder))
        # PEFT stores no prompt format; answers match optqa's only with the same rendering
        (folder / PEFT_TEMPLATE_NAME).write_bytes(manifest["template"].encode("utf-8"))
        (folder / MODEL_CARD_NAME).write_bytes(card.encode("utf-8"))

    return write_folder_atomically(target, write)


MODEL_CARD_NAME = "README.md"


def python_string(text: str) -> str:
    """``text`` as a Python string literal for a card's code: JSON's escapes are Python's (quotes, backslashes,
    control characters), and with non-ASCII characters kept as they are, none beyond U+FFFF turns into the pair
    of surrogate escapes JSON would write (which Python reads as two lone surrogates)."""
    return json.dumps(text, ensure_ascii=False)


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
    from optqa import __version__

    delta = dict(manifest["delta"])
    method = PEFT_METHODS[delta.pop("delta_type")]
    backbone = manifest["backbone"]
    hyper = manifest.get("hyperparameters") or {}
    training = training_text(hyper) or "not recorded"
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
  `{backbone.get("fingerprint")}` (SHA-256 over sampled weights, see optqa's docs/checkpoints.md): any other
  weights give other answers.
- **Training**: {training}; data {hyper.get("train_file") or hyper.get("data_path")}
- **Scores** (SQuAD-style token F1 and exact match, percent): {metrics_text(manifest.get("metrics") or {})}

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

PROMPT = {python_string(prompt)}
tokenizer = AutoTokenizer.from_pretrained({json.dumps(base)})
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({json.dumps(base)}), {json.dumps(folder_name)}).eval()

question = "What is frozen water called?"
inputs = tokenizer(PROMPT.format(text_a=question.strip()), return_tensors="pt")
out = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False, eos_token_id=tokenizer.eos_token_id)
answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
print(answer)
```
"""

