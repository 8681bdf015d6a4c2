"""Fetch the ARC-DA v1.1 data set, check it against pinned checksums and install it atomically."""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from optqa.errors import OptqaError

log = logging.getLogger(__name__)

ARC_DA_URL = "https://aristo-data-public.s3-us-west-2.amazonaws.com/arc-da/ARC-DA-v1.1.zip"

FILES = ("train.jsonl", "dev.jsonl", "test.jsonl")

# name -> (line count, sha256) of the official v1.1 release.
PINNED = {
    "train.jsonl": (1250, "e1a03ce651474e1f6d22d16efd2e5c882ddda67ff43374ebc434e90d9ae40775"),
    "dev.jsonl": (338, "a09fce1f32823c18fa127d9ea82c629efc36948fe52f118b679d60f4e9149ae1"),
    "test.jsonl": (1397, "fd34f406a0c6414e183ff7ad614fd963617ee5c72f3d2c52f842ce98cecca3a9"),
}

_CHUNK = 1 << 16
# The real splits are under 1 MB each; a far larger member is a damaged or hostile zip (a "zip bomb").
MAX_MEMBER_BYTES = 64 << 20


def has_data(data_path: str | Path) -> bool:
    data_path = Path(data_path)
    return all((data_path / name).is_file() for name in FILES)


def ensure_data(
    data_path: str | Path, url: str = ARC_DA_URL, allow_checksum_mismatch: bool = False
) -> Path:
    """Return ``data_path``, downloading ARC-DA into it first if any split is missing."""
    data_path = Path(data_path).expanduser()
    if has_data(data_path):
        return data_path
    return download_arc_da(data_path, url=url, allow_checksum_mismatch=allow_checksum_mismatch)


def download_arc_da(
    data_path: str | Path,
    url: str = ARC_DA_URL,
    allow_checksum_mismatch: bool = False,
    pinned: dict[str, tuple[int, str]] = PINNED,
    timeout: float = 30.0,
) -> Path:
    """Download the ARC-DA zip and install train/dev/test.jsonl into ``data_path``.

    Everything happens in a staging folder next to ``data_path`` so that only a fully checked
    download ever becomes visible; any failure leaves ``data_path`` as it was.
    """
    data_path = Path(data_path).expanduser()
    if has_data(data_path):
        return data_path
    if data_path.exists() and not data_path.is_dir():
        raise OptqaError(f"data path {data_path} exists but is not a folder")

    # Staging in the same parent keeps the final rename on one file system, hence atomic.
    parent = data_path.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{data_path.name or 'data'}-download-", dir=parent))
    except OSError as e:
        raise OptqaError(f"cannot create a download folder in {parent} ({_one_line(e)})") from None

    try:
        archive = staging / "ARC-DA.zip"
        files = staging / "files"
        files.mkdir()
        log.info("downloading ARC-DA from %s", url)
        _fetch(url, archive, data_path, timeout)
        _extract(archive, files, url)
        _verify(files, pinned, allow_checksum_mismatch)
        _install(files, data_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("ARC-DA installed in %s", data_path)
    return data_path


def _fetch(url: str, dest: Path, data_path: Path, timeout: float) -> None:
    def offline(reason: object) -> OptqaError:
        return OptqaError(
            f"could not download ARC-DA from {url} ({_one_line(reason)}); place "
            f"{', '.join(FILES[:-1])} and {FILES[-1]} in {data_path} by hand "
            "(from the ARC-DA v1.1 zip) or pass --data_path"
        )

    request = urllib.request.Request(url, headers={"User-Agent": "optqa"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        raise offline(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise offline(e.reason) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise offline(e) from None

    length = response.headers.get("Content-Length", "")
    total = int(length) if length.strip().isdigit() else None
    received = 0
    # disable=None hides the bar when stderr is not a terminal, so logs stay clean.
    with response, dest.open("wb") as out, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="ARC-DA", disable=None
    ) as bar:
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise offline(f"transfer interrupted after {received} bytes: {e!r}") from None
            if not chunk:
                break
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    # http.client returns a short body without complaint when the server hangs up early.
    if total is not None and received < total:
        raise offline(f"transfer truncated: got {received} of {total} bytes")


def _unsafe_member(name: str) -> bool:
    posix = name.replace("\\", "/")
    return (
        posix.startswith("/")
        or ".." in posix.split("/")
        or bool(PureWindowsPath(name).drive)
        or ":" in posix.split("/")[0]
    )


def _extract(archive: Path, dest: Path, url: str) -> None:
    """Copy the three split files out of ``archive`` into ``dest``, wherever they sit in it."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            bad = [m.filename for m in members if _unsafe_member(m.filename)]
            if bad:
                raise OptqaError(
                    f"refusing the ARC-DA zip from {url}: member {bad[0]!r} points outside the archive"
                )
            for name in FILES:
                candidates = [
                    m for m in members
                    if not m.is_dir() and PurePosixPath(m.filename.replace("\\", "/")).name == name
                ]
                if not candidates:
                    raise OptqaError(f"the ARC-DA zip from {url} has no {name}")
                # The official zip nests the splits in one top folder; prefer the shallowest copy.
                candidates.sort(key=lambda m: m.filename.count("/"))
                if len(candidates) > 1 and candidates[0].filename.count("/") == candidates[1].filename.count("/"):
                    raise OptqaError(f"the ARC-DA zip from {url} has several {name} files")
                if candidates[0].file_size > MAX_MEMBER_BYTES:
                    raise OptqaError(f"refusing the ARC-DA zip from {url}: {name} would unpack to "
                                     f"{candidates[0].file_size} bytes (more than {MAX_MEMBER_BYTES})")
                # Writing to our own fixed name means nothing in the zip chooses where bytes land.
                with zf.open(candidates[0]) as src, (dest / name).open("wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        # zipfile's own messages can quote raw header bytes; keep them out of the one-line error.
        log.debug("zip check failed: %r", e)
        raise OptqaError(
            f"the file downloaded from {url} is not a valid zip (damaged or incomplete); try again"
        ) from None


def _digest(path: Path) -> tuple[int, str]:
    sha, lines = hashlib.sha256(), 0
    with path.open("rb") as f:
        for line in f:
            sha.update(line)
            lines += 1
    return lines, sha.hexdigest()


def _verify(folder: Path, pinned: dict[str, tuple[int, str]], allow_mismatch: bool) -> None:
    problems = []
    for name in FILES:
        want_lines, want_sha = pinned[name]
        lines, sha = _digest(folder / name)
        if (lines, sha) != (want_lines, want_sha):
            problems.append(
                f"{name}: expected sha256 {want_sha} ({want_lines} lines), got {sha} ({lines} lines)"
            )
    if not problems:
        return
    message = "ARC-DA checksum mismatch: " + "; ".join(problems)
    if not allow_mismatch:
        raise OptqaError(message + "; pass --allow_checksum_mismatch to use these files anyway")
    log.warning("%s; keeping them because of --allow_checksum_mismatch", message)


def _install(staged: Path, data_path: Path) -> None:
    try:
        if not data_path.exists():
            # One rename: the folder appears complete or not at all.
            staged.replace(data_path)
        else:
            # A partial folder may hold the user's own files; only replace the splits.
            for name in FILES:
                (staged / name).replace(data_path / name)
    except OSError as e:
        raise OptqaError(f"cannot move the ARC-DA files into {data_path} ({_one_line(e)})") from None


def _one_line(value: object) -> str:
    return " ".join(str(value).split())
