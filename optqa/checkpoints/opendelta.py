"""``--mode import_opendelta``: turn an OpenDelta checkpoint (config.json + pytorch_model.bin) into an optqa one.

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

import logging
from pathlib import Path
from typing import Any

from optqa.checkpoints.format import load_pickled_tensors, read_config_json
from optqa.config import DELTA_CONFIGS, REGISTRY, RunConfig
from optqa.errors import OptqaError

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_BIN_NAME = "pytorch_model.bin"
IMPORTABLE = tuple(name for name, entry in REGISTRY.items() if entry.opendelta)


def read_opendelta(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """OpenDelta's config and state dict; the state dict through the weights-only unpickler, on the CPU."""
    import torch

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_BIN_NAME
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


def import_opendelta(config: RunConfig) -> str:
    """Convert ``config.import_path`` into the optqa checkpoint ``config.delta_save_path``; returns a summary line."""
    from optqa.checkpoints.assemble import build_model, template_text
    from optqa.checkpoints.format import build_manifest, save_checkpoint, sha256_file
    from optqa.options import check_length_budget
    from optqa.plm import backbone_max_positions

    if not config.import_path:
        raise OptqaError("--mode import_opendelta needs --import_path (the OpenDelta checkpoint folder)")
    out = Path(config.delta_save_path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OptqaError(f"{out} already exists; choose a new --delta_save_path for the imported checkpoint")
    source = Path(config.import_path)
    opendelta_config, state, weights_path = read_opendelta(source)
    delta = delta_config_from_opendelta(opendelta_config)
    check_length_budget(config, backbone_max_positions(config.plm_path), config.plm_path, delta)
    text = template_text(config)
    model, backbone = build_model(config, delta_config=delta, template=text)
    expected_class = opendelta_config.get("backbone_class")
    if expected_class and expected_class != backbone["architecture"]:
        raise OptqaError(f"{source} was made for a {expected_class} backbone, {config.plm_path} is a "
                         f"{backbone['architecture']}")
    trained_on = opendelta_config.get("backbone_checkpoint_name")
    if trained_on and Path(str(trained_on)).name != Path(config.plm_path).name:
        # OpenDelta's backbone_hash cannot be recomputed on today's transformers: the name is all there is
        log.warning("%s was trained on backbone %r; importing it onto %s", source, trained_on, config.plm_path)
    own = list(model.delta_state_dict())
    mapped = map_state(delta["delta_type"], state, own, dict(model.backbone.named_parameters()), weights_path)
    model.load_delta_state_dict(mapped, source=str(weights_path))
    # the imported delta's own settings, so that hyperparameters and delta agree (bitfit: every layer, None)
    settings = {**config.to_dict(), "modified_modules": None, **delta, "mode": "import_opendelta"}
    manifest = build_manifest(delta_config=model.delta.config.to_dict(), template_text=text, backbone=backbone,
                              hyperparameters=settings, metrics={},
                              trainable_parameters=model.num_trainable_parameters())
    manifest["imported_from"] = {
        "format": "OpenDelta", "path": str(source),
        **{k: opendelta_config[k] for k in ("opendelta_version", "backbone_checkpoint_name", "backbone_class",
                                            "backbone_hash") if k in opendelta_config},
        "pytorch_model.bin_sha256": sha256_file(weights_path),
    }
    save_checkpoint(out, model.delta_state_dict(), manifest)
    return (f"imported OpenDelta {delta['delta_type']} ({model.num_trainable_parameters():,} parameters, "
            f"{len(state)} tensors) from {source} onto {config.plm_path}: optqa checkpoint in {out}")
