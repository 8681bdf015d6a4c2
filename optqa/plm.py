"""Backbone loading with OpenPrompt's signature: ``load_plm(model_name, model_path)``, from a hub id, a Hugging Face
folder or a GGUF file."""
from __future__ import annotations

import logging
from pathlib import Path

from optqa.errors import OptqaError
from optqa.gguf import dequantized_folder, gguf_config_source, gguf_identity, is_gguf_path

log = logging.getLogger(__name__)


def load_plm(model_name: str, model_path: str, specials_to_add: list[str] | None = None, dtype=None):
    """Load a causal LM and its tokenizer.

    Args:
        model_name: kept for OpenPrompt compatibility ("opt", "gpt2", ...): transformers' Auto classes pick the
            architecture from the folder.
        model_path: a hub id, a local Hugging Face folder or a GGUF file (``model.gguf``: dequantised once into a
            cache folder, see :mod:`optqa.gguf`, and loaded from there).
        specials_to_add: OpenPrompt's special tokens to add; ``"<pad>"`` is added when the tokenizer has no pad
            token, and the embeddings (and a tied output head) grow to the new vocabulary, as OpenPrompt does.
        dtype: the weights' dtype (default float32).
    Returns:
        ``(plm, tokenizer, model_config, WrapperClass)`` like OpenPrompt.
    Raises:
        OptqaError: the backbone cannot be found or loaded; a file that is not GGUF, or a GGUF architecture or
            tokenizer transformers cannot read.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from optqa.data import LMTokenizerWrapper

    log.info("loading backbone %s", model_path)

    local = Path(model_path).expanduser()
    source, offline = (str(dequantized_folder(local)), None) if is_gguf_path(local) else _source(model_path)
    if offline:
        log.info("%s: loading %s from the Hugging Face cache (%s)", offline, model_path, source)
    try:
        model_config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        plm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        if local.exists():
            raise OptqaError(f"could not load the backbone from {source} (--plm_path needs a Hugging Face model "
                             f"folder: config.json, tokenizer and weights; or a .gguf file): "
                             f"{str(exc).splitlines()[0]}") from exc
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
    add_special_tokens(plm, tokenizer, specials_to_add)
    if tokenizer.pad_token_id is None:
        # GPT-2-style tokenizers have no pad token; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    if plm.generation_config.pad_token_id is None:
        plm.generation_config.pad_token_id = tokenizer.pad_token_id
    plm.config.use_cache = True
    return plm, tokenizer, model_config, LMTokenizerWrapper


def _source(model_path: str) -> tuple[str, str | None]:
    """What transformers' ``from_pretrained`` is given for ``--plm_path``, and why the Hub is not asked.

    With ``HF_HUB_OFFLINE`` set or a Hub that cannot be reached (``optqa.hub_access``), a Hub id is replaced by
    its cached snapshot folder (``snapshot_download(local_files_only=True)``): a cached copy then loads at once,
    and transformers, which still asks the Hub for optional files such as ``adapter_config.json`` when given a
    name, never waits on retries.

    Returns:
        ``(source, offline)``: a folder's path or the Hub id, and the reason the Hub is not asked (or None).
    Raises:
        OptqaError: the Hub is not asked and the backbone is not in the cache.
    """
    local = Path(model_path).expanduser()
    if local.exists() or _looks_like_a_path(model_path):
        return (str(local) if local.exists() else model_path), None
    from optqa.hub_access import offline_reason

    offline = offline_reason()
    if offline is None:
        return model_path, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model_path, local_files_only=True), offline
    except (LocalEntryNotFoundError, ValueError, OSError):  # ValueError: not a valid Hub id
        raise OptqaError(f"backbone '{model_path}' is not a local folder and not in the Hugging Face cache, and "
                         f"{offline}: pass --plm_path /path/to/local/{Path(model_path).name} (a copy saved on a "
                         "connected machine)") from None


def _looks_like_a_path(name: str) -> bool:
    """A hub name is ``model`` or ``owner/model``; anything else was meant as a folder."""
    return (Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name)


def add_special_tokens(plm, tokenizer, specials_to_add: list[str] | None) -> None:
    """OpenPrompt's ``add_special_tokens``: each token the tokenizer lacks is added, with embeddings to match.

    A token with "pad" in its name becomes the pad token where there is none (OpenPrompt's case); any other
    becomes an additional special token (OpenPrompt skipped those silently). A token added to the tokenizer
    gets the id ``len(vocabulary)``; without a matching embedding row a batch holding it fails with an
    IndexError, so the input embeddings (and OPT's tied head) are resized, once.

    Args:
        plm: the backbone (resized in place).
        tokenizer: its tokenizer (extended in place).
        specials_to_add: tokens such as ``["<pad>"]``; None adds nothing.
    """
    vocabulary = tokenizer.get_vocab()
    for token in specials_to_add or []:
        if "pad" in token.lower() and tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": token})
            log.info("added pad token %s (id %d)", token, tokenizer.pad_token_id)
        elif token not in vocabulary and token != tokenizer.pad_token:
            tokenizer.add_tokens([token], special_tokens=True)
            log.info("added special token %s (id %d)", token, tokenizer.convert_tokens_to_ids(token))
    rows = plm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        plm.resize_token_embeddings(len(tokenizer))
        log.info("resized the embeddings from %d to %d rows", rows, plm.get_input_embeddings().num_embeddings)


def backbone_reference(model_path: str) -> str:
    """What a checkpoint records as its backbone: the hub id as typed, or a local folder's absolute path.

    A relative folder (``runs/demo/tiny-opt``) only means something from the folder it was typed in; the
    absolute path lets the checkpoint load from anywhere on that machine, and the fingerprint beside it
    identifies the weights on any other.

    Args:
        model_path: ``--plm_path`` as given (hub id or folder).
    Returns:
        The folder's resolved absolute path if it exists here, else ``model_path`` unchanged.
    """
    local = Path(model_path).expanduser()
    return str(local.resolve()) if local.exists() else str(model_path)


def backbone_config(model_path: str) -> dict | None:
    """The backbone's config, read alone (transformers' ``AutoConfig``), without loading the weights.

    Args:
        model_path: a hub id, a local folder or a GGUF file (its header, or its dequantised copy once cached).
    Returns:
        The config as a dict; None when it cannot be read here (the backbone load then reports why).
    """
    from transformers import AutoConfig

    local = Path(model_path).expanduser()
    try:
        source, extra = gguf_config_source(local) if is_gguf_path(local) else (_source(model_path)[0], {})
        return AutoConfig.from_pretrained(source, **extra).to_dict()
    except (OSError, ValueError, OptqaError):  # load_plm then reports why (a file that is not GGUF, no Hub, ...)
        return None


def backbone_max_positions(model_path: str) -> int | None:
    """The backbone's position limit from its config alone (``backbone_config``): ``max_position_embeddings``
    (``n_positions`` for GPT-2); None when the config cannot be read here or names no limit."""
    config = backbone_config(model_path)
    return None if config is None else max_positions_of(config)


def backbone_model_type(model_path: str) -> str | None:
    """The backbone's family as transformers names it (``config.model_type``: ``llama``, ``gemma3_text``), from
    its config alone (``backbone_config``); None when the config cannot be read here."""
    config = backbone_config(model_path)
    return None if config is None else config.get("model_type")


def max_positions_of(config: dict) -> int | None:
    """The position limit in a backbone's config dict (a manifest records one); a multimodal config (Gemma 3's)
    keeps it in its ``text_config``."""
    value = config.get("max_position_embeddings", config.get("n_positions"))
    if value is None and isinstance(config.get("text_config"), dict):
        return max_positions_of(config["text_config"])
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def backbone_identity(plm, model_path: str) -> dict:
    """What a checkpoint records about the backbone it was trained on.

    Args:
        plm: the loaded backbone.
        model_path: ``--plm_path`` as given.
    Returns:
        ``name_or_path`` (``backbone_reference``), ``architecture``, ``model_type``, the config without its
        volatile fields, and for a GGUF file ``gguf``: ``{"file": name, "sha256": digest}`` (the file itself, as
        the weight fingerprint identifies its dequantised weights).
    """
    config = plm.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
                     "_attn_implementation_autoset", "_attn_implementation_internal"):
        config.pop(volatile, None)
    identity = {
        "name_or_path": backbone_reference(model_path),
        "architecture": type(plm).__name__,
        "model_type": plm.config.model_type,
        "config": config,
    }
    if is_gguf_path(model_path):
        identity["gguf"] = gguf_identity(model_path)
    return identity
