"""OpenDelta's ``save_finetuned`` / ``from_finetuned`` and raw ``save_checkpoint`` / ``load_checkpoint``, on
optqa's checkpoint format.

``save_finetuned`` writes the same hash-checked folder as ``--mode train`` (``optqa/checkpoints/format.py``): the
delta's weights as safetensors and a manifest with the delta config, template text, backbone identity and
weight fingerprint and every file's SHA-256; so ``--mode interactive_inference``, ``inspect``, ``export`` and
``evaluate`` take it as they take a trained one. ``from_finetuned`` verifies the files and the backbone before
a single weight is loaded. Tensor names are those of a ``PromptForGeneration``'s ``delta_state_dict()``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optqa.deltas import AutoDeltaModel as CoreAutoDeltaModel
from optqa.deltas import DeltaModel, _layout, _whole, load_delta_state, named_delta_parameters
from optqa.errors import OptqaError

log = logging.getLogger(__name__)

HASH_CHECK_PASSED = "Hash-check passed. You can safely use this checkpoint directly."
PUSH_COMMAND = "python -m optqa --mode push --delta_save_path {path} --hub_repo OWNER/NAME"
TEMPLATE_PREFIX = "template."


def _state_and_settings(delta: DeltaModel) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """What a checkpoint of ``delta`` holds: the bound PromptForGeneration's delta (with its template's soft
    tokens), template text and lengths; without one, the delta alone and the default template."""
    from optqa.build import template_text
    from optqa.config import RunConfig

    prompt = delta.prompt_model
    if prompt is not None:
        return (prompt.delta_state_dict(), prompt.template.text,
                {"max_seq_l": prompt.wrapper.max_seq_length, "max_new_tokens": prompt.max_new_tokens})
    return {n: _whole(p) for n, p in named_delta_parameters(delta)}, template_text(RunConfig()), {}


def _run_settings(delta: DeltaModel, name_or_path: str, text: str, lengths: dict[str, Any]) -> dict[str, Any]:
    """RunConfig fields the CLI needs to rebuild the model from the checkpoint alone (backbone, delta, template,
    lengths). A script's training settings are its own and unknown here, so none are recorded."""
    from optqa.config import RunConfig

    fields = RunConfig().to_dict()
    settings: dict[str, Any] = {"plm_name": fields["plm_name"], "delta_type": delta.config.delta_type}
    for key, value in delta.config.to_dict().items():
        key = "soft_init_text" if key == "init_text" else key
        if key in fields and value is not None:
            settings[key] = value
    settings.update(lengths, plm_path=name_or_path, template=text, mode="save_finetuned")
    return settings


def backbone_name(plm: nn.Module) -> str:
    """The folder or hub name the backbone was loaded from (transformers records it)."""
    return str(getattr(plm, "name_or_path", "") or getattr(plm.config, "_name_or_path", "") or "unknown")


def save_finetuned(delta: DeltaModel, finetuned_delta_path: str | Path = "./delta_checkpoints/",
                   save_config: bool = True, state_dict: dict | None = None, save_function=None,
                   push_to_dc: bool = False, center_args: dict | None = None, center_args_pool: dict | None = None,
                   list_tags: list | None = None, dict_tags: dict | None = None, delay_push: bool = False,
                   test_result: Any = None, usage: str = "") -> Path:
    """Write ``delta`` as an optqa checkpoint folder (atomically; a killed save keeps the previous one).

    Args:
        finetuned_delta_path: the folder (created, or replaced if it holds an optqa checkpoint).
        push_to_dc: after saving, log the command that shares the folder on the Hugging Face Hub (OpenDelta's
            DeltaCenter no longer exists).
        center_args, center_args_pool, list_tags, dict_tags, usage: DeltaCenter's descriptive fields, kept in
            the manifest under ``delta_center``; ``test_result`` goes into its ``metrics``.
        save_config, state_dict, save_function: OpenDelta's; the manifest is always written and the delta's
            own weights always saved as safetensors, so other values are refused.

    Returns:
        The checkpoint folder.

    Raises:
        OptqaError: ``save_config=False``, a ``state_dict`` or a ``save_function`` other than ``torch.save``,
            or a folder that holds something other than an optqa checkpoint.
    """
    from optqa.checkpoints.format import WEIGHTS_NAME, backbone_record, build_manifest, save_checkpoint

    if not save_config or state_dict is not None or save_function not in (None, torch.save):
        raise OptqaError("save_finetuned: optqa always writes the manifest and the delta's own weights as "
                         "safetensors; drop save_config/state_dict/save_function")
    state, text, lengths = _state_and_settings(delta)
    plm = delta.backbone_model
    name = backbone_name(plm)
    manifest = build_manifest(
        delta_config=delta.config.to_dict(), template_text=text,
        backbone=backbone_record(plm, name),
        hyperparameters=_run_settings(delta, name, text, lengths),
        metrics={} if test_result is None else {"test_result": test_result},
        trainable_parameters=sum(v.numel() for v in state.values()))
    manifest["delta_center"] = {"center_args": center_args or {}, "center_args_pool": center_args_pool or {},
                                "list_tags": list_tags or [], "dict_tags": dict_tags or {}, "usage": usage}
    folder = save_checkpoint(finetuned_delta_path, state, manifest)
    log.info("delta saved to %s (%d bytes of weights)", folder, (folder / WEIGHTS_NAME).stat().st_size)
    if push_to_dc:
        log.warning("push_to_dc: OpenDelta's DeltaCenter is gone; share the checkpoint on the Hugging Face Hub "
                    "with: %s", PUSH_COMMAND.format(path=folder))
    return folder


def from_finetuned(finetuned_delta_path: str | Path, backbone_model: nn.Module, delta_config=None,
                   cache_dir=None, local_files_only: bool = True, check_hash: bool = True, **kwargs) -> DeltaModel:
    """Verify an optqa checkpoint (folder or ``.optqa`` bundle), then attach and load its delta onto
    ``backbone_model``.

    Every listed file's size and SHA-256 is checked, then the backbone's architecture, shape-defining
    config and weight fingerprint against the manifest; only then is the delta built and loaded. Logs
    "Hash-check passed. You can safely use this checkpoint directly." when all of it matched. A template's
    soft tokens saved in the checkpoint are loaded into the template of the next ``PromptForGeneration``
    built on this backbone.

    Args:
        check_hash: False loads onto a backbone whose weights differ (with a warning); the files' hashes and
            the architecture are checked regardless.
        delta_config, cache_dir, local_files_only: OpenDelta's; the checkpoint's own config is used and
            only local folders are read, so other values are refused.

    Returns:
        The delta model, attached to ``backbone_model`` (``delta_model.manifest`` holds the manifest).

    Raises:
        OptqaError: a modified, missing or truncated file (naming it and the reason), a delta for another
            backbone, or refused arguments.
    """
    from optqa.checkpoints.bundle import open_checkpoint
    from optqa.checkpoints.format import backbone_record, check_backbone, read_checkpoint

    given = {"delta_config": delta_config is not None, "cache_dir": cache_dir is not None,
             "local_files_only=False": not local_files_only}
    refused = [name for name, present in given.items() if present] + sorted(kwargs)
    if refused:
        raise OptqaError("from_finetuned reads a local optqa checkpoint with its own delta config; not supported: "
                         + ", ".join(refused))
    with open_checkpoint(finetuned_delta_path) as folder:
        folder, manifest, state = read_checkpoint(folder)
    same_weights = check_backbone(manifest, backbone_record(backbone_model, backbone_name(backbone_model)),
                                  ignore_mismatch=not check_hash)
    delta = AutoDeltaModel.from_config(manifest["delta"], backbone_model=backbone_model)
    own = {k: v for k, v in state.items() if not k.startswith(TEMPLATE_PREFIX)}
    load_delta_state(_layout(delta), own, str(folder))
    delta.manifest = manifest
    template_state = {k[len(TEMPLATE_PREFIX):]: v for k, v in state.items() if k.startswith(TEMPLATE_PREFIX)}
    if template_state:
        delta.pending_template_state = (template_state, str(folder))
    if same_weights:
        log.info(HASH_CHECK_PASSED)
    return delta


def _raw_file(path: str | Path) -> Path:
    from optqa.checkpoints.format import WEIGHTS_NAME

    path = Path(path)
    return path / WEIGHTS_NAME if path.is_dir() or not path.suffix else path


def save_raw(delta: DeltaModel, path: str | Path) -> Path:
    """The delta's tensors (with a bound template's soft tokens) as one safetensors file, no manifest: a
    folder path gets ``delta_model.safetensors`` inside it. Returns the file.

    Raises:
        OptqaError: the file could not be written (disk full, no permission); the previous one is kept.
    """
    from safetensors.torch import save_file

    from optqa.checkpoints.format import write_failures_as_errors

    state, _, _ = _state_and_settings(delta)
    target = _raw_file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with write_failures_as_errors(target, lambda: f"the previous file {target}" if target.is_file() else None):
        try:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(partial))
            os.replace(partial, target)  # a killed save leaves the previous file whole
        finally:
            partial.unlink(missing_ok=True)
    return target


def load_raw(delta: DeltaModel, path: str | Path) -> None:
    """Load what :func:`save_raw` wrote back into ``delta`` (and its bound template).

    Raises:
        OptqaError: a missing or malformed file, or tensors that do not fit this delta.
    """
    from optqa.checkpoints.format import load_safetensors

    source = _raw_file(path)
    if not source.is_file():
        raise OptqaError(f"load_checkpoint: no raw delta at {source}")
    state = load_safetensors(source)
    prompt = delta.prompt_model
    load_delta_state(prompt if prompt is not None else _layout(delta), state, str(source))


class OpenDeltaModel(DeltaModel):
    """A delta model with OpenDelta's saving calls: ``save_finetuned``, ``save_checkpoint``, ``load_checkpoint``."""

    def __init__(self, *args, **kwargs):
        """``DeltaModel``'s arguments; ``manifest`` is None until ``from_finetuned`` sets it."""
        super().__init__(*args, **kwargs)
        self.manifest: dict[str, Any] | None = None  # the checkpoint's manifest, when from_finetuned built it

    def save_finetuned(self, finetuned_delta_path: str | Path = "./delta_checkpoints/", *args, **kwargs) -> Path:
        """OpenDelta's ``save_finetuned``: an optqa checkpoint folder; see :func:`save_finetuned`."""
        return save_finetuned(self, finetuned_delta_path, *args, **kwargs)

    def save_checkpoint(self, path: str | Path) -> Path:
        """The raw delta (one safetensors file, no manifest); see :func:`save_raw`."""
        return save_raw(self, path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a raw delta written by ``save_checkpoint``; see :func:`load_raw`."""
        load_raw(self, path)


class AutoDeltaModel(CoreAutoDeltaModel):
    """OpenDelta's ``AutoDeltaModel``: ``from_config`` returns an ``OpenDeltaModel``; ``from_finetuned`` verifies
    a saved delta before attaching it."""

    delta_model_class = OpenDeltaModel

    @staticmethod
    def from_finetuned(finetuned_delta_path: str | Path, backbone_model: nn.Module, *args, **kwargs) -> OpenDeltaModel:
        """See :func:`from_finetuned`."""
        return from_finetuned(finetuned_delta_path, backbone_model, *args, **kwargs)
