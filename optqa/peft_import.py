"""Plain PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``) trained elsewhere, as optqa deltas.

A PEFT adapter folder or Hub repository for an OPT backbone (LoRA, prompt tuning, prefix tuning) carries no
prompt format and no weight fingerprint. optqa takes the template from ``--template`` (or from the
``optqa_template.txt`` its own PEFT export writes), checks ``base_model_name_or_path`` against the backbone,
translates the PEFT config into optqa's delta config, loads the weights with PEFT's own
``set_peft_model_state_dict`` and describes the result with an optqa manifest whose ``imported_from`` says
where it came from. Only safetensors weights are read: a pickled ``adapter_model.bin`` is refused, not
unpickled.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .checkpoint import MANIFEST_NAME, read_json, sha256_file
from .errors import OptqaError

log = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# optqa's PEFT export writes the prompt format beside the adapter (see sharing.PEFT_TEMPLATE_NAME)
TEMPLATE_FILE_NAME = "optqa_template.txt"
PEFT_TYPES = {"LORA": "lora", "PROMPT_TUNING": "soft_prompt", "PREFIX_TUNING": "prefix"}
# LoRA options whose non-default values change the computation in ways optqa's LoRA config cannot express.
_LORA_DEFAULTS = {"use_dora": False, "use_rslora": False, "bias": "none", "modules_to_save": None,
                  "fan_in_fan_out": False, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def is_peft_adapter(folder: Path) -> bool:
    """A folder holding a PEFT adapter and no optqa manifest."""
    return (folder / ADAPTER_CONFIG_NAME).is_file() and not (folder / MANIFEST_NAME).is_file()


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """PEFT's ``adapter_config.json``, checked to be a causal-LM adapter of a type optqa has.

    Raises:
        OptqaError: unreadable, another task, another PEFT method, or pickled weights only.
    """
    path = folder / ADAPTER_CONFIG_NAME
    config = read_json(path, "not valid JSON")
    if not isinstance(config, dict) or "peft_type" not in config:
        raise OptqaError(f"{path}: not a PEFT adapter config (no peft_type)")
    if config["peft_type"] not in PEFT_TYPES:
        raise OptqaError(f"{path}: PEFT method {config['peft_type']} has no optqa counterpart (optqa loads "
                         f"{', '.join(PEFT_TYPES)})")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise OptqaError(f"{path}: a {config['task_type']} adapter; optqa answers with causal LMs (CAUSAL_LM)")
    if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        detail = (" (only a pickled adapter_model.bin, which optqa does not unpickle; re-save it with "
                  "save_pretrained(..., safe_serialization=True))" if (folder / "adapter_model.bin").exists() else "")
        raise OptqaError(f"{folder}: no {ADAPTER_WEIGHTS_NAME}{detail}")
    return config


def delta_config_from_peft(config: dict[str, Any], source: str) -> dict[str, Any]:
    """optqa's delta config for a PEFT adapter config.

    Raises:
        OptqaError: options optqa's delta cannot reproduce (DoRA, rsLoRA, biases, patterns, projections, ...).
    """
    delta_type = PEFT_TYPES[config["peft_type"]]
    if delta_type == "lora":
        # an option counts when it is set and not the default ("", None, [] and {} mean unset)
        differing = sorted(k for k, default in _LORA_DEFAULTS.items() if config.get(k) and config.get(k) != default)
        if differing:
            raise OptqaError(f"{source}: LoRA option {differing[0]}={config[differing[0]]!r} is not supported by "
                             "optqa's LoRA")
        targets = config.get("target_modules")
        if isinstance(targets, str):
            targets = [targets]  # a single name; a regular expression would match nothing by name and is caught
        if not targets:
            raise OptqaError(f"{source}: the LoRA config names no target_modules")
        return {"delta_type": "lora", "modified_modules": sorted(targets), "lora_r": config["r"],
                "lora_alpha": config["lora_alpha"], "lora_dropout": config.get("lora_dropout", 0.0)}
    if config.get("num_transformer_submodules", 1) not in (1, None):
        raise OptqaError(f"{source}: num_transformer_submodules={config['num_transformer_submodules']} (an "
                         "encoder-decoder adapter); optqa's backbones are decoder-only")
    if delta_type == "soft_prompt":
        # init_text only initialises; the trained embeddings are loaded over it
        return {"delta_type": "soft_prompt", "soft_token_num": config["num_virtual_tokens"], "init_text": ""}
    if config.get("prefix_projection"):
        raise OptqaError(f"{source}: prefix tuning with prefix_projection=true is not supported by optqa's prefix")
    return {"delta_type": "prefix", "prefix_token_num": config["num_virtual_tokens"]}


def check_base_model(config: dict[str, Any], plm_path: str, source: str, ignore_mismatch: bool) -> None:
    """The adapter's ``base_model_name_or_path`` against the backbone about to be loaded (by name: a PEFT
    adapter records no weight fingerprint; a local copy counts by its folder name, ``opt-125m``)."""
    recorded = config.get("base_model_name_or_path")
    if not recorded or Path(str(recorded)).name == Path(str(plm_path)).name:
        return
    message = f"{source} was trained on backbone {recorded!r}, not {plm_path!r}"
    if not ignore_mismatch:
        raise OptqaError(message + "; pass --ignore_backbone_mismatch to load it anyway")
    log.warning("%s; loading anyway (--ignore_backbone_mismatch)", message)


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
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .build import build_model, template_text
    from .checkpoint import build_manifest
    from .deltas import is_delta_parameter

    adapter_config = read_adapter_config(folder)
    delta = delta_config_from_peft(adapter_config, source)
    if template is None:
        if not (folder / TEMPLATE_FILE_NAME).is_file():
            raise OptqaError(f"{source} is a plain PEFT adapter, which records no prompt format: pass --template "
                             "with the template it was trained with (e.g. templates/answer_template.txt)")
        template = (folder / TEMPLATE_FILE_NAME).read_text(encoding="utf-8")
    config.template = template
    text = template_text(config)
    config.plm_path = plm_path or adapter_config.get("base_model_name_or_path") or ""
    if not config.plm_path:
        raise OptqaError(f"{source}: the adapter names no base model; pass --plm_path")
    check_base_model(adapter_config, config.plm_path, source, ignore_mismatch)
    config.delta_type = delta["delta_type"]
    model, backbone = build_model(config, delta_config=delta, template=text)
    weights = load_file(str(folder / ADAPTER_WEIGHTS_NAME), device="cpu")
    try:
        result = set_peft_model_state_dict(model.delta.model, weights)
    except RuntimeError as exc:  # shapes that do not fit this backbone
        raise OptqaError(f"{source}: the adapter's weights do not fit {config.plm_path} "
                         f"({str(exc).strip().splitlines()[-1].strip()})") from None
    unexpected = list(result.unexpected_keys)
    missing = sorted(k for k in result.missing_keys if is_delta_parameter(k))
    if delta["delta_type"] != "lora":
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
                         f"for {delta['delta_type']} on {config.plm_path}")
    model.eval()
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
    log.info("loaded PEFT %s adapter %s onto %s (%d tensors); no optqa manifest, so no file hashes to verify",
             adapter_config["peft_type"], source, config.plm_path, len(weights))
    return model, manifest
