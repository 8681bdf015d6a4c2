"""``--mode export``: a checkpoint as a ``.optqa`` bundle and, where PEFT has the method, as a PEFT adapter
folder (with its model card, ``optqa.sharing.card``) for people who use PEFT directly; a plain PEFT adapter
converted into an optqa bundle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from optqa.build import load_trained
from optqa.checkpoints.bundle import BUNDLE_SUFFIX, default_bundle_path, open_checkpoint, open_source, write_bundle
from optqa.checkpoints.format import MODEL_CARD_NAME, PEFT_TEMPLATE_NAME, read_manifest, write_folder_atomically
from optqa.checkpoints.hub import default_export_name, pin_source
from optqa.config import REGISTRY
from optqa.sharing.card import model_card

PEFT_SUFFIX = "-peft"
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
                       ignore_backbone_mismatch: bool, card: Callable[[str], str] | None = None) -> Path:
    """Rebuild the delta on its backbone (checked against the fingerprint) and save it with PEFT's own writer,
    with the prompt template (``optqa_template.txt``) and a model card (README.md) that gives the exact prompt
    string, in place of PEFT's blank template.

    Args:
        card: the card's text, given the prompt format string (``ManualTemplate.prompt_format``); None: the
            exported folder's own card (``model_card`` naming ``target`` and the recorded backbone).
    Returns:
        The written folder.
    """
    model, _, _ = load_trained(source, plm_path=plm_path, ignore_backbone_mismatch=ignore_backbone_mismatch)
    prompt = model.template.prompt_format()
    text = card(prompt) if card else model_card(manifest, base_model=manifest["backbone"]["name_or_path"],
                                                adapter=target.name, prompt=prompt)

    def write(folder: Path) -> None:
        model.delta.model.save_pretrained(str(folder))
        # PEFT stores no prompt format; answers match optqa's only with the same rendering
        (folder / PEFT_TEMPLATE_NAME).write_bytes(manifest["template"].encode("utf-8"))
        (folder / MODEL_CARD_NAME).write_text(text, encoding="utf-8", newline="\n")

    return write_folder_atomically(target, write)
