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

from optqa.checkpoints.format import MANIFEST_NAME, read_config_json
from optqa.errors import OptqaError

log = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# optqa's PEFT export writes the prompt format beside the adapter (see sharing.PEFT_TEMPLATE_NAME)
TEMPLATE_FILE_NAME = "optqa_template.txt"
PEFT_TYPES = {"LORA": "lora", "PROMPT_TUNING": "soft_prompt", "PREFIX_TUNING": "prefix"}
# LoRA options whose non-default values change the computation in ways optqa's LoRA config cannot express.
# (fan_in_fan_out is not one: it says how the target stores its weight, and optqa sets it from the target's
# type, True for GPT-2's Conv1D, as an adapter trained on that backbone must have it.)
_LORA_DEFAULTS = {"use_dora": False, "use_rslora": False, "bias": "none", "modules_to_save": None,
                  "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def is_peft_adapter(folder: Path) -> bool:
    """A folder holding a PEFT adapter and no optqa manifest."""
    return (folder / ADAPTER_CONFIG_NAME).is_file() and not (folder / MANIFEST_NAME).is_file()


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """PEFT's ``adapter_config.json``, checked to be a causal-LM adapter of a type optqa has.

    Raises:
        OptqaError: unreadable, another task, another PEFT method, or pickled weights only.
    """
    path = folder / ADAPTER_CONFIG_NAME
    config = read_config_json(path, "peft_type", "a PEFT adapter config")
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


