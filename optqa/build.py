"""Assemble backbone + delta + template + PromptForGeneration, from a run config or from a checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path

from .checkpoint import backbone_fingerprint, check_backbone, read_checkpoint
from .config import REPO_ROOT, RunConfig, find_repo_file
from .deltas import AutoDeltaConfig, AutoDeltaModel
from .errors import OptqaError
from .model import PromptForGeneration
from .options import check_length_budget
from .plm import backbone_identity, load_plm, max_positions_of
from .template import ManualTemplate

log = logging.getLogger(__name__)


def template_text(config: RunConfig) -> str:
    """--template is a file or inline text; checkpoints store the text itself."""
    if "{" in config.template:
        return config.template
    path = find_repo_file(config.template)
    if path is None or not path.is_file():
        raise OptqaError(f"template file not found: {config.template} (looked in {Path.cwd()} and {REPO_ROOT})")
    return path.read_text(encoding="utf-8")


def build_model(config: RunConfig, delta_config: dict | None = None, template: str | None = None):
    """Load the backbone, fingerprint it, attach the delta, wrap it for prompting.

    Returns ``(model, backbone)`` where backbone is the identity dict (with fingerprint) a checkpoint records.
    """
    plm, tokenizer, _, _ = load_plm(config.plm_name, config.plm_path)
    backbone = {**backbone_identity(plm, config.plm_path), "fingerprint": backbone_fingerprint(plm)}
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(delta_config or config.delta_config()),
                                       backbone_model=plm, tokenizer=tokenizer)
    text = template if template is not None else template_text(config)
    prompt_template = ManualTemplate(tokenizer, text=text, source=config.template if template is None else "template",
                                     embedding=plm.get_input_embeddings())
    model = PromptForGeneration(plm, prompt_template, tokenizer=tokenizer, max_seq_length=config.max_seq_l,
                                max_new_tokens=config.max_new_tokens)
    log.info(delta.summary())
    log.info("template: %s", text.strip())
    return model, backbone


def load_trained(path: str | Path, plm_path: str | None = None, ignore_backbone_mismatch: bool = False,
                 overrides: dict | None = None, template: str | None = None):
    """Rebuild a trained model from a checkpoint alone: a folder, a ``.optqa`` bundle, ``hf://OWNER/NAME[@REV]``
    (pulled into the Hugging Face cache), or a plain PEFT adapter folder or repository.

    The backbone comes from the manifest unless ``plm_path`` names another copy; either way its identity and
    fingerprint must match the checkpoint's. A PEFT adapter has no manifest: its template comes from
    ``template`` (text or file), its backbone is checked by name (see :mod:`optqa.peft_import`).

    Args:
        path: a checkpoint folder, a ``.optqa`` bundle, ``hf://OWNER/NAME[@REVISION]`` or a PEFT adapter folder.
        plm_path: another copy of the backbone (hub id or folder); default the one the manifest records.
        ignore_backbone_mismatch: load onto a backbone whose weights differ (shapes must still match).
        overrides: run settings that replace the recorded ones (``max_new_tokens``, ``eval_batch_size``,
            ``precision``).
        template: a PEFT adapter's template (text or file); checkpoints carry their own.
    Returns:
        ``(model, manifest, config)``: a ``PromptForGeneration`` in eval mode, the manifest dict (a pulled delta's
        carries ``pulled_from``: repository, revision, commit; in memory only), and the ``RunConfig`` it was
        rebuilt with (``config.plm_path`` is the backbone actually used).
    Raises:
        OptqaError: a checkpoint that fails its integrity or backbone checks, prompts and answers that would not
            fit the backbone's positions, or a Hub name that cannot be pulled.
    """
    from .bundle import open_source
    from .peft_import import is_peft_adapter, load_peft_adapter

    with open_source(path) as (folder, pulled):
        if is_peft_adapter(folder):
            config = RunConfig.from_dict(overrides or {})
            model, manifest = load_peft_adapter(folder, str(path), config, template, plm_path,
                                                ignore_backbone_mismatch, pulled.as_dict() if pulled else None)
            if pulled:
                manifest["pulled_from"] = pulled.as_dict()
            return model, manifest, config
        folder, manifest, state = read_checkpoint(folder)
    if pulled:
        manifest["pulled_from"] = pulled.as_dict()
    config = RunConfig.from_dict({**manifest["hyperparameters"], **(overrides or {})})
    config.plm_path = plm_path or manifest["backbone"]["name_or_path"]
    # the manifest records the backbone's config: the budget is checked before its weights are read
    check_length_budget(config, max_positions_of(manifest["backbone"]["config"]), config.plm_path, manifest["delta"])
    plm, tokenizer, _, _ = load_plm(config.plm_name, config.plm_path)
    identity = backbone_identity(plm, config.plm_path)
    check_backbone(manifest, identity, backbone_fingerprint(plm), ignore_backbone_mismatch)
    AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(manifest["delta"]), backbone_model=plm, tokenizer=tokenizer)
    template = ManualTemplate(tokenizer, text=manifest["template"], source=f"{folder} template",
                              embedding=plm.get_input_embeddings())
    model = PromptForGeneration(plm, template, tokenizer=tokenizer, max_seq_length=config.max_seq_l,
                                max_new_tokens=config.max_new_tokens)
    model.load_delta_state_dict(state, source=str(folder))
    model.eval()
    return model, manifest, config
