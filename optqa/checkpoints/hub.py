"""Sharing deltas through the Hugging Face Hub: ``hf://OWNER/NAME[@REVISION]`` pulls and ``--mode push``.

Everything goes through ``huggingface_hub`` (``snapshot_download``, ``HfApi.create_repo`` / ``upload_folder``,
``ModelCard``), so the token, the cache (``HF_HUB_CACHE``), ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` behave as in
every other Hugging Face tool. A pulled snapshot is then treated exactly like a local checkpoint folder: every
file's SHA-256 against the manifest, then the backbone's fingerprint. A pushed repository holds the checkpoint
byte for byte, the PEFT adapter where PEFT has the method (so ``PeftModel.from_pretrained(base, "OWNER/NAME")``
works too), and a model card.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

from optqa.errors import OptqaError

log = logging.getLogger(__name__)

HUB_PREFIX = "hf://"
# A full commit hash; huggingface_hub names snapshot folders by it.
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
LOGIN_HINT = "run `hf auth login` (`huggingface-cli login` with older huggingface_hub) or set HF_TOKEN"


# ---------------------------------------------------------------------------------------------- pulling


@dataclasses.dataclass(frozen=True)
class HubRef:
    """A delta on the Hub: ``repo_id`` (``OWNER/NAME``) and ``revision`` (branch, tag or commit; None: main)."""
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclasses.dataclass(frozen=True)
class Pulled:
    """A snapshot in the local Hugging Face cache: what was asked for, the commit it resolved to, its folder."""
    ref: HubRef
    commit: str
    folder: Path

    def describe(self) -> str:
        return f"{self.ref} -> commit {self.commit} ({self.folder})"

    def as_dict(self) -> dict[str, Any]:
        return {"repo_id": self.ref.repo_id, "revision": self.ref.revision or "main", "commit": self.commit}


def parse_hub_path(path: Any) -> HubRef | None:
    """``hf://OWNER/NAME`` or ``hf://OWNER/NAME@REVISION`` as a HubRef; anything else (a local path) None.

    Raises:
        OptqaError: the text starts with ``hf://`` but is not a valid repository id.
    """
    if not isinstance(path, str) or not path.startswith(HUB_PREFIX):
        return None  # a Path cannot hold "hf://" (it collapses the double slash): only strings are hub names
    body = path[len(HUB_PREFIX):]
    repo_id, _, revision = body.partition("@")
    if "@" in body and not revision:
        raise OptqaError(f"{path}: nothing after '@'; write hf://OWNER/NAME@REVISION (a branch, tag or commit)")
    validate_repo_id(repo_id, path)
    return HubRef(repo_id, revision or None)


def validate_repo_id(repo_id: str, shown: str) -> None:
    """Raise OptqaError unless ``repo_id`` is ``OWNER/NAME`` by huggingface_hub's own rules."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    if repo_id.count("/") != 1:
        raise OptqaError(f"{shown}: a Hub repository is named OWNER/NAME (e.g. hf://alice/opt125m-arcda-lora)")
    try:
        hub_validate(repo_id)
    except HFValidationError as exc:
        raise OptqaError(f"{shown}: not a valid Hub repository id ({str(exc).splitlines()[0]})") from None


def pull(ref: HubRef) -> Pulled:
    """Download (or find in the cache) the snapshot of ``ref`` with ``huggingface_hub.snapshot_download``.

    Files land in the standard cache (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``); with
    ``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached, the cached snapshot of the revision is used.
    Nothing here is trusted: the caller verifies the files against the manifest as for a local folder.

    Returns:
        Pulled: the resolved commit hash and the snapshot folder.

    Raises:
        OptqaError: one line for an unknown repository or revision, or no network and no cached copy.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from optqa.hub_access import hub_unreachable

    revision = ref.revision or "main"
    unreachable = hub_unreachable()  # then the cache alone, at once, instead of a minute of retries
    try:
        folder = Path(snapshot_download(ref.repo_id, revision=revision, local_files_only=bool(unreachable)))
    except GatedRepoError:
        raise OptqaError(f"{ref}: the repository is gated; accept its conditions on the Hub and {LOGIN_HINT}") from None
    except RevisionNotFoundError:
        raise OptqaError(f"{ref}: the repository has no revision {revision!r} (a branch, tag or commit)") from None
    except RepositoryNotFoundError:
        raise OptqaError(f"{ref}: no such repository on the Hub ({constants.ENDPOINT}), or it is private and "
                         f"no token with access was sent: check the name, or {LOGIN_HINT}") from None
    except LocalEntryNotFoundError as exc:
        # IncompleteSnapshotError (huggingface_hub 2.x) is a LocalEntryNotFoundError: a download cut short
        if type(exc).__name__ == "IncompleteSnapshotError":
            raise OptqaError(f"{ref}: the cached snapshot is incomplete and the Hub cannot be reached; pull it "
                             "again with network access") from None
        why = ("HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE
               else f"the Hub at {constants.ENDPOINT} cannot be reached" + (f" ({unreachable})" if unreachable else ""))
        raise OptqaError(f"{ref} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: pull it "
                         f"once with network access (python -m optqa --mode inspect --delta_save_path {ref}), "
                         "or copy that cache folder from a machine that has it") from None
    except HfHubHTTPError as exc:
        raise OptqaError(f"{ref}: the Hub refused the download ({str(exc).splitlines()[0]})") from None
    # snapshot_download returns <cache>/models--OWNER--NAME/snapshots/<commit>
    commit = folder.name
    if not COMMIT_RE.match(commit):
        raise OptqaError(f"{ref}: huggingface_hub returned {folder}, not a snapshot folder named by its commit")
    pulled = Pulled(ref, commit, folder)
    log.info("pulled %s: commit %s, files in %s", ref, commit, folder)
    return pulled


def resolve_source(path: str | Path) -> tuple[str | Path, Pulled | None]:
    """Where a delta path (``--delta_save_path``) lives on disk: a hub name is pulled, anything else is returned.

    Returns:
        ``(local path, Pulled or None)``.
    """
    ref = parse_hub_path(path)
    if ref is None:
        return path, None
    pulled = pull(ref)
    return pulled.folder, pulled


def pin_source(path: str | Path) -> str | Path:
    """A Hub name pinned to the commit its revision resolves to now (pulled once); anything else unchanged.

    A command that reads a delta several times (export: the bundle, then the PEFT folder) reads the same commit
    every time, from the cache, even if the branch moves meanwhile.
    """
    ref = parse_hub_path(path)
    if ref is None:
        return path
    return str(HubRef(ref.repo_id, pull(ref).commit))


def default_export_name(path: str | Path) -> str | None:
    """For a hub name, the file name an export writes to the working folder (``NAME.optqa``); else None.

    The snapshot lives in the shared cache, which is no place for new files.
    """
    ref = parse_hub_path(path)
    return None if ref is None else ref.repo_id.split("/")[1]


# ---------------------------------------------------------------------------------------------- pushing


# ---------------------------------------------------------------------------------------------- the model card


