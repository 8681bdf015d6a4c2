"""Backbone loading with OpenPrompt's signature: ``load_plm(model_name, model_path)``."""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import OptqaError

log = logging.getLogger(__name__)


def load_plm(model_name: str, model_path: str, specials_to_add: list[str] | None = None, dtype=None):
    """Load a causal LM and its tokenizer.

    Returns ``(plm, tokenizer, model_config, WrapperClass)`` like OpenPrompt. ``model_name`` is kept for
    compatibility ("opt", "gpt2", ...): transformers' Auto classes pick the architecture from the folder.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .data import LMTokenizerWrapper

    # transformers' per-shard bars would interleave with optqa's own progress bars and log lines
    hf_logging.disable_progress_bar()
    log.info("loading backbone %s", model_path)

    local = Path(model_path).expanduser()
    try:
        model_config = AutoConfig.from_pretrained(str(local) if local.exists() else model_path)
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else model_path)
        plm = AutoModelForCausalLM.from_pretrained(str(local) if local.exists() else model_path,
                                                   dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        if local.exists():
            raise OptqaError(f"could not load the backbone from {local} (--plm_path needs a Hugging Face model "
                             f"folder: config.json, tokenizer and weights): {str(exc).splitlines()[0]}") from exc
        if _looks_like_a_path(model_path):
            raise OptqaError(f"backbone folder {model_path} not found; pass --plm_path with the backbone's "
                             "folder") from exc
        raise OptqaError(
            f"could not load backbone '{model_path}' (not a local folder, and the hub is unreachable or does not "
            f"have it); download it on a connected machine and pass --plm_path /path/to/local/{Path(model_path).name}"
        ) from exc
    if model_config.model_type != model_name and model_name not in ("auto", ""):
        log.info("model_name %r, folder holds a %r model: using the folder's architecture", model_name,
                 model_config.model_type)
    add_special_tokens(tokenizer, specials_to_add)
    if tokenizer.pad_token_id is None:
        # GPT-2-style tokenizers have no pad token; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    if plm.generation_config.pad_token_id is None:
        plm.generation_config.pad_token_id = tokenizer.pad_token_id
    plm.config.use_cache = True
    return plm, tokenizer, model_config, LMTokenizerWrapper


def _looks_like_a_path(name: str) -> bool:
    """A hub name is ``model`` or ``owner/model``; anything else was meant as a folder."""
    return (Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name)


def add_special_tokens(tokenizer, specials_to_add: list[str] | None) -> None:
    for token in specials_to_add or []:
        if token == "<pad>" and tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})


def backbone_identity(plm, model_path: str) -> dict:
    """What a checkpoint records about the backbone it was trained on."""
    config = plm.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
                     "_attn_implementation_autoset", "_attn_implementation_internal"):
        config.pop(volatile, None)
    return {
        "name_or_path": str(model_path),
        "architecture": type(plm).__name__,
        "model_type": plm.config.model_type,
        "config": config,
    }
