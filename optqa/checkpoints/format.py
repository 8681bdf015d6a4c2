"""Self-describing, hash-checked delta checkpoints (safetensors + a JSON manifest).

A checkpoint folder holds ``delta_model.safetensors`` (the delta's weights only) and
``optqa_manifest.json``: format and version, delta type and config, template text, the backbone's identity
and weight fingerprint, the run's hyperparameters and metrics, the SHA-256 and size of every file it lists,
and (format version 2) the SHA-256 of its own canonical JSON. Loading verifies all of it, and checks every
value it applies through the typed configs, before a single weight is used. Folders are written beside their final
place and swapped in by renames, so a killed save never damages the checkpoint that was there.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # torch is imported where tensors are touched: --mode inspect never needs it
    import torch

    from optqa.config import RunConfig

from optqa.errors import OptqaError

log = logging.getLogger(__name__)

# File names live here and only here.
MANIFEST_NAME = "optqa_manifest.json"
WEIGHTS_NAME = "delta_model.safetensors"
RESUME_DIR_NAME = "resume"
RESUME_STATE_NAME = "training_state.pt"
BEST_DIR_NAME = "best"
# a model card (an exported PEFT folder's, a pushed repository's); the default save folders hold a README too
MODEL_CARD_NAME = "README.md"
# files a save carries over from the folder it replaces, unlisted: a loader never reads them
KEPT_NAMES = (MODEL_CARD_NAME,)
# a PEFT adapter folder (PEFT's own names), and the prompt format optqa's PEFT export writes beside it
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"
PEFT_TEMPLATE_NAME = "optqa_template.txt"
# an OpenDelta checkpoint (OpenDelta's own names)
OPENDELTA_CONFIG_NAME = "config.json"
OPENDELTA_WEIGHTS_NAME = "pytorch_model.bin"
PARTIAL_SUFFIX = ".partial"
PREVIOUS_SUFFIX = ".previous"
FORMAT_NAME = "optqa-delta"
# 2: the manifest carries MANIFEST_HASH_KEY. Version 1 manifests (written before it) still load, with a warning.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_HASH_KEY = "manifest_sha256"
# Every top-level key a manifest may hold; any other is refused (a flipped bit in a key name is damage, not news).
MANIFEST_KEYS = frozenset({"format", "format_version", MANIFEST_HASH_KEY, "optqa_version", "versions", "created",
                           "delta", "template", "backbone", "trainable_parameters", "hyperparameters", "metrics",
                           "files", "imported_from", "delta_center"})
FINGERPRINT_SAMPLES = 256


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, as lowercase hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backbone_fingerprint(plm: torch.nn.Module) -> str:
    """A cheap hash of the backbone's weights: every tensor's name and shape, and 256 evenly spaced values.

    Definition (format version 1): SHA-256 over, for each backbone parameter sorted by name,
    ``"<name>:<shape tuple>;"`` (UTF-8) followed by the raw little-endian bfloat16 bits of
    ``flat[i * (n - 1) // (k - 1)]`` for ``i = 0 .. k - 1``, where ``flat`` is the tensor in row-major order,
    ``n`` its size and ``k = min(256, n)``. Delta parameters are skipped and PEFT's renamed layers
    (``q_proj.base_layer.weight``) count under their original names, so the fingerprint is the same before
    and after a delta is attached. Rounding to bfloat16 makes a backbone loaded in fp32 or bf16 agree (an
    fp16 copy of fp32 weights generally does not); any other seed or fine-tune differs in the sampled
    values. It reads ~256 values per tensor, so it costs milliseconds next to loading the backbone.
    """
    import torch

    from optqa.deltas import is_delta_parameter

    digest = hashlib.sha256()
    for name, param in sorted(_backbone_parameters(plm), key=lambda item: item[0]):
        if is_delta_parameter(name):
            continue
        flat = param.detach().reshape(-1)
        positions = _sample_positions(flat.numel())
        sample = flat[positions].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        digest.update(sample.numpy().astype("<i2").tobytes())
    return digest.hexdigest()


def _sample_positions(n: int) -> torch.Tensor:
    import torch

    # integer arithmetic: a float linspace rounds n - 1 up past the end for n above 2**24 (OPT's embedding),
    # and float rounding could differ between platforms
    k = min(FINGERPRINT_SAMPLES, n)
    return torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)


def _backbone_parameters(plm):
    # a PeftModel wraps the backbone; LoRA renames the layers it wraps (q_proj.weight -> q_proj.base_layer.weight)
    if hasattr(plm, "get_base_model"):
        plm = plm.get_base_model()
    for name, param in plm.named_parameters():
        yield name.replace(".base_layer.", "."), param


def resolve_folder(folder: str | Path) -> Path:
    """The checkpoint folder, or the previous one if a save was killed between its two renames."""
    folder = Path(folder)
    if not folder.name:  # "." or a drive root: there is no sibling to fall back on
        return folder
    previous = folder.with_name(folder.name + PREVIOUS_SUFFIX)
    if not (folder / MANIFEST_NAME).is_file() and (previous / MANIFEST_NAME).is_file():
        log.warning("%s was being replaced when a save stopped; using the previous checkpoint %s", folder, previous)
        return previous
    return folder


def write_folder_atomically(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """Build the folder's new contents in ``<folder>.partial``, then swap it in by renames.

    At every instant one complete version is on disk: the old ``folder`` until the first rename, then
    ``<folder>.previous`` (which :func:`resolve_folder` falls back on) until the second. Only renames of
    paths that do not exist yet are used, since Windows' rename refuses to replace an existing target.
    An existing folder is replaced only if it is empty, holds a manifest, or holds nothing but names the new
    version writes too: a mistyped path can never wipe out an unrelated folder. A README.md in it is carried
    over (unlisted, so never read by a loader): the repository's default save folders hold one.

    Raises:
        OptqaError: the folder holds something else, or the disk refused a write (full, read-only, no
            permission): one line saying the previous checkpoint is intact (``<folder>.partial`` is removed).
    """
    folder = Path(folder).resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    previous = folder.with_name(folder.name + PREVIOUS_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)

    def intact() -> str | None:
        kept = resolve_folder(folder)
        return f"the previous checkpoint in {kept}" if (kept / MANIFEST_NAME).is_file() else None

    with write_failures_as_errors(folder, intact):
        try:
            partial.mkdir()
            write(partial)
            if folder.exists():
                _check_replaceable(folder, {p.name for p in partial.iterdir()})
                for name in KEPT_NAMES:
                    if (folder / name).is_file() and not (partial / name).exists():
                        shutil.copyfile(folder / name, partial / name)
            _sync_folder(partial)
            if folder.exists():
                if previous.exists() and (folder / MANIFEST_NAME).is_file():
                    _rmtree(previous)
                if not previous.exists():
                    _rename(folder, previous)
                else:  # folder is an incomplete leftover and previous the last complete version: keep the latter
                    _rmtree(folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # also gives a full disk its space back at once
            raise
    _rename(partial, folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder


# disk full, quota exceeded, read-only, no permission, I/O error, file too large: the place refuses the write
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def write_failure(exc: BaseException) -> str | None:
    """Why writing failed, as a short reason, when ``exc`` is the file system refusing a write (disk full,
    quota, no permission, read-only); None for anything else (a bug keeps its traceback).

    safetensors reports an OS error as a ``SafetensorError`` ("I/O error: No space left on device (os error 28)";
    before 0.5 "IoError(Os { code: 28, ... })") and torch.save as a ``RuntimeError("[enforce fail at
    inline_container.cc:...] ...")`` without the OS's reason: neither is an OSError, so both are recognised by
    their text.
    """
    if isinstance(exc, OSError):
        return f"{exc.strerror} (errno {exc.errno})" if exc.errno in _WRITE_ERRNOS else None
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        match = re.search(r"(?:os error |code: )(\d+)", text)
        if match and int(match.group(1)) in _WRITE_ERRNOS:
            return f"{os.strerror(int(match.group(1)))} (errno {match.group(1)})"
    if isinstance(exc, RuntimeError) and "inline_container.cc" in text and "Reader" not in text:
        return "torch.save could not write its file (it gives no reason; is the disk full?)"
    return None


class WriteRefused(OptqaError):
    """A write the file system refused (:func:`write_failure`), as one line; ``reason`` (why) and ``kept`` (what is
    still there unchanged, or None) alone, for callers that say more (a training run adds its resume state and
    the command that continues)."""

    def __init__(self, message: str, reason: str, kept: str | None):
        super().__init__(message)
        self.reason, self.kept = reason, kept


@contextlib.contextmanager
def write_failures_as_errors(target: Path, intact: Callable[[], str | None]) -> Iterator[None]:
    """Turn a write the file system refuses inside the block (:func:`write_failure`) into one line; anything else
    passes through unchanged.

    Args:
        target: what could not be written.
        intact: called after the failure: what is still there unchanged (``"the previous bundle x.optqa"``), or
            None when nothing was there.

    Raises:
        WriteRefused: ``could not write <target>: <reason>; <intact> is intact`` (or ``nothing was replaced``).
    """
    try:
        yield
    except WriteRefused:
        raise  # a nested block already said it
    except BaseException as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        kept = intact()
        raise WriteRefused(f"could not write {target}: {reason}; "
                           + (f"{kept} is intact" if kept else "nothing was replaced"), reason, kept) from None


def _rename(source: Path, target: Path) -> None:
    """Rename, retrying for a few seconds on Windows, where a virus scanner or an indexer briefly holding a
    just-written file makes the rename of its folder fail."""
    for attempt in range(50):
        try:
            source.rename(target)
            return
        except PermissionError:
            if os.name != "nt" or attempt == 49:
                raise
            time.sleep(0.1)


def _rmtree(path: Path) -> None:
    def make_writable_and_retry(function, name, _error):
        # Windows refuses to delete a read-only file (a checkpoint copied from a read-only place)
        os.chmod(name, stat.S_IWRITE | stat.S_IREAD)
        function(name)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)


def ensure_replaceable(folder: str | Path) -> None:
    """Refuse early (before hours of training) a save path that holds something other than a checkpoint."""
    folder = Path(folder).resolve()
    if folder.exists():
        _check_replaceable(folder, set())


def _check_replaceable(folder: Path, new_names: set[str]) -> None:
    if not folder.is_dir():
        raise OptqaError(f"{folder} is a file, not a checkpoint folder; choose another save path")
    names = {p.name for p in folder.iterdir()} - set(KEPT_NAMES)
    if names and MANIFEST_NAME not in names and not names <= new_names:
        raise OptqaError(f"{folder} already exists and is not an optqa checkpoint (it holds "
                         f"{', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''}); refusing to "
                         "replace it: choose a new or empty folder")


def _sync_folder(folder: Path) -> None:
    """Flush the new files to disk before they are renamed into place, so a power cut cannot swap in
    half-written data (a killed process alone cannot: the OS keeps what was written)."""
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb+") as handle:
                os.fsync(handle.fileno())


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The SHA-256 (lowercase hex) a manifest records of itself under ``manifest_sha256``.

    Definition (format version 2): SHA-256 of the UTF-8 bytes of ``json.dumps(m, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)``, where ``m`` is the parsed manifest without ``manifest_sha256``
    (lone surrogates, which JSON can escape, are encoded as ``surrogatepass`` does). It covers the parsed
    content, so indentation or key order may change, every value and key may not.
    """
    content = {k: v for k, v in manifest.items() if k != MANIFEST_HASH_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    """A manifest's file bytes: indented JSON, with its own hash (``manifest_digest``) from format version 2 on.

    A version-1 manifest (read from an old checkpoint and re-written with fewer files) stays version 1, without
    a hash: sealing content that nothing verified would vouch for it.
    """
    # the value a reader will parse (a Path becomes its string, a tuple a list), so the hash is of that
    data = json.loads(json.dumps(manifest, default=str))
    data.pop(MANIFEST_HASH_KEY, None)
    if data.get("format_version") != 1:
        digest = manifest_digest(data)
        # right after the version, where a reader of the file looks first
        data = {k: v for k, v in data.items() if k in ("format", "format_version")} | {MANIFEST_HASH_KEY: digest} | {
            k: v for k, v in data.items() if k not in ("format", "format_version")}
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def build_manifest(*, delta_config: dict, template_text: str, backbone: dict, hyperparameters: dict,
                   metrics: dict, trainable_parameters: int) -> dict[str, Any]:
    from optqa import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "optqa_version": __version__,
        # informational (a loader never needs it; older checkpoints have none): what software made the delta
        "versions": library_versions(),
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
        (target / MANIFEST_NAME).write_bytes(encode_manifest({**manifest, "files": files}))

    return write_folder_atomically(folder, write)


def read_json(path: Path, problem: str) -> Any:
    """A JSON file's content; invalid JSON or text is an OptqaError ``<path>: <problem> (<reason>)``."""
    return _parse_json(Path(path).read_bytes(), path, problem)


def _parse_json(data: bytes, path: Path, problem: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OptqaError(f"{path}: {problem} ({exc})") from None
    except RecursionError:  # the parser recurses per nesting level; no file optqa writes nests deeper than 5
        raise OptqaError(f"{path}: {problem} (nested too deeply)") from None
    except ValueError:  # Python converts no integer of over 4300 digits (sys.get_int_max_str_digits)
        raise OptqaError(f"{path}: {problem} (a number with more digits than Python reads)") from None


def read_config_json(path: Path, key: str, what: str) -> dict[str, Any]:
    """A JSON config file that must be an object naming its kind under ``key`` (OpenDelta's ``delta_type``,
    PEFT's ``peft_type``); otherwise an OptqaError ``<path>: not <what> (no <key>)``."""
    config = read_json(path, "not valid JSON")
    if not isinstance(config, dict) or key not in config:
        raise OptqaError(f"{path}: not {what} (no {key})")
    return config


def read_manifest(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(folder, manifest)``: the folder resolved and its parsed, verified manifest.

    Verified: the format and version; the manifest's own SHA-256 (``manifest_digest``; a version-1 manifest,
    which has none, loads with a warning); no unknown top-level key; every field a loader relies on present with
    its JSON type; the delta config through its typed config (``AdapterConfig``, ``LoraConfig``, ...) and the
    recorded hyperparameters through ``RunConfig``'s types, choices and ranges, as the command line checks
    its flags. The files it lists are checked by :func:`verify_files`.

    Raises:
        OptqaError: no folder, no manifest, invalid JSON, another format or an unsupported format version, a
            manifest whose hash does not match, or a missing or invalid value (the message names the field).
    """
    folder = resolve_folder(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise OptqaError(f"no checkpoint at {folder}: the folder does not exist")
    if not path.is_file():
        raise OptqaError(f"{folder} is not an optqa checkpoint: {MANIFEST_NAME} is missing")
    return folder, parse_manifest(path.read_bytes(), path)


def parse_manifest(data: bytes, path: Path) -> dict[str, Any]:
    """The manifest in ``data`` (the bytes of the file ``path``, named in messages), verified as
    :func:`read_manifest` says.

    Raises:
        OptqaError: as :func:`read_manifest`.
    """
    manifest = _parse_json(data, path, "damaged manifest, not valid JSON")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise OptqaError(f"{path}: not an optqa delta manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # not True, not 2.0
        raise OptqaError(f"{path}: format version {version} is not supported (this optqa reads versions "
                         f"{' and '.join(map(str, READABLE_VERSIONS))})")
    _check_own_hash(path, manifest)
    problem = _manifest_problem(manifest)
    if problem:
        raise OptqaError(f"{path}: damaged manifest, {problem}")
    _check_values(path, manifest)
    return manifest


def _check_own_hash(path: Path, manifest: dict[str, Any]) -> None:
    # a recorded hash is verified whatever the version says: flipping 2 to 1 cannot switch the check off, since
    # the version is part of what the hash covers; dropping the key as well takes more than one change
    recorded = manifest.get(MANIFEST_HASH_KEY)
    if recorded is None and manifest["format_version"] == 1:
        log.warning("%s: format version 1: the manifest itself is not covered by a hash (only the files it lists "
                    "are), so an edit to its settings or template cannot be detected", path)
        return
    if recorded is None:
        raise OptqaError(f"{path}: damaged manifest, it lacks its {MANIFEST_HASH_KEY} (every format version "
                         f"{manifest['format_version']} manifest carries one)")
    try:
        actual = manifest_digest(manifest)
    except RecursionError:  # parsed just below the limit, serialised one call deeper
        raise OptqaError(f"{path}: damaged manifest, nested too deeply") from None
    if recorded != actual:
        raise OptqaError(f"integrity check failed: {path} has SHA-256 {actual[:16]}... (of its content), it "
                         f"records {str(recorded)[:16]}... (the manifest was modified)")


def _check_values(path: Path, manifest: dict[str, Any]) -> None:
    """The delta config and the recorded hyperparameters, through the typed configs (see read_manifest)."""
    from optqa.config import delta_config_from_dict

    try:
        delta_config_from_dict(manifest["delta"])
    except OptqaError as exc:
        raise OptqaError(f"{path}: invalid delta config: {exc}") from None
    try:
        recorded_config(manifest["hyperparameters"], "hyperparameters.")
    except OptqaError as exc:
        raise OptqaError(f"{path}: {exc}") from None


def recorded_config(values: dict[str, Any], where: str) -> RunConfig:
    """A RunConfig from recorded settings, each checked as the command line checks a typed flag: its type and
    choices (``RunConfig.from_recorded``), then its range (``options.check_values``).

    Args:
        values: field name -> value (unknown names, from another optqa version, are dropped).
        where: put before a field's name in a message (``"hyperparameters."``).
    Raises:
        OptqaError: ``<where><field> must be ..., got ...`` for the first value that is not.
    """
    from optqa.config import RunConfig
    from optqa.options import check_values

    config = RunConfig.from_recorded(values, where)
    check_values(config, spell=where + "{}")
    return config


# Fields a loader relies on, with their JSON types; anything else in a manifest is informational.
_REQUIRED = {"delta": dict, "template": str, "backbone": dict, "hyperparameters": dict, "metrics": dict,
             "files": dict}
_REQUIRED_BACKBONE = {"name_or_path": str, "architecture": str, "config": dict, "fingerprint": str}
# Informational fields, when present, with their JSON types (inspect and model cards show them).
_OPTIONAL = {"optqa_version": str, "versions": dict, "created": str, "trainable_parameters": int,
             "imported_from": dict, "delta_center": dict}


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    unknown = sorted(set(manifest) - MANIFEST_KEYS)
    if unknown:
        return f"unknown field {unknown[0]!r}"
    for fields, where in ((_REQUIRED, manifest), (_REQUIRED_BACKBONE, manifest.get("backbone") or {})):
        for key, kind in fields.items():
            if not isinstance(where.get(key), kind):
                return f"field {key!r} is missing or not a JSON {kind.__name__}"
    for key, kind in _OPTIONAL.items():
        if key in manifest and (not isinstance(manifest[key], kind) or isinstance(manifest[key], bool)):
            return f"field {key!r} is not a JSON {kind.__name__}"
    if not isinstance(manifest["delta"].get("delta_type"), str):
        return "the delta has no delta_type"
    gguf = manifest["backbone"].get("gguf")
    if gguf is not None and not (isinstance(gguf, dict) and isinstance(gguf.get("file"), str)
                                 and _is_sha256(gguf.get("sha256"))):
        return "field 'backbone.gguf' lacks its file name or sha256 (64 hex digits)"
    for name, entry in manifest["files"].items():
        if not (isinstance(entry, dict) and _is_sha256(entry.get("sha256")) and isinstance(entry.get("bytes"), int)
                and not isinstance(entry.get("bytes"), bool) and entry["bytes"] >= 0):
            return f"the entry for {name!r} lacks its sha256 (64 hex digits) or byte count"
    return None


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present, of the listed size and SHA-256; anything else is refused."""
    files = manifest.get("files") or {}
    if WEIGHTS_NAME not in files:
        raise OptqaError(f"{folder / MANIFEST_NAME}: lists no {WEIGHTS_NAME}")
    for name, expected in files.items():
        # a listed name is joined to the folder: only a plain name can never point outside it
        if name in ("", ".", "..") or Path(name).name != name or "/" in name or "\\" in name or ":" in name:
            raise OptqaError(f"{folder / MANIFEST_NAME}: file name {name!r} is not a plain file name")
        path = folder / name
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
    folder, manifest = read_manifest(path)
    verify_files(folder, manifest)
    # parsed from the very bytes that are hashed here: nothing can change in between, and no memory map
    # stays open on the file (Windows could then neither rename nor delete the folder while training)
    data = (folder / WEIGHTS_NAME).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["files"][WEIGHTS_NAME]["sha256"]:
        raise OptqaError(f"integrity check failed: {folder / WEIGHTS_NAME} changed while it was being read")
    state = load_safetensors(folder / WEIGHTS_NAME, data)
    log.info("integrity check passed: %s (%d files, SHA-256 verified)", folder, len(manifest["files"]))
    return folder, manifest, state


# The safetensors dtypes safetensors.torch turns into tensors (its _TYPES, without complex numbers): safetensors
# reads more (F4, F6_E2M3, F8_E8M0, ...), and safetensors.torch.load then ends in a KeyError.
LOADABLE_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64",
                             "F64", "F8_E4M3", "F8_E5M2"})


def safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """The tensors a safetensors file declares, ``{name: (dtype, shape)}``, without reading them or importing torch.

    safetensors itself parses and checks the header (its length, JSON, a string map as ``__metadata__``, known
    dtypes, offsets that cover the data exactly once and sizes that match the shapes): its errors are clear but
    are not OptqaErrors, so each becomes one line here. A dtype torch cannot hold is refused too.

    Raises:
        OptqaError: ``<path>: not a valid safetensors file (<reason>)``.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:  # numpy: reading the header needs no torch
            tensors = {name: (handle.get_slice(name).get_dtype(), handle.get_slice(name).get_shape())
                       for name in sorted(handle.keys())}
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OptqaError(f"{path}: not a valid safetensors file ({reason})") from None
    for name, (dtype, _) in tensors.items():
        if dtype not in LOADABLE_DTYPES:
            raise OptqaError(f"{path}: not a valid safetensors file (tensor {name!r} has dtype {dtype}, which "
                             "torch cannot load)")
    return tensors


def load_safetensors(path: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on the CPU, by name in sorted order; ``data``: its bytes, already read (and
    hash-checked) by the caller.

    The header is checked first (:func:`safetensors_header`), so a malformed file is one line, never torch's.
    safetensors' own ``load`` returns them in an order that changes from process to process (a hash map's), so
    anything that walks the dict (a seeded noise in the tests, an export) would differ from run to run.

    Raises:
        OptqaError: a malformed file, naming it and the reason.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    safetensors_header(path)
    try:
        return dict(sorted(load(Path(path).read_bytes() if data is None else data).items()))
    except (SafetensorError, KeyError) as exc:  # only if the file changed after its header was checked
        raise OptqaError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0]})") from None


def load_pickled_tensors(path: Path) -> Any:
    """A torch pickle (``pytorch_model.bin``, ``training_state.pt``) through torch's weights-only unpickler, on the
    CPU: tensors and plain containers are rebuilt, anything else is refused, so a pickle carrying code is
    reported, never run.

    torch.load's parser fails on a damaged file with whatever its code hit (EOFError for 0 bytes, IndexError,
    KeyError, OSError, RuntimeError, UnicodeDecodeError, ...), so every exception of a load becomes one line.

    Raises:
        OptqaError: ``<path>: refused, the pickle holds code ... (<the global it names>)`` or ``<path>: not a
            readable torch checkpoint (<exception>: <reason>)``.
    """
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about legacy formats on the way to its refusal
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - see above: a damaged file can raise anything
        text = str(exc)
        # torch's two phrasings: "Unsupported global: GLOBAL x.y ..." and "unsupported GLOBAL x.y whose module x is
        # blocked" (a module it never allows, such as os or posix)
        named = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", text)
        if named:  # the weights-only unpickler met a class or function to call: what a payload needs
            raise OptqaError(f"{path}: refused, the pickle holds code or objects other than tensors "
                             f"({named.group(1)}); it was not executed") from None
        # torch's long advice on weights_only is about trusted files: only its specific line is kept
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
        raise OptqaError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}"
                         + (f": {reason[:200]}" if reason else "") + "); nothing in it was executed") from None


def backbone_record(plm: torch.nn.Module, model_path: str) -> dict[str, Any]:
    """What a checkpoint records of the backbone ``plm`` loaded from ``model_path``, and what
    :func:`check_backbone` compares: its identity (``optqa.plm.backbone_identity``: name, architecture, config,
    GGUF file) and its weight fingerprint (:func:`backbone_fingerprint`)."""
    from optqa.plm import backbone_identity

    return {**backbone_identity(plm, model_path), "fingerprint": backbone_fingerprint(plm)}


def check_backbone(manifest: dict[str, Any], identity: dict[str, Any], fingerprint: str | None = None,
                   ignore_mismatch: bool = False, *, source: str | None = None, name_is_a_hint: bool = False) -> bool:
    """Refuse a delta made for another backbone: the one comparison of a loaded backbone with what a checkpoint
    records of its own (architecture, shape-defining config, GGUF file, weights; a name where nothing else is
    recorded).

    Args:
        manifest: the checkpoint's manifest; its ``backbone`` is the record: optqa's (``backbone_record``), or
            what a foreign format keeps (PEFT: ``{"name_or_path"}``; OpenDelta: ``{"architecture",
            "name_or_path"}``).
        identity: the loaded backbone's ``backbone_record`` (or ``backbone_identity``); before a foreign delta's
            backbone is loaded, ``{"name_or_path": PATH}`` alone.
        fingerprint: the loaded backbone's ``backbone_fingerprint``; None: ``identity``'s own.
        ignore_mismatch: other weights (or another name) are loaded anyway, with a warning; another
            architecture or shape is refused regardless.
        source: names a foreign delta in the messages (``<source> was made for ...``).
        name_is_a_hint: another recorded name is only a warning (OpenDelta's: its weight hash cannot be
            recomputed, so the name is all there is, and it is often the Hub name of a local copy).
    Returns:
        True when the loaded weights are the recorded ones (the fingerprint matched).
    Raises:
        OptqaError: another architecture or shape, or (without ``ignore_mismatch``) other weights or name.
    """
    saved = manifest.get("backbone") or {}
    if "architecture" in saved and saved["architecture"] != identity.get("architecture"):
        raise OptqaError(f"{source} was made for a {saved['architecture']} backbone, {identity['name_or_path']} is "
                         f"a {identity.get('architecture')}" if source else
                         f"this delta was made for a {saved['architecture']} backbone, the loaded one is "
                         f"{identity.get('architecture')}")
    if "config" in saved:
        _check_shapes(saved, identity)
    fingerprint = fingerprint if fingerprint is not None else identity.get("fingerprint")
    message = _other_weights(saved, identity, fingerprint, source)
    if message and name_is_a_hint:
        log.warning("%s; importing it anyway (the name is all it records of its backbone)", message)
    elif message and not ignore_mismatch:
        raise OptqaError(message + "; pass --ignore_backbone_mismatch to load it anyway")
    elif message:
        log.warning("%s; loading anyway (--ignore_backbone_mismatch)", message)
    elif "fingerprint" in saved:
        log.info("backbone check passed: %s matches the checkpoint's fingerprint", identity["name_or_path"])
    return message is None and "fingerprint" in saved


def _check_shapes(saved: dict[str, Any], identity: dict[str, Any]) -> None:
    differing = sorted(k for k in set(saved["config"]) | set(identity["config"])
                       if k in SHAPE_KEYS and saved["config"].get(k) != identity["config"].get(k))
    if differing:
        key = differing[0]
        raise OptqaError(f"this delta was made for a backbone with {key}={saved['config'].get(key)}, the loaded "
                         f"one has {key}={identity['config'].get(key)} ({saved.get('name_or_path')} vs "
                         f"{identity['name_or_path']})")


def _other_weights(saved: dict[str, Any], identity: dict[str, Any], fingerprint: str | None,
                   source: str | None) -> str | None:
    """Why the loaded backbone's weights are not the checkpoint's, or None: another GGUF file (the one a
    ``--ignore_backbone_mismatch`` overrides, as it does a differing fingerprint), then other weights; a record
    without a fingerprint (a foreign format's) by the backbone's name (a local copy counts by its folder name)."""
    made_for, loaded = saved.get("gguf"), identity.get("gguf")
    if isinstance(made_for, dict) and loaded and made_for.get("sha256") != loaded["sha256"]:
        return (f"this delta was made for GGUF file {made_for.get('file')} (SHA-256 "
                f"{str(made_for.get('sha256'))[:12]}), the loaded backbone is another GGUF file, {loaded['file']} "
                f"(SHA-256 {loaded['sha256'][:12]})")
    if "fingerprint" not in saved:
        recorded = saved.get("name_or_path")
        if not recorded or Path(str(recorded)).name == Path(str(identity["name_or_path"])).name:
            return None
        return f"{source} was trained on backbone {recorded!r}, not {identity['name_or_path']!r}"
    if saved.get("fingerprint") != fingerprint:
        return (f"this delta was made for backbone {saved.get('name_or_path')} whose weights differ from the "
                f"loaded {identity['name_or_path']} (fingerprint {str(saved.get('fingerprint'))[:12]} vs "
                f"{fingerprint[:12] if fingerprint else None})")
    return None


# the backbone config keys that define its shape: a delta loads only where these match (and inspect shows them)
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "ffn_dim",
              "intermediate_size", "vocab_size", "word_embed_proj_dim", "max_position_embeddings",
              "do_layer_norm_before", "n_embd", "n_layer", "n_head", "model_type")


# The libraries whose versions decide what a delta computes and how it is stored.
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "safetensors", "accelerate", "huggingface_hub")


def library_versions() -> dict[str, str]:
    """optqa's, Python's and the libraries' versions (``"not installed"`` for a missing one), for manifests,
    bundles and model cards: which software made a delta."""
    from optqa import __version__

    versions = {"optqa": __version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
