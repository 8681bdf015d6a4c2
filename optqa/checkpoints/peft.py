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

from pathlib import Path
from typing import Any

from optqa.checkpoints.format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_PICKLE_NAME,
    ADAPTER_WEIGHTS_NAME,
    MANIFEST_NAME,
    read_config_json,
)
from optqa.config import DELTA_CONFIGS, PEFT_TYPES
from optqa.errors import OptqaError


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
        detail = (f" (only a pickled {ADAPTER_PICKLE_NAME}, which optqa does not unpickle; re-save it with "
                  "save_pretrained(..., safe_serialization=True))" if (folder / ADAPTER_PICKLE_NAME).exists() else "")
        raise OptqaError(f"{folder}: no {ADAPTER_WEIGHTS_NAME}{detail}")
    return config


def delta_config_from_peft(config: dict[str, Any], source: str) -> dict[str, Any]:
    """optqa's delta config for a PEFT adapter config: the registered delta type of its ``peft_type`` maps it.

    Raises:
        OptqaError: options optqa's delta cannot reproduce (DoRA, rsLoRA, biases, patterns, projections, ...).
    """
    return DELTA_CONFIGS[PEFT_TYPES[config["peft_type"]]].from_peft(config, source)


def base_model_record(config: dict[str, Any]) -> dict[str, Any]:
    """What an adapter config records of its backbone, as ``check_backbone`` reads a manifest: the name alone
    (``base_model_name_or_path``; a PEFT adapter records no architecture or weight fingerprint)."""
    return {"backbone": {"name_or_path": config.get("base_model_name_or_path")}}
