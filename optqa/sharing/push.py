"""``--mode push``: upload a delta to the Hugging Face Hub through ``huggingface_hub`` (``HfApi.create_repo`` /
``upload_folder``), as the checkpoint byte for byte, the PEFT adapter where PEFT has the method (so
``PeftModel.from_pretrained(base, "OWNER/NAME")`` works too) and a model card with YAML front matter.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from optqa.checkpoints.format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    MANIFEST_NAME,
    MODEL_CARD_NAME,
    PEFT_TEMPLATE_NAME,
)
from optqa.checkpoints.hub import LOGIN_HINT, validate_repo_id
from optqa.errors import OptqaError
from optqa.sharing.card import model_card
from optqa.sharing.export import peft_export_problem, write_peft_adapter

log = logging.getLogger(__name__)


def push(config) -> list[str]:
    """``--mode push``: upload ``--delta_save_path`` to ``--hub_repo`` (or, with ``--dry_run``, write the folder
    that would be uploaded to ``--export_path``). Returns the lines to print. ``config.plm_path`` None: the
    backbone the checkpoint records.

    Raises:
        OptqaError: no --hub_repo, an invalid repository id, no token, offline mode, or the Hub refusing.
    """
    if not config.hub_repo:
        raise OptqaError("--mode push needs --hub_repo OWNER/NAME (the Hub repository to create or update)")
    validate_repo_id(config.hub_repo, f"--hub_repo {config.hub_repo}")
    if config.dry_run:
        if not config.export_path:
            raise OptqaError("--dry_run writes the folder it would upload to --export_path; pass --export_path DIR")
        target = build_upload_folder(config, Path(config.export_path))
        return [f"dry run: nothing uploaded; the folder that would go to {config.hub_repo} is {target}:",
                *_listing(target)]
    api, user = _hub_session()
    from huggingface_hub.errors import HfHubHTTPError

    with tempfile.TemporaryDirectory(prefix="optqa-push-") as temp:
        folder = build_upload_folder(config, Path(temp) / "upload")
        try:
            api.create_repo(config.hub_repo, private=config.private, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=config.hub_repo, folder_path=str(folder), repo_type="model",
                                     commit_message=config.commit_message or _default_message(folder))
        except HfHubHTTPError as exc:
            raise OptqaError(f"the Hub refused the push to {config.hub_repo} ({str(exc).splitlines()[0]}); "
                             f"check that your token can write there ({LOGIN_HINT})") from None
        except ValueError as exc:  # the Hub's validation of the card's metadata
            raise OptqaError(f"the Hub refused the push to {config.hub_repo}: "
                             + "; ".join(line.strip() for line in str(exc).splitlines())) from None
        except _network_errors() as exc:
            raise OptqaError(f"could not reach the Hub at {api.endpoint} ({type(exc).__name__}): "
                             f"{str(exc).splitlines()[0] if str(exc) else 'no details'}") from None
        listing = _listing(folder)
    commit = getattr(info, "oid", None) or "?"
    # the commit's page (str(info) is the folder's URL on huggingface_hub < 1.0)
    return [f"pushed {len(listing)} files to {config.hub_repo} as {user} (commit {commit}): "
            f"{getattr(info, 'commit_url', None) or info}",
            *listing, f"pull it with --delta_save_path hf://{config.hub_repo}@{commit}"]


def _hub_session():
    """An authenticated HfApi and the user name, checked before anything is built or loaded."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise OptqaError("HF_HUB_OFFLINE=1 is set: a push needs the network; unset it (or use --dry_run to write "
                         "the folder only)")
    token = get_token()
    if not token:
        raise OptqaError(f"no Hugging Face token found: {LOGIN_HINT} (a token with write access)")
    api = HfApi(token=token)
    try:
        user = api.whoami()["name"]
    except (HfHubHTTPError, *_network_errors()) as exc:
        # huggingface_hub < 1.0 raises requests' HTTPError (an OSError) for a refused token: the answer's status
        # code, not the exception's class, says whether the Hub was reached
        if isinstance(exc, HfHubHTTPError) or getattr(getattr(exc, "response", None), "status_code", None):
            raise OptqaError(f"the Hub at {api.endpoint} did not accept the token ({str(exc).splitlines()[0]}); "
                             f"{LOGIN_HINT}") from None
        raise OptqaError(f"could not reach the Hub at {api.endpoint} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no details'}); check the network, or use "
                         "--dry_run to write the folder only") from None
    return api, user


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failed connection raises: huggingface_hub's HTTP client (httpx2 in 2.x, httpx in 1.x,
    requests before) has its own hierarchy, not OSError."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except ImportError:
            pass
    return tuple(errors)


def _default_message(folder: Path) -> str:
    from optqa.checkpoints.format import WEIGHTS_NAME, read_json

    manifest = read_json(folder / MANIFEST_NAME, "damaged manifest")
    return (f"optqa {manifest['delta']['delta_type']} delta for {manifest['backbone']['name_or_path']} "
            f"(weights sha256 {manifest['files'][WEIGHTS_NAME]['sha256'][:12]})")


def _listing(folder: Path) -> list[str]:
    from optqa.checkpoints.format import sha256_file

    return [f"  {path.name}  {path.stat().st_size:,} bytes  sha256 {sha256_file(path)[:16]}"
            for path in sorted(folder.iterdir()) if path.is_file()]


def build_upload_folder(config, target: Path) -> Path:
    """Write the folder a push uploads into ``target`` (a new or empty folder): the checkpoint's manifest and
    files byte for byte, the PEFT adapter files where PEFT has the method, and the model card README.md.

    Returns:
        The written folder.
    """
    from optqa.checkpoints.bundle import open_checkpoint, shareable_files
    from optqa.checkpoints.format import read_manifest, verify_files, write_folder_atomically
    from optqa.checkpoints.peft import is_peft_adapter

    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OptqaError(f"{target} already exists and is not empty; choose a new --export_path for the dry run")
    source = config.delta_save_path
    with open_checkpoint(source) as folder:
        if is_peft_adapter(folder):
            raise OptqaError(f"{source} is a plain PEFT adapter, not an optqa checkpoint: convert it first (python -m "
                             f"optqa --mode export --delta_save_path {source} --template ...), then push the bundle")
        folder, manifest = read_manifest(folder)
        verify_files(folder, manifest)
        manifest_bytes, names = shareable_files(folder, manifest)
        problem = peft_export_problem(manifest) if config.export_peft else "--no-export_peft was given"
        base_model = _base_model(config, manifest)

        def write(out: Path) -> None:
            (out / MANIFEST_NAME).write_bytes(manifest_bytes)
            for name in names:
                shutil.copyfile(folder / name, out / name)
            if problem is None:
                _add_peft_adapter(config, folder, manifest, base_model, out)
            else:
                log.info("no PEFT adapter in the upload: %s", problem)
                card = model_card(manifest, base_model=base_model, repo_id=config.hub_repo, peft_problem=problem)
                (out / MODEL_CARD_NAME).write_text(card, encoding="utf-8", newline="\n")

        return write_folder_atomically(target, write)


def _add_peft_adapter(config, folder: Path, manifest: dict[str, Any], base_model: str | None,
                      out: Path) -> None:
    """The PEFT adapter (``write_peft_adapter``) and its card, naming the Hub repository, into ``out``."""
    def card(prompt: str) -> str:
        return model_card(manifest, base_model=base_model, adapter=config.hub_repo, prompt=prompt,
                          repo_id=config.hub_repo)

    with tempfile.TemporaryDirectory(prefix="optqa-peft-") as temp:
        adapter = write_peft_adapter(folder, Path(temp) / "adapter", manifest,
                                     config.plm_path,
                                     config.ignore_backbone_mismatch, card=card)
        for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_TEMPLATE_NAME, MODEL_CARD_NAME):
            shutil.copyfile(adapter / name, out / name)
    _finish_adapter_config(out / ADAPTER_CONFIG_NAME, base_model)


def _finish_adapter_config(path: Path, base_model: str | None) -> None:
    """PEFT records the backbone's local folder; on the Hub the adapter names the Hub model (AutoPeftModel loads
    the backbone from it). PEFT writes target_modules from a set, in an order that changes between runs:
    sorted, the same delta always gives the same upload."""

    config = json.loads(path.read_text(encoding="utf-8"))
    if base_model:
        config["base_model_name_or_path"] = base_model
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8", newline="\n")


def _base_model(config, manifest: dict[str, Any]) -> str | None:
    """The backbone's Hub id for the card: --base_model, else the manifest's name if it is a Hub id (a local
    folder names nothing on the Hub)."""
    if config.base_model:
        if "/" in config.base_model:  # legacy Hub models ("gpt2") have no owner part
            validate_repo_id(config.base_model, f"--base_model {config.base_model}")
        return config.base_model
    name = str(manifest["backbone"]["name_or_path"])
    from optqa.plm import _looks_like_a_path

    if Path(name).expanduser().exists() or _looks_like_a_path(name) or name.count("/") != 1:
        log.warning("the backbone %s is a local folder: the card names no base_model (pass --base_model "
                    "OWNER/NAME, e.g. facebook/opt-125m, if it is a copy of a Hub model)", name)
        return None
    return name
