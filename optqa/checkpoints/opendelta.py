"""OpenDelta checkpoints (config.json + pytorch_model.bin): read safely, their config and tensors under optqa's
names (``optqa.sharing.opendelta`` turns one into an optqa checkpoint, ``--mode import_opendelta``).

``pytorch_model.bin`` is a pickle. It is read with ``torch.load(weights_only=True, map_location="cpu")`` only,
which rebuilds tensors and plain containers and refuses anything else, so a pickle carrying code is reported,
never run. It is read before the backbone is loaded, so a refused file costs nothing.

Key mapping (checked against genuine OpenDelta 0.3.2 checkpoints, tests/fixtures/opendelta-0.3.2):

- adapter: the same names (optqa's adapter copies OpenDelta's layout);
- lora: ``X.lora.lora_A`` -> PEFT's ``X.lora_A.default.weight`` (``lora_B`` likewise);
- bitfit: OpenDelta trains the backbone's own biases; optqa keeps them frozen and adds a separate bias,
  so ``X.bias`` becomes ``X.bitfit_delta_bias = opendelta_bias - backbone_bias``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from optqa.checkpoints.format import (
    OPENDELTA_CONFIG_NAME,
    OPENDELTA_WEIGHTS_NAME,
    load_pickled_tensors,
    read_config_json,
)
from optqa.config import DELTA_CONFIGS, REGISTRY
from optqa.errors import OptqaError

IMPORTABLE = tuple(name for name, entry in REGISTRY.items() if entry.opendelta)


def read_opendelta(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """OpenDelta's config and state dict; the state dict through the weights-only unpickler, on the CPU."""
    import torch

    folder = Path(folder)
    config_path, weights_path = folder / OPENDELTA_CONFIG_NAME, folder / OPENDELTA_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise OptqaError(f"not an OpenDelta checkpoint: {path} is missing")
    config = read_config_json(config_path, "delta_type", "an OpenDelta delta config")
    if config["delta_type"] not in IMPORTABLE:
        raise OptqaError(f"{config_path}: OpenDelta delta type {config['delta_type']!r} cannot be imported "
                         f"(optqa imports {', '.join(IMPORTABLE)})")
    state = load_pickled_tensors(weights_path)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise OptqaError(f"{weights_path}: expected a state dict of named tensors")
    return config, state, weights_path


def delta_config_from_opendelta(config: dict[str, Any]) -> dict[str, Any]:
    """optqa's delta config: OpenDelta's run metadata dropped; BitFit's module patterns are OpenDelta syntax
    ("attn@") for the same set optqa's BitFit covers by default (every Linear and LayerNorm in the layers)."""
    from optqa.deltas import OPENDELTA_METADATA_KEYS

    delta = {k: v for k, v in config.items() if k not in OPENDELTA_METADATA_KEYS}
    return DELTA_CONFIGS[delta["delta_type"]].from_opendelta(delta)


def _plain_name(name: str) -> str:
    """A parameter name without the wrappers around the backbone (optqa's model, PEFT's model and adapter)."""
    for prefix in ("backbone.", "base_model.model."):
        name = name[len(prefix):] if name.startswith(prefix) else name
    return name.replace(".default.", ".")


def map_state(delta_type: str, state: dict[str, Any], own_names: list[str], backbone_params: dict[str, Any],
              source: Path) -> dict[str, Any]:
    """OpenDelta's tensors under optqa's names (see the module docstring)."""
    by_plain = {_plain_name(name): name for name in own_names}
    mapped = {}
    method = REGISTRY[delta_type].implementation()
    for key, value in state.items():
        plain, value = method.from_opendelta(key, value, backbone_params)
        if plain not in by_plain:
            raise OptqaError(f"{source}: {key} has no counterpart in optqa's {delta_type} on this backbone "
                             f"(expected names like {sorted(by_plain)[0]})")
        mapped[by_plain[plain]] = value
    return mapped


def backbone_of(config: dict[str, Any]) -> dict[str, Any]:
    """What an OpenDelta config records of its backbone, as ``check_backbone`` reads a manifest: the class and
    the name it was trained on (its ``backbone_hash`` cannot be recomputed on today's transformers)."""
    names = {"backbone_class": "architecture", "backbone_checkpoint_name": "name_or_path"}
    return {"backbone": {ours: config[theirs] for theirs, ours in names.items() if config.get(theirs)}}
