"""Building a model: backbone + delta + template + ``PromptForGeneration``, from a run config (training, the
OpenDelta import) or from a verified checkpoint (answering, evaluate, serve, export): the one load path, whose
backbone check is ``optqa.checkpoints.format.check_backbone``."""
from __future__ import annotations

import logging
from copy import deepcopy
from pathlib import Path
from typing import Any

from torch import nn

from optqa.checkpoints.format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_TEMPLATE_NAME,
    backbone_record,
    check_backbone,
    read_checkpoint,
    recorded_config,
    sha256_file,
)
from optqa.checkpoints.peft import base_model_record, delta_config_from_peft, is_peft_adapter, read_adapter_config
from optqa.config import REGISTRY, REPO_ROOT, RunConfig, find_repo_file
from optqa.deltas import AutoDeltaConfig, AutoDeltaModel, attached_delta
from optqa.errors import OptqaError
from optqa.model import PromptForGeneration
from optqa.options import check_length_budget
from optqa.plm import load_plm, max_positions_of
from optqa.template import ManualTemplate, read_template_file

log = logging.getLogger(__name__)


def template_text(config: RunConfig) -> str:
    """--template is a file or inline text; checkpoints store the text itself."""
    if "{" in config.template:
        return config.template
    path = find_repo_file(config.template)
    if path is None or not path.is_file():
        raise OptqaError(f"template file not found: {config.template} (looked in {Path.cwd()} and {REPO_ROOT})")
    return read_template_file(path)


def assemble(plm, tokenizer, delta_config: dict, text: str, source: str, config: RunConfig, delta=None):
    """The one assembly of a prompt model: ``delta_config``'s delta attached to ``plm`` (in place) and the template
    ``text`` around it.

    Args:
        plm, tokenizer: a backbone without a delta (``load_plm``) and its tokenizer.
        delta_config: an AutoDeltaConfig dict (a run's ``delta_config()`` or a manifest's ``delta``).
        text: the template text; ``source`` names it in error messages.
        config: ``max_seq_l``, ``max_new_tokens`` and ``chat_template`` come from it.
        delta: the delta already on ``plm`` (``fold_lora``'s merged LoRA); None: attach ``delta_config``'s.
    Returns:
        ``(model, delta)``: the ``PromptForGeneration`` and its delta model.
    Raises:
        OptqaError: an invalid delta config or template.
    """
    if delta is None:
        delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(delta_config), backbone_model=plm,
                                           tokenizer=tokenizer)
    template = ManualTemplate(tokenizer, text=text, source=source, embedding=plm.get_input_embeddings())
    model = PromptForGeneration(plm, template, tokenizer=tokenizer, max_seq_length=config.max_seq_l,
                                max_new_tokens=config.max_new_tokens)
    # a delta trained in the chat format records it (hyperparameters) and answers in it wherever it is loaded
    model.wrapper.use_chat_template(config.chat_template)
    return model, delta


def build_model(config: RunConfig, delta_config: dict | None = None, template: str | None = None,
                source: str | None = None):
    """Load the backbone, fingerprint it, attach the delta, wrap it for prompting.

    Args:
        config: the run (backbone, delta flags, template, lengths).
        delta_config: another AutoDeltaConfig dict than the run's (an imported checkpoint's).
        template: template text to use instead of ``config.template``'s; ``source`` names it in errors.
    Returns:
        ``(model, backbone)``: the ``PromptForGeneration`` and the identity dict (with fingerprint) a checkpoint
        records.
    """
    plm, tokenizer, _, _ = load_plm(config.plm_name, config.plm_path)
    backbone = backbone_record(plm, config.plm_path)
    text = template if template is not None else template_text(config)
    model, delta = assemble(plm, tokenizer, delta_config or config.delta_config(), text,
                            source or (config.template if template is None else "template"), config)
    log.info(delta.summary())
    log.info("template: %s", text.strip())
    return model, backbone


def read_verified(path: str | Path) -> tuple[Path, dict, dict]:
    """Verify an optqa checkpoint and read it: ``(folder, manifest, delta tensors)``.

    Args:
        path: a checkpoint folder, a ``.optqa`` bundle or ``hf://OWNER/NAME[@REVISION]`` (pulled into the Hugging
            Face cache; the manifest then carries ``pulled_from``: repository, revision, commit, in memory only).
    Raises:
        OptqaError: the folder, bundle, manifest or any hash does not check out, a Hub name cannot be pulled, or
            the path is a plain PEFT adapter (``load_trained`` reads those, given a template).
    """
    from optqa.checkpoints.bundle import open_source

    with open_source(path) as (folder, pulled):
        return _read_opened(folder, pulled, path)


def _read_opened(folder: Path, pulled, path: str | Path) -> tuple[Path, dict, dict]:
    """``read_checkpoint`` on an opened source (``open_source``); a pulled one's manifest records where from."""
    if is_peft_adapter(folder):
        raise OptqaError(f"{path} is a plain PEFT adapter, not an optqa checkpoint: convert it first with "
                         f"python -m optqa --mode export --delta_save_path {path} --template TEMPLATE")
    folder, manifest, state = read_checkpoint(folder)
    if pulled:
        manifest["pulled_from"] = pulled.as_dict()
    return folder, manifest, state


def checkpoint_config(manifest: dict, overrides: dict | None = None) -> RunConfig:
    """The run settings a checkpoint recorded, with ``overrides`` (flags the user typed) on top.

    Raises:
        OptqaError: a value of the wrong type, choice or range (``read_manifest`` has checked a read checkpoint's
            own; this catches a caller's overrides and a manifest made in memory).
    """
    return recorded_config({**manifest["hyperparameters"], **(overrides or {})}, "")


def check_checkpoint_budget(config: RunConfig, manifest: dict, plm_path: str) -> None:
    """The manifest records the backbone's config: the length budget is checked before its weights are read."""
    check_length_budget(config, max_positions_of(manifest["backbone"]["config"]), plm_path, manifest["delta"])


def attach_checkpoint(plm, tokenizer, folder: Path, manifest: dict, state: dict,
                      config: RunConfig, merge_lora: bool = False, answer_only: bool = False) -> PromptForGeneration:
    """Attach a verified checkpoint's delta to ``plm`` (in place) and load its weights.

    Args:
        plm: a backbone that carries no delta yet and has passed ``check_backbone`` for this manifest.
        folder, manifest, state: what ``read_verified`` returned.
        config: the checkpoint's settings (``checkpoint_config``): max_seq_l and max_new_tokens.
        merge_lora: a LoRA is merged into the backbone's weights (``fold_lora``, no PEFT): the model answers
            only (it cannot train, save or unmerge); implies ``answer_only``.
        answer_only: the model only answers: its delta type's method attaches it for that
            (``DeltaMethod.attach_for_answering``: a soft prompt or prefix is read into a plain table, no PEFT);
            it cannot train or be exported in PEFT's format.
    Returns:
        The model in eval mode, answering with the checkpoint's template.
    Raises:
        OptqaError: the weights do not fit the delta the manifest describes.
    """
    delta = None
    delta_config = AutoDeltaConfig.from_dict(manifest["delta"])
    if merge_lora or answer_only:
        method = REGISTRY[delta_config.delta_type].implementation()
        attached = method.attach_for_answering(delta_config, plm, state, str(folder), merge=merge_lora)
        if attached is not None:
            delta, state = attached
    model, _ = assemble(plm, tokenizer, manifest["delta"], manifest["template"], f"{folder} template", config,
                        delta=delta)
    model.load_delta_state_dict(state, source=str(folder))
    model.eval()
    return model


def load_trained(path: str | Path, plm_path: str | None = None, ignore_backbone_mismatch: bool = False,
                 overrides: dict | None = None, template: str | None = None, merge_lora: bool = False,
                 answer_only: bool = False):
    """Rebuild a trained model from a checkpoint alone: a folder, a ``.optqa`` bundle, ``hf://OWNER/NAME[@REV]``
    (pulled into the Hugging Face cache), or a plain PEFT adapter folder or repository.

    The backbone comes from the manifest unless ``plm_path`` names another copy; either way its identity and
    fingerprint must match the checkpoint's. A PEFT adapter has no manifest: its template comes from
    ``template`` (text or file), its backbone is checked by name (see :mod:`optqa.checkpoints.peft`).

    Args:
        path: a checkpoint folder, a ``.optqa`` bundle, ``hf://OWNER/NAME[@REVISION]`` or a PEFT adapter folder.
        plm_path: another copy of the backbone (hub id or folder); default the one the manifest records.
        ignore_backbone_mismatch: load onto a backbone whose weights differ (shapes must still match).
        overrides: run settings that replace the recorded ones (``max_new_tokens``, ``eval_batch_size``,
            ``precision``).
        template: a PEFT adapter's template (text or file); checkpoints carry their own.
        merge_lora: an optqa LoRA checkpoint is merged into the backbone without PEFT, for answering only
            (``attach_checkpoint``); a plain PEFT adapter stays unmerged here.
        answer_only: the model only answers (the question loop, evaluate, serve): an optqa soft prompt or prefix
            checkpoint is applied without PEFT (``attach_checkpoint``); a plain PEFT adapter keeps PEFT.
    Returns:
        ``(model, manifest, config)``: a ``PromptForGeneration`` in eval mode, the manifest dict (a pulled delta's
        carries ``pulled_from``: repository, revision, commit; in memory only), and the ``RunConfig`` it was
        rebuilt with (``config.plm_path`` is the backbone actually used).
    Raises:
        OptqaError: a checkpoint that fails its integrity or backbone checks, prompts and answers that would not
            fit the backbone's positions, or a Hub name that cannot be pulled.
    """
    from optqa.checkpoints.bundle import open_source

    with open_source(path) as (folder, pulled):
        if is_peft_adapter(folder):
            config = RunConfig.from_dict(overrides or {})
            model, manifest = load_peft_adapter(folder, str(path), config, template, plm_path,
                                                ignore_backbone_mismatch, pulled.as_dict() if pulled else None)
            if pulled:
                manifest["pulled_from"] = pulled.as_dict()
            return model, manifest, config
        folder, manifest, state = _read_opened(folder, pulled, path)
    config = checkpoint_config(manifest, overrides)
    config.plm_path = plm_path or manifest["backbone"]["name_or_path"]
    check_checkpoint_budget(config, manifest, config.plm_path)
    plm, tokenizer, _, _ = load_plm(config.plm_name, config.plm_path)
    check_backbone(manifest, backbone_record(plm, config.plm_path), ignore_mismatch=ignore_backbone_mismatch)
    model = attach_checkpoint(plm, tokenizer, folder, manifest, state, config, merge_lora, answer_only)
    return model, manifest, config


def shared_copy(plm: nn.Module) -> nn.Module:
    """A structural copy of ``plm`` whose every parameter and buffer *is* the original's tensor.

    Deltas attach in place (optqa's and PEFT's wrapper modules, new submodules), so each delta served next to others
    gets its own module tree; the trees share the weights, so N deltas cost one backbone plus N deltas.
    ``plm`` must not carry a delta or hooks yet (they would be copied too).

    Raises:
        OptqaError: ``plm`` already carries a delta.
    """
    if attached_delta(plm) is not None:
        raise OptqaError("shared_copy needs a backbone without a delta")
    tensors = [*plm.parameters(), *plm.buffers()]
    copy = deepcopy(plm, memo={id(t): t for t in tensors})
    if any(a is not b for a, b in zip(tensors, [*copy.parameters(), *copy.buffers()])):
        raise RuntimeError("a copied backbone holds a tensor of its own")  # deepcopy's memo contract broke
    return copy


def load_shared(paths: dict[str, str | Path], plm_path: str | None = None, ignore_backbone_mismatch: bool = False,
                overrides: dict | None = None) -> dict[str, tuple[PromptForGeneration, dict, RunConfig]]:
    """Several checkpoints on one backbone, each verified as ``load_trained`` verifies one.

    Every checkpoint is read and hash-checked first (no backbone needed, so a bad file fails in seconds), then
    the backbone is loaded once (``plm_path``, else the first checkpoint's recorded backbone), fingerprinted
    once, checked against every manifest, and each delta is attached to its own ``shared_copy``.

    Args:
        paths: served name -> checkpoint folder or bundle, in the order to serve them.
    Returns:
        name -> ``(model, manifest, config)``, in the order of ``paths``.
    Raises:
        OptqaError: a checkpoint fails its checks (the message names it), or the backbone cannot be loaded.
    """
    read = {}
    for name, path in paths.items():
        try:
            read[name] = read_verified(path)
        except OptqaError as exc:
            raise OptqaError(f"delta {name!r} refused: {exc}") from exc
    first = next(iter(read.values()))[1]
    backbone_path = plm_path or first["backbone"]["name_or_path"]
    base = checkpoint_config(first, overrides)
    for name, (_, manifest, _) in read.items():
        try:
            check_checkpoint_budget(checkpoint_config(manifest, overrides), manifest, backbone_path)
        except OptqaError as exc:
            raise OptqaError(f"delta {name!r} refused: {exc}") from exc
    plm, tokenizer, _, _ = load_plm(base.plm_name, backbone_path)
    backbone = backbone_record(plm, backbone_path)
    models = {}
    for name, (folder, manifest, state) in read.items():
        try:
            check_backbone(manifest, backbone, ignore_mismatch=ignore_backbone_mismatch)
        except OptqaError as exc:
            raise OptqaError(f"delta {name!r} refused: {exc}") from exc
        config = checkpoint_config(manifest, overrides)
        config.plm_path = backbone_path
        models[name] = (attach_checkpoint(shared_copy(plm), tokenizer, folder, manifest, state, config,
                                          answer_only=True), manifest, config)
    return models


def load_peft_adapter(folder: Path, source: str, config, template: str | None, plm_path: str | None,
                      ignore_mismatch: bool, pulled: dict[str, Any] | None = None):
    """Build the backbone with optqa's counterpart of the adapter and load the adapter's weights into it.

    Args:
        folder: the adapter folder (a local folder or a pulled snapshot).
        source: what the user named (shown in messages and recorded in the manifest).
        config: the RunConfig to build with (its plm_path is set here).
        template: template text or file (``--template``); None: the folder's optqa_template.txt.
        plm_path: the backbone to use instead of the adapter's ``base_model_name_or_path``.
        ignore_mismatch: load onto a backbone of another name anyway.
        pulled: the Hub repository, revision and commit, when pulled.

    Returns:
        ``(model, manifest)``: the ready model and an optqa manifest (``files`` empty: nothing written yet)
        whose ``imported_from`` names the source and the SHA-256 of the adapter files.

    Raises:
        OptqaError: no template, another backbone, unsupported options, or weights that do not fit.
    """
    from optqa.checkpoints.format import build_manifest

    adapter_config = read_adapter_config(folder)
    delta = delta_config_from_peft(adapter_config, source)
    if template is None:
        if not (folder / PEFT_TEMPLATE_NAME).is_file():
            raise OptqaError(f"{source} is a plain PEFT adapter, which records no prompt format: pass --template "
                             "with the template it was trained with (e.g. templates/answer_template.txt)")
        template = read_template_file(folder / PEFT_TEMPLATE_NAME)
    config.template = template
    text = template_text(config)
    config.plm_path = plm_path or adapter_config.get("base_model_name_or_path") or ""
    if not config.plm_path:
        raise OptqaError(f"{source}: the adapter names no base model; pass --plm_path")
    # by name, before the backbone loads: a PEFT adapter records no fingerprint
    check_backbone(base_model_record(adapter_config), {"name_or_path": config.plm_path},
                   ignore_mismatch=ignore_mismatch, source=source)
    config.delta_type = delta["delta_type"]
    model, backbone = build_model(config, delta_config=delta, template=text)
    count = _load_adapter_weights(model, folder, source, delta, config.plm_path)
    model.eval()
    log.info("loaded PEFT %s adapter %s onto %s (%d tensors); no optqa manifest, so no file hashes to verify",
             adapter_config["peft_type"], source, config.plm_path, count)
    manifest = build_manifest(delta_config=model.delta.config.to_dict(), template_text=text, backbone=backbone,
                              hyperparameters={**config.to_dict(), **delta, "mode": "import_peft"}, metrics={},
                              trainable_parameters=model.num_trainable_parameters())
    manifest["imported_from"] = {
        "format": "PEFT", "path": source, "peft_type": adapter_config["peft_type"],
        "peft_version": adapter_config.get("peft_version"),
        "base_model_name_or_path": adapter_config.get("base_model_name_or_path"),
        **({"hub": pulled} if pulled else {}),
        f"{ADAPTER_CONFIG_NAME}_sha256": sha256_file(folder / ADAPTER_CONFIG_NAME),
        f"{ADAPTER_WEIGHTS_NAME}_sha256": sha256_file(folder / ADAPTER_WEIGHTS_NAME),
    }
    return model, manifest


def _load_adapter_weights(model: PromptForGeneration, folder: Path, source: str, delta: dict, plm_path: str) -> int:
    """The adapter's safetensors weights into ``model``'s delta with PEFT's own ``set_peft_model_state_dict``;
    returns how many tensors it held.

    Raises:
        OptqaError: weights that do not fit the backbone, or a tensor unexpected or missing.
    """
    import torch
    from peft import set_peft_model_state_dict

    from optqa.checkpoints.format import load_safetensors
    from optqa.deltas import is_delta_parameter

    weights = load_safetensors(folder / ADAPTER_WEIGHTS_NAME)
    try:
        result = set_peft_model_state_dict(model.delta.model, weights)
    except RuntimeError as exc:  # shapes that do not fit this backbone
        raise OptqaError(f"{source}: the adapter's weights do not fit {plm_path} "
                         f"({str(exc).strip().splitlines()[-1].strip()})") from None
    unexpected = list(result.unexpected_keys)
    missing = sorted(k for k in result.missing_keys if is_delta_parameter(k))
    if REGISTRY[delta["delta_type"]].virtual_tokens:
        # PEFT loads a prompt-learning adapter's one tensor (prompt_embeddings) into its prompt encoder itself,
        # outside load_state_dict: check it arrived instead of trusting the two lists
        unexpected = [k for k in unexpected if k != "prompt_embeddings"]
        missing = [k for k in missing if "prompt_encoder." not in k]
        loaded = [v for k, v in model.delta_state_dict().items() if "prompt_encoder." in k]
        if len(loaded) != 1 or "prompt_embeddings" not in weights or not torch.equal(
                loaded[0].cpu().float(), weights["prompt_embeddings"].float()):
            raise OptqaError(f"{source}: the adapter's prompt_embeddings did not load into optqa's "
                             f"{delta['delta_type']}")
    if unexpected or missing:
        name = (unexpected or missing)[0]
        raise OptqaError(f"{source}: {'unexpected' if unexpected else 'missing'} adapter tensor {name} "
                         f"for {delta['delta_type']} on {plm_path}")
    return len(weights)
