"""The model card (README.md) of a shared delta: one writer for the exported PEFT folder and the pushed Hub
repository.

It is written with ``huggingface_hub``'s ``ModelCard``/``ModelCardData`` (the YAML front matter the Hub reads:
base_model, library_name, tags, datasets, model-index with dev/test F1 and EM) and a text that gives the
template, the exact prompt optqa renders, the delta config and backbone fingerprint, how to load the delta with
optqa (a pushed one) and with plain transformers + PEFT (where PEFT has the method), and the versions.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optqa.checkpoints.format import PEFT_TEMPLATE_NAME, library_versions, recorded_config
from optqa.checkpoints.inspect import training_text
from optqa.config import REGISTRY

# the question the card's prompt preview renders, and the one its PEFT code answers
PREVIEW_QUESTION = "Which gas do plants take in from the air?"
CODE_QUESTION = "What is frozen water called?"


def model_card(manifest: dict[str, Any], *, base_model: str | None, adapter: str | None = None,
               prompt: str | None = None, repo_id: str | None = None, peft_problem: str | None = None) -> str:
    """The card of a delta checkpoint.

    Args:
        manifest: the checkpoint's manifest.
        base_model: the backbone's name for the metadata and the code (a Hub id; an exported folder's card may
            name the local backbone); None: a pushed delta whose backbone has no Hub id.
        adapter: what ``PeftModel.from_pretrained`` loads the PEFT adapter from (the exported folder's name, or
            the Hub repository); None: there is no PEFT adapter, and ``peft_problem`` says why.
        prompt: the template as a format string with ``{text_a}`` (``ManualTemplate.prompt_format``); needed
            with ``adapter``.
        repo_id: the Hub repository the delta is pushed to (the card then says how optqa pulls it).
    Returns:
        Markdown text with YAML front matter.
    """
    from huggingface_hub import ModelCard

    delta = manifest["delta"]
    method = REGISTRY[delta["delta_type"]].title if delta["delta_type"] in REGISTRY else delta["delta_type"]
    name = repo_id.split("/")[1] if repo_id else Path(str(adapter or "delta")).name
    max_new_tokens = recorded_config(manifest.get("hyperparameters") or {}, "hyperparameters.").max_new_tokens
    lines = [f"# {name}", "", *_summary(manifest, method, base_model, adapter), "", *_scores(manifest), "",
             *_prompt(manifest, prompt, max_new_tokens), "", *_delta(manifest), ""]
    if repo_id:
        lines += [*_with_optqa(manifest, repo_id, base_model), ""]
    if adapter:
        lines += [*_with_peft(base_model, adapter, prompt, max_new_tokens), ""]
    else:
        lines += [f"PEFT cannot load this delta: {peft_problem}.", ""]
    lines += _versions(manifest)
    front = _front_matter(manifest, base_model, adapter is not None, name)
    return str(ModelCard(f"---\n{front}\n---\n\n" + "\n".join(lines) + "\n"))


def _front_matter(manifest: dict[str, Any], base_model: str | None, peft: bool, name: str) -> str:
    """The YAML the Hub reads: base model, library, tags, dataset and (where scores were recorded) model-index."""
    from huggingface_hub import EvalResult, ModelCardData

    delta_type = manifest["delta"]["delta_type"]
    metrics = manifest.get("metrics") or {}
    dataset = _dataset_name(manifest.get("hyperparameters") or {})
    results = [EvalResult(task_type="question-answering", dataset_type=dataset, dataset_name=dataset,
                          dataset_split=split, metric_type=label.lower(), metric_name=label,
                          metric_value=round(float(metrics[split][metric]), 2))
               for split in _scored_splits(metrics) for metric, label in (("f1", "F1"), ("em", "exact_match"))]
    entry = REGISTRY.get(delta_type)
    tags = ["optqa", "delta-tuning", entry.hub_tag if entry else delta_type, "question-answering", "opt"]
    data = ModelCardData(base_model=base_model, library_name="peft" if peft else "optqa",
                         tags=tags + (["peft"] if peft else []), datasets=[dataset], eval_results=results or None,
                         model_name=name if results else None, pipeline_tag="text-generation")
    return data.to_yaml()


def _scored_splits(metrics: dict[str, Any]) -> list[str]:
    # informational, so not refused when odd: a split counts only where it holds both scores
    return [split for split in ("dev", "test") if isinstance(metrics.get(split), dict)
            and all(isinstance(metrics[split].get(k), (int, float)) for k in ("f1", "em"))]


def _dataset_name(hyper: dict[str, Any]) -> str:
    train = hyper.get("train_file")
    return Path(str(train)).parent.name if train else Path(str(hyper.get("data_path") or "data")).name


def _summary(manifest: dict[str, Any], method: str, base_model: str | None, adapter: str | None) -> list[str]:
    hyper = manifest.get("hyperparameters") or {}
    base = base_model or manifest["backbone"]["name_or_path"]
    trainable = manifest.get("trainable_parameters")
    return [f"{method} {'adapter' if adapter else 'delta'} for `{base}` (parameter-efficient tuning of the "
            f"backbone), for direct-answer question answering, made with optqa on `{_dataset_name(hyper)}`. "
            f"{f'{trainable:,}' if isinstance(trainable, int) else '?'} trainable parameters; the backbone itself "
            "is not included.", "", f"Training: {training_text(hyper) or 'not recorded'}."]


def _scores(manifest: dict[str, Any]) -> list[str]:
    metrics = manifest.get("metrics") or {}
    rows = [f"| {split} | {metrics[split]['f1']:.2f} | {metrics[split]['em']:.2f} | "
            f"{metrics[split].get('count', '?')} |" for split in _scored_splits(metrics)]
    table = ["| split | F1 | EM | questions |", "| --- | --- | --- | --- |", *rows] if rows else [
        "No scores were recorded with this delta."]
    return ["## Scores", "", *table, "",
            "Token F1 and exact match in percent, SQuAD-style normalisation, best match over all gold answers."]


def _prompt(manifest: dict[str, Any], prompt: str | None, max_new_tokens: int) -> list[str]:
    """The template, what the model sees for one question, and (with a PEFT adapter) the exact prompt string."""
    template = manifest["template"].strip("\n")
    lines = ["## Prompt", "", "Template (OpenPrompt `ManualTemplate` syntax; optqa's PEFT export keeps it in "
             f"`{PEFT_TEMPLATE_NAME}`):", "", "```text", template, "```", "",
             f"For the question `{PREVIEW_QUESTION}` the model sees its bos token followed by exactly this text:",
             "", "```text", prompt_preview(template, PREVIEW_QUESTION), "```", ""]
    if prompt is not None:
        lines += ["The exact prompt string, with the question (stripped of surrounding white space) in place of "
                  "`{text_a}`:", "", "```", prompt, "```", "",
                  "Tokenise it with the backbone's tokenizer as it is (`add_special_tokens=True`: the tokenizer "
                  "puts its bos first, as optqa does).", ""]
    return lines + [f"Answers are decoded greedily, at most {max_new_tokens} new tokens, and cut at eos and at "
                    "their first line break."]


def _delta(manifest: dict[str, Any]) -> list[str]:
    backbone = manifest["backbone"]
    return ["## Delta", "", "```json", json.dumps(manifest["delta"], indent=2), "```", "",
            f"Backbone: `{backbone['name_or_path']}` ({backbone.get('architecture')}); weight fingerprint "
            f"`{backbone.get('fingerprint')}` (SHA-256 over sampled weights, see optqa's docs/checkpoints.md: optqa "
            "refuses to load this delta onto a backbone with other weights, and other weights give other answers)."]


def _with_optqa(manifest: dict[str, Any], repo_id: str, base_model: str | None) -> list[str]:
    backbone = manifest["backbone"]["name_or_path"]
    plm = "" if base_model == backbone else f" --plm_path {base_model or '/path/to/backbone'}"
    return ["## Use it with optqa", "", "```bash",
            f"python -m optqa --mode interactive_inference --delta_save_path hf://{repo_id}{plm}",
            f"python -m optqa --mode inspect --delta_save_path hf://{repo_id}@<commit>   # pin a revision", "```", "",
            "optqa downloads into the Hugging Face cache, checks every file's SHA-256 against `optqa_manifest.json` "
            "and the backbone's fingerprint before using a weight; `HF_HUB_OFFLINE=1` uses the cache alone."]


def _with_peft(base_model: str | None, adapter: str, prompt: str, max_new_tokens: int) -> list[str]:
    """Code that answers as optqa does with plain transformers + PEFT (greedy, cut at eos and the first line)."""
    base = json.dumps(base_model or "OWNER/BACKBONE")
    return ["## Use it with transformers + PEFT", "", "```python", "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f"PROMPT = {python_string(prompt)}",
            f"base = AutoModelForCausalLM.from_pretrained({base})",
            f"tokenizer = AutoTokenizer.from_pretrained({base})",
            f"model = PeftModel.from_pretrained(base, {json.dumps(adapter)}).eval()", "",
            f"question = {json.dumps(CODE_QUESTION)}",
            'ids = tokenizer(PROMPT.format(text_a=question.strip()), return_tensors="pt")  # adds the bos token',
            f"out = model.generate(**ids, max_new_tokens={max_new_tokens}, do_sample=False, "
            "eos_token_id=tokenizer.eos_token_id)",
            'text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()',
            'answer = text.split("\\n", 1)[0].rstrip()  # optqa\'s answer is its first line',
            "print(answer)", "```"]


def _versions(manifest: dict[str, Any]) -> list[str]:
    lines = ["## Made with", "", "| package | version |", "| --- | --- |",
             *(f"| {k} | {v} |" for k, v in library_versions().items())]
    if manifest.get("versions"):
        lines += ["", "The checkpoint itself was saved with: "
                  + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()) + "."]
    return lines


def python_string(text: str) -> str:
    """``text`` as a Python string literal for a card's code: JSON's escapes are Python's (quotes, backslashes,
    control characters), and with non-ASCII characters kept as they are, none beyond U+FFFF turns into the pair
    of surrogate escapes JSON would write (which Python reads as two lone surrogates)."""
    return json.dumps(text, ensure_ascii=False)


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
