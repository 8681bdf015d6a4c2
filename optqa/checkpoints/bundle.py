"""Single-file checkpoint bundles (``*.optqa``): a zip holding the manifest and the files it lists.

A bundle is untrusted input until proven otherwise. Before a byte is written to disk every entry is checked:
a plain file name (no folder part, no ``..``, no absolute path, no drive letter, no backslash, no Windows
device name), a regular file (no symlink, no encryption), no duplicate (case-insensitively, as on Windows),
and listed in the manifest with the size the zip declares. Entries are then streamed into a fresh folder
with exclusive creates, hashed on the way, and their SHA-256 compared with the manifest. Nothing is ever
written outside the target folder, and a bundle that fails any check leaves nothing behind.

Everything goes through pathlib and binary file handles; no symlinks are created, so it behaves the same
on Windows.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, Iterator

from optqa.checkpoints.format import (
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    WEIGHTS_NAME,
    encode_manifest,
    read_manifest,
    verify_files,
    write_failure,
    write_failures_as_errors,
    write_folder_atomically,
)
from optqa.errors import OptqaError

if TYPE_CHECKING:
    from optqa.checkpoints.hub import Pulled

log = logging.getLogger(__name__)

BUNDLE_SUFFIX = ".optqa"
BUNDLE_COMMENT = b"optqa delta bundle v1"
# A manifest is a few kB; anything near this is not one and is not read into memory.
MAX_MANIFEST_BYTES = 8 << 20
# What a bundle may declare, checked against the zip's central directory before a byte is written (the limits
# of zip-bomb defences such as Apache Commons Compress' and Python's own zipfile docs advise): a bundle holds a
# manifest and a few delta files; a delta's weights are far below 4 GiB (LoRA r=64 on a 7B model: ~0.6 GB); optqa
# writes its bundles uncompressed, and real weights deflate by 1-3x, so 100x is compression of nothing but a
# bomb (small members, below 1 MiB, may compress better: a freshly zeroed LoRA B matrix).
MAX_ENTRIES = 64
MAX_MEMBER_BYTES = 4 << 30
MAX_TOTAL_BYTES = 4 << 30
MAX_RATIO = 100
RATIO_FREE_BYTES = 1 << 20
# Fixed timestamp: the same checkpoint always gives the same bundle bytes.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_CHUNK = 1 << 20
# What zipfile raises for a damaged archive, beyond BadZipFile (found by flipping every byte of a bundle):
# NotImplementedError for a "version needed" or flag it does not know, UnicodeDecodeError for a name flagged as
# UTF-8 that is not, ValueError, EOFError and zlib.error for damaged headers and data, RuntimeError for a local
# header flagged as encrypted.
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, NotImplementedError, UnicodeDecodeError, ValueError, EOFError,
               zlib.error, RuntimeError)


def default_bundle_path(folder: str | Path) -> Path:
    folder = Path(folder).resolve()  # "." has no name to add a suffix to
    return folder.with_name(folder.name + BUNDLE_SUFFIX)


# ---------------------------------------------------------------------------------------------- writing


def write_bundle(folder: str | Path, bundle: str | Path) -> Path:
    """Write the verified checkpoint in ``folder`` as one file ``bundle``, atomically (temp file, rename).

    The bundle holds the manifest and the files it lists; a resume folder's training state (a pickle) is left
    out, so a bundle never carries one. The written file is read back and verified before it is renamed
    into place.

    Raises:
        OptqaError: the checkpoint fails to verify, or the bundle could not be written (disk full, no
            permission), in which case a bundle already at ``bundle`` is kept as it was.
    """
    folder, manifest = read_manifest(folder)
    verify_files(folder, manifest)
    manifest_bytes, kept = shareable_files(folder, manifest)
    bundle = Path(bundle)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    # beside the target (a rename across drives is not atomic), created exclusively with the usual permissions
    temp = bundle.with_name(f"{bundle.name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")
    with write_failures_as_errors(bundle, lambda: f"the previous bundle {bundle}" if bundle.is_file() else None):
        try:
            with temp.open("xb") as raw:
                with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as archive:
                    archive.comment = bundle_comment()
                    _add_entry(archive, MANIFEST_NAME, manifest_bytes)
                    for name in sorted(kept):
                        _add_entry(archive, name, (folder / name).read_bytes())
                raw.flush()
                os.fsync(raw.fileno())  # on disk before the rename makes it the bundle
            with _extracted(temp):
                pass  # read back through the same checks an importer applies
            os.replace(temp, bundle)
        finally:
            temp.unlink(missing_ok=True)
    return bundle


def shareable_files(folder: Path, manifest: dict[str, Any]) -> tuple[bytes, list[str]]:
    """What a shared copy (bundle, Hub upload) of a verified checkpoint holds: the manifest's bytes and the
    names of the listed files, without training state (a pickle, never part of a shared delta).

    The manifest is kept byte for byte unless an entry had to be dropped from its list.
    """
    files = manifest["files"]
    kept = {name: entry for name, entry in files.items() if not name.endswith((".pt", ".bin", ".pkl"))}
    for name in sorted(set(files) - set(kept)):
        log.info("left out: %s (training state, not part of a shared delta)", name)
    manifest_bytes = ((folder / MANIFEST_NAME).read_bytes() if kept == files
                      else encode_manifest({**manifest, "files": kept}))  # with its own hash recomputed
    return manifest_bytes, sorted(kept)


def bundle_comment() -> bytes:
    """The zip comment: the format line, then the versions of optqa and the libraries that wrote the bundle
    (the manifest inside stays byte for byte the checkpoint's, so they cannot go there)."""
    from optqa.checkpoints.format import library_versions

    return BUNDLE_COMMENT + b"\n" + json.dumps({"exported_with": library_versions()}, sort_keys=True).encode()


def read_bundle_comment(bundle: Path) -> dict[str, Any]:
    """What :func:`bundle_comment` recorded (``{}`` for a bundle written before versions were recorded)."""
    with zipfile.ZipFile(bundle) as archive:
        _, _, rest = archive.comment.partition(b"\n")
    try:
        data = json.loads(rest) if rest else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _add_entry(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.create_system = 3  # unix attributes, so the regular-file bit above is meaningful everywhere
    archive.writestr(info, data)


# ---------------------------------------------------------------------------------------------- reading


def check_entry_name(name: str) -> str | None:
    """Why ``name`` may not be extracted, or None if it is a plain, portable file name."""
    if not name:
        return "an empty name"
    if "\x00" in name or any(ord(c) < 32 for c in name):
        return "control characters in the name"
    if "\\" in name:
        return "a backslash (a Windows path separator)"
    if name.startswith("/") or PureWindowsPath(name).is_absolute():
        return "an absolute path"
    if ":" in name or PureWindowsPath(name).drive:
        return "a drive letter or colon"
    parts = PurePosixPath(name).parts
    if ".." in parts or name in (".", ".."):
        return "a '..' component (it would write outside the target folder)"
    if len(parts) != 1 or name.endswith("/"):
        return "a folder part (a bundle holds plain file names only)"
    if name.split(".")[0].upper() in _WINDOWS_DEVICES or name.endswith((" ", ".")):
        return "a name Windows cannot create"
    return None


def _check_entries(bundle: Path, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    entries: dict[str, zipfile.ZipInfo] = {}
    seen: set[str] = set()
    if len(archive.infolist()) > MAX_ENTRIES:
        raise OptqaError(f"bundle {bundle} refused: it has {len(archive.infolist()):,} entries, more than the "
                         f"{MAX_ENTRIES} a bundle may hold")
    for info in archive.infolist():
        name = info.filename
        problem = check_entry_name(name)
        if problem:
            raise OptqaError(f"bundle {bundle} refused: entry {name!r} has {problem}")
        mode = info.external_attr >> 16
        if info.is_dir() or (mode and not stat.S_ISREG(mode)):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            raise OptqaError(f"bundle {bundle} refused: entry {name!r} is {kind}")
        if info.flag_bits & 0x1:
            raise OptqaError(f"bundle {bundle} refused: entry {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise OptqaError(f"bundle {bundle} refused: entry {name!r} uses an unsupported compression")
        if name.lower() in seen:
            raise OptqaError(f"bundle {bundle} refused: entry {name!r} appears twice")
        seen.add(name.lower())
        entries[name] = info
        _check_size(bundle, info)
    declared = sum(info.file_size for info in entries.values())
    if declared > MAX_TOTAL_BYTES:
        raise OptqaError(f"bundle {bundle} refused: its entries declare {declared:,} bytes in all, more than the "
                         f"{MAX_TOTAL_BYTES:,} a bundle may hold")
    stored, size = sum(info.compress_size for info in entries.values()), bundle.stat().st_size
    if stored > size:
        raise OptqaError(f"bundle {bundle} refused: its entries declare {stored:,} stored bytes, the file has "
                         f"{size:,}")
    return entries


def _check_size(bundle: Path, info: zipfile.ZipInfo) -> None:
    """Refuse a member whose declared size is too large, or too large for the bytes that store it (a zip bomb)."""
    name, size, stored = info.filename, info.file_size, info.compress_size
    if size > MAX_MEMBER_BYTES:
        raise OptqaError(f"bundle {bundle} refused: entry {name!r} declares {size:,} bytes, more than the "
                         f"{MAX_MEMBER_BYTES:,} a bundle member may hold")
    if info.compress_type == zipfile.ZIP_STORED and size != stored:
        raise OptqaError(f"bundle {bundle} refused: entry {name!r} is stored uncompressed but declares {size:,} "
                         f"bytes in {stored:,}")
    if size > max(RATIO_FREE_BYTES, stored * MAX_RATIO):
        raise OptqaError(f"bundle {bundle} refused: entry {name!r} would expand {stored:,} bytes into {size:,} "
                         f"(more than {MAX_RATIO}x: a zip bomb, not a delta)")


def _read_bundle_manifest(bundle: Path, archive: zipfile.ZipFile,
                          entries: dict[str, zipfile.ZipInfo]) -> dict[str, Any]:
    info = entries.get(MANIFEST_NAME)
    if info is None:
        raise OptqaError(f"{bundle} is not an optqa bundle: it has no {MANIFEST_NAME}")
    if info.file_size > MAX_MANIFEST_BYTES:
        raise OptqaError(f"bundle {bundle} refused: {MANIFEST_NAME} is {info.file_size} bytes, too large")
    try:
        manifest = json.loads(_read_limited(bundle, archive, info, MAX_MANIFEST_BYTES))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OptqaError(f"bundle {bundle}: damaged manifest, not valid JSON ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or WEIGHTS_NAME not in files:
        raise OptqaError(f"bundle {bundle}: the manifest lists no {WEIGHTS_NAME}")
    unlisted = sorted(set(entries) - set(files) - {MANIFEST_NAME})
    if unlisted:
        raise OptqaError(f"bundle {bundle} refused: entry {unlisted[0]!r} is not listed in its manifest")
    for name, expected in files.items():
        problem = check_entry_name(name)
        if problem:
            raise OptqaError(f"bundle {bundle} refused: the manifest lists {name!r}, which has {problem}")
        if name not in entries:
            raise OptqaError(f"integrity check failed: bundle {bundle} lacks {name}, which its manifest lists")
        if not isinstance(expected, dict) or entries[name].file_size != expected.get("bytes"):
            raise OptqaError(f"integrity check failed: {name} in bundle {bundle} has {entries[name].file_size} "
                             f"bytes, the manifest says {expected.get('bytes') if isinstance(expected, dict) else '?'}")
    return manifest


def _read_limited(bundle: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    data = bytearray()
    for block in _stream(bundle, archive, info, limit):
        data += block
    return bytes(data)


def _stream(bundle: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> Iterator[bytes]:
    """The entry's bytes, never more than ``limit`` (the declared size cannot be trusted either)."""
    total = 0
    try:
        with archive.open(info) as source:
            while block := source.read(_CHUNK):
                total += len(block)
                if total > limit:
                    raise OptqaError(f"bundle {bundle} refused: {info.filename} is larger than declared")
                yield block
    except _ZIP_ERRORS as exc:
        raise OptqaError(f"integrity check failed: {info.filename} in bundle {bundle} is damaged ({exc})") from None


def _extract_verified(bundle: Path, target: Path, hint: str = "") -> dict[str, Any]:
    """Check ``bundle`` fully, then stream its files into the existing empty folder ``target``.

    ``hint`` ends the line for a write the file system refused (what to do about a full temporary folder).
    """
    if not bundle.is_file():
        raise OptqaError(f"no bundle at {bundle}")
    if not zipfile.is_zipfile(bundle):
        raise OptqaError(f"{bundle} is not an optqa bundle (not a zip file) and not a checkpoint folder")
    try:
        archive = zipfile.ZipFile(bundle)
    except _ZIP_ERRORS as exc:
        raise OptqaError(f"{bundle} is not a readable bundle ({type(exc).__name__}: {exc})") from None
    root = target.resolve()
    with archive:
        entries = _check_entries(bundle, archive)
        manifest = _read_bundle_manifest(bundle, archive, entries)
        needed, free = sum(info.file_size for info in entries.values()), shutil.disk_usage(root).free
        if needed > free:
            raise OptqaError(f"could not extract bundle {bundle}: its files need {needed:,} bytes, {root} has "
                             f"{free:,} free; nothing was written{hint}")
        for name in [MANIFEST_NAME, *sorted(manifest["files"])]:
            destination = (root / name).resolve()
            if destination.parent != root:  # unreachable after check_entry_name; kept as the last line of defence
                raise OptqaError(f"bundle {bundle} refused: entry {name!r} would be written outside {root}")
            digest = hashlib.sha256()
            limit = MAX_MANIFEST_BYTES if name == MANIFEST_NAME else manifest["files"][name]["bytes"]
            try:
                with destination.open("xb") as out:
                    for block in _stream(bundle, archive, entries[name], limit):
                        digest.update(block)
                        out.write(block)
            except OSError as exc:
                reason = write_failure(exc)
                if reason is None:
                    raise
                raise OptqaError(f"could not extract bundle {bundle}: writing {destination} failed: {reason}"
                                 f"{hint}") from None
            expected = None if name == MANIFEST_NAME else manifest["files"][name].get("sha256")
            if expected is not None and digest.hexdigest() != expected:
                raise OptqaError(f"integrity check failed: {name} in bundle {bundle} has SHA-256 "
                                 f"{digest.hexdigest()[:16]}..., the manifest says {str(expected)[:16]}... "
                                 "(the file was modified)")
    return manifest


@contextlib.contextmanager
def _extracted(bundle: Path) -> Iterator[Path]:
    temp = Path(tempfile.mkdtemp(prefix="optqa-bundle-"))
    try:
        _extract_verified(bundle, temp, f"; the bundle is unchanged: make room in {temp.parent} or set TMPDIR to "
                                        "a folder with room")
        yield temp
    finally:
        # a mapped weights file can still be open on Windows; leftovers in the temp dir must not fail a load
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def open_source(path: str | Path) -> Iterator[tuple[Path, Pulled | None]]:
    """Every delta path optqa accepts, as a folder on disk: a checkpoint folder as is, a bundle extracted and
    verified into a temporary folder (removed after), ``hf://OWNER/NAME[@REVISION]`` pulled into the Hugging
    Face cache (its snapshot folder). The caller verifies the folder's files against its manifest.

    Yields:
        ``(folder, Pulled or None)``: the Pulled record names the repository, revision and commit.

    Raises:
        OptqaError: a bundle that fails its checks, or a Hub name that cannot be pulled.
    """
    from optqa.checkpoints.hub import resolve_source

    local, pulled = resolve_source(path)
    local = Path(local)
    if local.is_dir() or not local.exists() and local.suffix != BUNDLE_SUFFIX:
        yield local, pulled  # read_manifest explains a missing folder
        return
    with _extracted(local) as folder:
        log.info("bundle %s: files extracted and SHA-256 verified", local)
        yield folder, pulled


@contextlib.contextmanager
def open_checkpoint(path: str | Path) -> Iterator[Path]:
    """:func:`open_source`'s folder alone."""
    with open_source(path) as (folder, _):
        yield folder


def unpack_bundle(bundle: str | Path, folder: str | Path) -> Path:
    """Verify ``bundle`` and write its files as the checkpoint folder ``folder`` (which must not exist yet)."""
    bundle, folder = Path(bundle), Path(folder)
    if folder.exists():
        raise OptqaError(f"{folder} already exists; unpack a bundle into a new folder")
    return write_folder_atomically(folder, lambda partial: _extract_verified(bundle, partial))
