"""``--mode import_opendelta``: turn an OpenDelta checkpoint (read by ``optqa.checkpoints.opendelta``) into an
optqa checkpoint, on a backbone built and fingerprinted by ``optqa.build``."""
from __future__ import annotations

from pathlib import Path

from optqa.build import build_model, template_text
from optqa.checkpoints.format import (
    OPENDELTA_WEIGHTS_NAME,
    build_manifest,
    check_backbone,
    save_checkpoint,
    sha256_file,
)
from optqa.checkpoints.opendelta import backbone_of, delta_config_from_opendelta, map_state, read_opendelta
from optqa.config import RECIPE_KEYS, RunConfig
from optqa.errors import OptqaError


def import_opendelta(config: RunConfig) -> str:
    """Convert ``config.import_path`` into the optqa checkpoint ``config.delta_save_path``.

    The OpenDelta files are read (and refused) before the backbone loads; the backbone's class is then checked
    against the one OpenDelta recorded (its name only warns: see ``checkpoints.opendelta.backbone_of``).

    Returns:
        The summary line to print.
    Raises:
        OptqaError: no --import_path, an occupied --delta_save_path, an unreadable or unsupported OpenDelta
            checkpoint, another backbone class, or tensors that do not fit.
    """
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
    check_backbone(backbone_of(opendelta_config), {**backbone, "name_or_path": config.plm_path},
                   source=str(source), name_is_a_hint=True)
    own = list(model.delta_state_dict())
    mapped = map_state(delta["delta_type"], state, own, dict(model.backbone.named_parameters()), weights_path)
    model.load_delta_state_dict(mapped, source=str(weights_path))
    save_checkpoint(out, model.delta_state_dict(), _manifest(model, config, delta, text, backbone, opendelta_config,
                                                             source, weights_path))
    return (f"imported OpenDelta {delta['delta_type']} ({model.num_trainable_parameters():,} parameters, "
            f"{len(state)} tensors) from {source} onto {config.plm_path}: optqa checkpoint in {out}")


def _manifest(model, config: RunConfig, delta: dict, text: str, backbone: dict, opendelta_config: dict,
              source: Path, weights_path: Path) -> dict:
    """The imported checkpoint's manifest: the delta's own settings (so that hyperparameters and delta agree;
    bitfit: every layer, None) and ``imported_from``: OpenDelta's record of the run and the weights' SHA-256."""
    # the imported type's recipe, not the one of the type the config started from (OpenDelta trained the delta)
    recipe = RunConfig(delta_type=delta["delta_type"])
    settings = {**config.to_dict(), **{k: getattr(recipe, k) for k in RECIPE_KEYS}, "modified_modules": None, **delta,
                "mode": "import_opendelta"}
    manifest = build_manifest(delta_config=model.delta.config.to_dict(), template_text=text, backbone=backbone,
                              hyperparameters=settings, metrics={},
                              trainable_parameters=model.num_trainable_parameters())
    manifest["imported_from"] = {
        "format": "OpenDelta", "path": str(source),
        **{k: opendelta_config[k] for k in ("opendelta_version", "backbone_checkpoint_name", "backbone_class",
                                            "backbone_hash") if k in opendelta_config},
        f"{OPENDELTA_WEIGHTS_NAME}_sha256": sha256_file(weights_path),
    }
    return manifest
