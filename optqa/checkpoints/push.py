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

from optqa.checkpoints.export import python_string
from optqa.checkpoints.format import library_versions
from optqa.checkpoints.hub import LOGIN_HINT, validate_repo_id
from optqa.config import REGISTRY
from optqa.errors import OptqaError

log = logging.getLogger(__name__)


CARD_NAME = "README.md"


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
    from optqa.checkpoints.format import MANIFEST_NAME, WEIGHTS_NAME, read_json

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
    from optqa.checkpoints.export import PEFT_TEMPLATE_NAME, peft_export_problem, write_peft_adapter
    from optqa.checkpoints.format import MANIFEST_NAME, read_manifest, verify_files, write_folder_atomically

    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OptqaError(f"{target} already exists and is not empty; choose a new --export_path for the dry run")
    from optqa.checkpoints.peft import is_peft_adapter

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
            peft_files = []
            if problem is None:
                with tempfile.TemporaryDirectory(prefix="optqa-peft-") as temp:
                    adapter = write_peft_adapter(folder, Path(temp) / "adapter", manifest,
                                                 config.plm_path,
                                                 config.ignore_backbone_mismatch)
                    for name in ("adapter_config.json", "adapter_model.safetensors", PEFT_TEMPLATE_NAME):
                        shutil.copyfile(adapter / name, out / name)
                        peft_files.append(name)
                    _finish_adapter_config(out / "adapter_config.json", base_model)
            else:
                log.info("no PEFT adapter in the upload: %s", problem)
            card = model_card(manifest, config.hub_repo, base_model, peft_files, problem, library_versions())
            (out / CARD_NAME).write_text(card, encoding="utf-8", newline="\n")

        return write_folder_atomically(target, write)


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


METHOD_TAGS = {name: entry.hub_tag for name, entry in REGISTRY.items()}


def prompt_preview(template: str, question: str) -> str:
    """The text a template puts before the answer for ``question``, as the model sees it after its bos token:
    optqa's own rendering (``optqa.template.piece_texts``: the same white space rules, and no ``str.format`` of
    any text), soft tokens shown as ``<soft:N>``, special tokens by name, meta fields as ``{name}``."""
    from optqa.template import FieldNames, parse_template, piece_texts

    example = FieldNames(text_a=question.strip(), text_b="", meta=FieldNames(), guid="card")
    out = []
    for piece, text in piece_texts(parse_template(template, "checkpoint template"), example):
        if piece.kind == "soft":
            out.append(f"<soft:{piece.value or ''}>")
        elif piece.kind == "special":
            out.append(piece.value)
        else:
            out.append(text)
    return "".join(out)


def _dataset_name(hyper: dict[str, Any]) -> str:
    train = hyper.get("train_file")
    return Path(str(train)).parent.name if train else Path(str(hyper.get("data_path") or "data")).name


def model_card(manifest: dict[str, Any], repo_id: str, base_model: str | None, peft_files: list[str],
               peft_problem: str | None, versions: dict[str, str]) -> str:
    """The README.md of a pushed delta: YAML front matter the Hub reads (base_model, library_name, tags,
    datasets, model-index with dev/test F1 and EM) and a text with the template, delta config, exact prompt,
    versions, and how to load it with optqa and with PEFT.

    Returns:
        The card's text.
    """

    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    delta = manifest["delta"]
    delta_type = delta["delta_type"]
    hyper = manifest.get("hyperparameters") or {}
    metrics = manifest.get("metrics") or {}
    dataset = _dataset_name(hyper)
    name = repo_id.split("/")[1]
    results = []
    for split in ("dev", "test"):
        scores = metrics.get(split)
        if isinstance(scores, dict) and "f1" in scores:
            for metric, label in (("f1", "F1"), ("em", "exact_match")):
                results.append(EvalResult(task_type="question-answering", dataset_type=dataset, dataset_name=dataset,
                                          dataset_split=split, metric_type=label.lower(), metric_name=label,
                                          metric_value=round(float(scores[metric]), 2)))
    tags = ["optqa", "delta-tuning", METHOD_TAGS.get(delta_type, delta_type), "question-answering", "opt"]
    data = ModelCardData(base_model=base_model, library_name="peft" if peft_files else "optqa",
                         tags=tags + (["peft"] if peft_files else []), datasets=[dataset],
                         eval_results=results or None, model_name=name if results else None,
                         pipeline_tag="text-generation")
    backbone = manifest["backbone"]
    question = "Which gas do plants take in from the air?"
    template = manifest["template"].strip("\n")
    rows = [f"| {split} | {metrics[split]['f1']:.2f} | {metrics[split].get('em', 0):.2f} | "
            f"{metrics[split].get('count', '?')} |" for split in ("dev", "test")
            if isinstance(metrics.get(split), dict) and "f1" in metrics[split]]
    hub_name = base_model or "OWNER/BACKBONE"
    lines = [
        f"# {name}",
        "",
        f"A {delta_type} delta (parameter-efficient tuning) of the OPT backbone "
        f"`{base_model or backbone['name_or_path']}` for direct-answer question answering, trained with optqa on "
        f"`{dataset}`. {manifest.get('trainable_parameters', '?'):,} trainable parameters; the backbone itself "
        "is not in this repository.",
        "",
        "## Scores",
        "",
        *(["| split | F1 | EM | questions |", "| --- | --- | --- | --- |", *rows] if rows
          else ["No scores were recorded with this delta."]),
        "",
        "Token F1 and exact match in percent, SQuAD-style normalisation, best match over all gold answers.",
        "",
        "## Prompt",
        "",
        "Template (OpenPrompt `ManualTemplate` syntax):",
        "",
        "```text", template, "```",
        "",
        f"For the question `{question}` the model sees its bos token followed by exactly this text, and the "
        "answer is generated after it (greedy, up to "
        f"{hyper.get('max_new_tokens', '?')} new tokens, ending at eos):",
        "",
        "```text", prompt_preview(template, question), "```",
        "",
        "## Delta",
        "",
        "```json", json.dumps(delta, indent=2), "```",
        "",
        f"Backbone: `{backbone['name_or_path']}` ({backbone['architecture']}); weight fingerprint "
        f"`{backbone['fingerprint']}` (optqa refuses to load this delta onto a backbone with other weights).",
        "",
        "## Use it with optqa",
        "",
        "```bash",
        f"python -m optqa --mode interactive_inference --delta_save_path hf://{repo_id}"
        + ("" if base_model == backbone["name_or_path"] else f" --plm_path {base_model or '/path/to/backbone'}"),
        f"python -m optqa --mode inspect --delta_save_path hf://{repo_id}@<commit>   # pin a revision",
        "```",
        "",
        "optqa downloads into the Hugging Face cache, checks every file's SHA-256 against `optqa_manifest.json` "
        "and the backbone's fingerprint before using a weight; `HF_HUB_OFFLINE=1` uses the cache alone.",
        "",
    ]
    if peft_files:
        lines += [
            "## Use it with PEFT",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{hub_name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{hub_name}")',
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            f"prompt = {python_string(prompt_preview(template, question))}  # the template above, in "
            f"{peft_files[-1]}",
            'ids = tokenizer(prompt, return_tensors="pt")  # adds the bos token, as optqa does',
            "answer = model.generate(**ids, max_new_tokens=32)[0, ids['input_ids'].shape[1]:]",
            "print(tokenizer.decode(answer, skip_special_tokens=True).strip())",
            "```",
            "",
        ]
    else:
        lines += [f"PEFT cannot load this delta: {peft_problem}.", ""]
    lines += ["## Made with", "", "| package | version |", "| --- | --- |",
              *(f"| {k} | {v} |" for k, v in versions.items())]
    if manifest.get("versions"):
        lines += ["", "The checkpoint itself was saved with: "
                  + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()) + "."]
    body = "\n".join(lines) + "\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
