"""Self-describing, hash-checked delta checkpoints (safetensors + a JSON manifest).

A checkpoint folder holds ``delta_model.safetensors`` (the delta's weights only) and
``optqa_manifest.json``: format and version, delta type and config, template text, the backbone's identity
and weight fingerprint, the run's hyperparameters and metrics, and the SHA-256 and size of every file it
lists. Loading verifies all of it before a single weight is used. Folders are written beside their final
place and swapped in by renames, so a killed save never damages the checkpoint that was there.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import OptqaError

log = logging.getLogger(__name__)

# File names live here and only here.
MANIFEST_NAME = "optqa_manifest.json"
WEIGHTS_NAME = "delta_model.safetensors"
RESUME_DIR_NAME = "resume"
RESUME_STATE_NAME = "training_state.pt"
BEST_DIR_NAME = "best"
PARTIAL_SUFFIX = ".partial"
PREVIOUS_SUFFIX = ".previous"
FORMAT_NAME = "optqa-delta"
FORMAT_VERSION = 1
FINGERPRINT_SAMPLES = 256


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backbone_fingerprint(plm: torch.nn.Module) -> str:
    """A cheap hash of the backbone's weights: names, shapes and 256 evenly spaced values per tensor.

    Values are compared at bfloat16 precision, so the same weights loaded in fp32, fp16 or bf16 agree,
    while another checkpoint of the same shape (other seed, other fine-tune) differs in sampled values.
    Delta parameters are skipped: call it on the backbone, before or after attaching a delta.
    """
    from .deltas import is_delta_parameter

    digest = hashlib.sha256()
    for name, param in sorted(_backbone_parameters(plm), key=lambda item: item[0]):
        if is_delta_parameter(name):
            continue
        flat = param.detach().reshape(-1)
        positions = torch.linspace(0, flat.numel() - 1, min(FINGERPRINT_SAMPLES, flat.numel())).long()
        sample = flat[positions].to(torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _backbone_parameters(plm):
    # PEFT renames wrapped layers (q_proj.weight -> q_proj.base_layer.weight); fingerprint the original names
    for name, param in plm.named_parameters():
        yield name.replace("base_layer.", "").replace("base_model.model.", ""), param


def resolve_folder(folder: str | Path) -> Path:
    """The checkpoint folder, or the previous one if a save was killed between its two renames."""
    folder = Path(folder)
    previous = folder.with_name(folder.name + PREVIOUS_SUFFIX)
    if not (folder / MANIFEST_NAME).is_file() and (previous / MANIFEST_NAME).is_file():
        log.warning("%s was being replaced when a save stopped; using the previous checkpoint %s", folder, previous)
        return previous
    return folder


def write_folder_atomically(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """Build the folder's new contents in ``<folder>.partial``, then swap it in by renames."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    previous = folder.with_name(folder.name + PREVIOUS_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    write(partial)
    if folder.exists():
        if previous.exists() and (folder / MANIFEST_NAME).is_file():
            shutil.rmtree(previous)
        if not previous.exists():
            folder.rename(previous)
        else:  # folder is itself a leftover without a manifest
            shutil.rmtree(folder)
    partial.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder


def _write_json(path: Path, data: dict) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def build_manifest(*, delta_config: dict, template_text: str, backbone: dict, hyperparameters: dict,
                   metrics: dict, trainable_parameters: int) -> dict[str, Any]:
    from . import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "optqa_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "delta": delta_config,
        "template": template_text,
        "backbone": backbone,
        "trainable_parameters": trainable_parameters,
        "hyperparameters": hyperparameters,
        "metrics": metrics,
        "files": {},
    }


def save_checkpoint(folder: str | Path, state: dict[str, torch.Tensor], manifest: dict[str, Any],
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write weights + manifest (with every file's SHA-256) atomically; ``extra`` may add listed files."""
    from safetensors.torch import save_file

    def write(target: Path) -> None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(target / WEIGHTS_NAME),
                  metadata={"format": FORMAT_NAME})
        if extra:
            extra(target)
        files = {}
        for path in sorted(target.iterdir()):
            if path.name != MANIFEST_NAME and path.is_file():
                files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        _write_json(target / MANIFEST_NAME, {**manifest, "files": files})

    return write_folder_atomically(folder, write)


def read_manifest(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    folder = resolve_folder(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise OptqaError(f"no checkpoint at {folder}: the folder does not exist")
    if not path.is_file():
        raise OptqaError(f"{folder} is not an optqa checkpoint: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OptqaError(f"{path}: damaged manifest, not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise OptqaError(f"{path}: not an optqa delta manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise OptqaError(f"{path}: format version {manifest.get('format_version')} is not supported "
                         f"(this optqa reads version {FORMAT_VERSION})")
    return folder, manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present, of the listed size and SHA-256; anything else is refused."""
    files = manifest.get("files") or {}
    if WEIGHTS_NAME not in files:
        raise OptqaError(f"{folder / MANIFEST_NAME}: lists no {WEIGHTS_NAME}")
    for name, expected in files.items():
        path = folder / name
        if Path(name).name != name:
            raise OptqaError(f"{folder / MANIFEST_NAME}: file name {name!r} is not a plain file name")
        if not path.is_file():
            raise OptqaError(f"integrity check failed: {path} is missing")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise OptqaError(f"integrity check failed: {path} has {size} bytes, the manifest says "
                             f"{expected.get('bytes')} (truncated or replaced)")
        actual = sha256_file(path)
        if actual != expected.get("sha256"):
            raise OptqaError(f"integrity check failed: {path} has SHA-256 {actual[:16]}..., the manifest says "
                             f"{str(expected.get('sha256'))[:16]}... (the file was modified)")


def read_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """Verify a checkpoint folder and read its weights (CPU tensors, no pickle involved)."""
    from safetensors.torch import load_file

    folder, manifest = read_manifest(path)
    verify_files(folder, manifest)
    state = load_file(str(folder / WEIGHTS_NAME), device="cpu")
    log.info("integrity check passed: %s (%d files, SHA-256 verified)", folder, len(manifest["files"]))
    return folder, manifest, state


def check_backbone(manifest: dict[str, Any], identity: dict[str, Any], fingerprint: str,
                   ignore_mismatch: bool = False) -> None:
    """Refuse a delta made for another backbone: architecture, shape-defining config, then weights."""
    saved = manifest.get("backbone") or {}
    if saved.get("architecture") != identity["architecture"]:
        raise OptqaError(f"this delta was made for a {saved.get('architecture')} backbone, the loaded one is "
                         f"{identity['architecture']}")
    differing = sorted(k for k in set(saved.get("config", {})) | set(identity["config"])
                       if k in SHAPE_KEYS and saved.get("config", {}).get(k) != identity["config"].get(k))
    if differing:
        key = differing[0]
        raise OptqaError(f"this delta was made for a backbone with {key}={saved['config'].get(key)}, the loaded "
                         f"one has {key}={identity['config'].get(key)} ({saved.get('name_or_path')} vs "
                         f"{identity['name_or_path']})")
    if saved.get("fingerprint") != fingerprint:
        message = (f"this delta was made for backbone {saved.get('name_or_path')} whose weights differ from the "
                   f"loaded {identity['name_or_path']} (fingerprint {str(saved.get('fingerprint'))[:12]} vs "
                   f"{fingerprint[:12]})")
        if not ignore_mismatch:
            raise OptqaError(message + "; pass --ignore_backbone_mismatch to load it anyway")
        log.warning("%s; loading anyway (--ignore_backbone_mismatch)", message)
    else:
        log.info("backbone check passed: %s matches the checkpoint's fingerprint", identity["name_or_path"])


# Config keys that change parameter shapes or the computation's structure.
SHAPE_KEYS = {"hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "vocab_size",
              "word_embed_proj_dim", "max_position_embeddings", "do_layer_norm_before", "intermediate_size",
              "n_embd", "n_layer", "n_head", "num_key_value_heads", "model_type"}
