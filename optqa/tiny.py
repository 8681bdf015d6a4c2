"""Small backbones built locally, for the offline demo, the tests and the benchmarks.

Weights cannot be downloaded on offline machines, so these build a real ``OPTForCausalLM`` folder from
``OPTConfig`` (or, ``build_family``, a model of any family in ``optqa.families`` from its transformers config)
and a byte-level BPE tokenizer trained with ``tokenizers`` in OPT's layout
(``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3; ``</s>`` doubles as bos like facebook/opt-*).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]

# hidden 64, 2 layers: trains in seconds on a CPU
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                  max_position_embeddings=256, word_embed_proj_dim=64)
# facebook/opt-125m's shape, for benchmarks and checkpoint-size reports
OPT_125M_SHAPE = dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                      max_position_embeddings=2048, word_embed_proj_dim=768, vocab_size=50272)


def build_tokenizer(texts: Iterable[str], folder: str | Path, vocab_size: int = 1000, pad: bool = True) -> Path:
    """Train a byte-level BPE on ``texts`` and save it as an OPT-style GPT2Tokenizer folder.

    ``pad=False`` leaves ``<pad>`` out of the vocabulary and the special tokens, like GPT-2's tokenizer.
    """
    from tokenizers import ByteLevelBPETokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = OPT_SPECIALS if pad else [t for t in OPT_SPECIALS if t != "<pad>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                            show_progress=False)
    bpe.save_model(str(folder))
    special_map = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", **({"pad_token": "<pad>"} if pad else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", **special_map, "add_bos_token": True, "model_max_length": 2048}),
        encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    return folder


def build_opt(folder: str | Path, texts: Iterable[str] | None = None, seed: int = 0, vocab_size: int = 1000,
              embedding_std: float = 0.2, pad: bool = True, **shape) -> Path:
    """Write a random-weight OPT (default: the tiny shape) and, given ``texts``, a tokenizer into ``folder``
    (``pad=False``: one without a pad token, see ``build_tokenizer``)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = {token: i for i, token in enumerate(OPT_SPECIALS)}
    if texts is not None:
        build_tokenizer(texts, folder, vocab_size=vocab_size, pad=pad)
        ids = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        vocab_size = len(ids)
    settings = {**TINY_SHAPE, "vocab_size": vocab_size, **shape}
    torch.manual_seed(seed)
    config = OPTConfig(pad_token_id=ids.get("<pad>"), bos_token_id=ids["</s>"], eos_token_id=ids["</s>"], dropout=0.0,
                       **settings)
    model = OPTForCausalLM(config)
    with torch.no_grad():
        # with OPT's init_std (0.02) the tied output embedding caps logits near +-1.3 behind the frozen final
        # layer norm, so no delta could ever make a confident prediction; pretrained OPT has no such cap
        model.get_input_embeddings().weight.normal_(0.0, embedding_std)
    model.save_pretrained(folder)
    return folder


# One tiny shape per family (hidden 64, 2 layers, 4 attention heads), each with its odd part: grouped-query
# attention (2 key/value heads) for Llama, Mistral, Qwen2/3 and Phi-3 (whose fused qkv projection is then
# uneven), multi-query attention (1 key/value head) with a head size set apart from hidden / heads for Gemma,
# Conv1D projections for GPT-2, a fused query_key_value and partial rotary for GPT-NeoX.
_GQA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 256}
_MQA = {**_GQA, "num_key_value_heads": 1, "head_dim": 32}
FAMILY_SHAPES: dict[str, dict] = {
    "opt": TINY_SHAPE,
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 256},
    "gpt_neox": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                 "max_position_embeddings": 256, "rotary_pct": 0.5},
    "llama": _GQA, "mistral": _GQA, "qwen2": _GQA, "qwen3": {**_GQA, "head_dim": 32}, "phi3": _GQA,
    "gemma2": _MQA, "gemma3_text": _MQA,
}


# Gemma scales its embeddings by sqrt(hidden_size) inside the embedding module: at 0.3 every answer is one token
# repeated, its own 0.02 already gives varied answers
FAMILY_INIT_STD = {"gemma2": 0.02, "gemma3_text": 0.02}


def build_family(model_type: str, folder: str | Path, texts: Iterable[str], seed: int = 0,
                 init_std: float | None = None, **shape) -> Path:
    """Write a random-weight model of ``model_type`` (a key of ``FAMILY_SHAPES``, transformers' model_type) with
    ``build_tokenizer``'s tokenizer into ``folder``.

    ``init_std`` is the weights' initial spread (transformers' ``initializer_range``; None: 0.3, Gemma's
    ``FAMILY_INIT_STD``): the families' own 0.02 leaves a random 2-layer model predicting one token everywhere
    (every answer empty or alike); 0.3 gives answers that differ from question to question, so batched and
    one-at-a-time answers compare something.

    Returns:
        ``folder``, loadable with ``load_plm`` / ``AutoModelForCausalLM``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    init_std = init_std if init_std is not None else FAMILY_INIT_STD.get(model_type, 0.3)
    if model_type == "opt":
        return build_opt(folder, texts, seed=seed, init_std=init_std, embedding_std=1.0, **shape)
    folder = Path(folder)
    build_tokenizer(texts, folder)
    # with tokenizer.json too: transformers 5 loads a Mistral folder's tokenizer by its model type (Llama's or
    # mistral-common's, ignoring tokenizer_class) unless a tokenizers file is there; the ids stay the same
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    ids = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    specials = dict(pad_token_id=ids["<pad>"], bos_token_id=ids["</s>"], eos_token_id=ids["</s>"])
    config = AutoConfig.for_model(model_type, vocab_size=len(ids), initializer_range=init_std, tie_word_embeddings=True,
                                  **specials, **{**FAMILY_SHAPES[model_type], **shape})
    for key, value in config.to_dict().items():
        # no dropout, as build_opt's: the families name it apart (attn_pdrop, attention_dropout, hidden_dropout, ...)
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def build_random_checkpoint(plm_path: str | Path, folder: str | Path, delta_type: str, seed: int = 0,
                            metrics: dict | None = None, **flags) -> Path:
    """Save a checkpoint of ``delta_type`` on ``plm_path`` with random N(0, 1) delta weights, without training.

    Large random weights make answers long and question-dependent, so tests that compare answers compare real
    generations (a briefly trained tiny delta answers "" to everything). ``flags`` are RunConfig fields
    (``modified_modules``, ``max_new_tokens``, ...); ``metrics`` goes into the manifest as a run's would.

    Returns:
        The checkpoint folder, verified like any other when loaded.
    """
    import torch

    from optqa.build import build_model, template_text
    from optqa.checkpoints.format import build_manifest, save_checkpoint
    from optqa.config import RunConfig

    config = RunConfig(plm_path=str(plm_path), delta_type=delta_type, **flags)
    model, backbone = build_model(config)
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in model.delta_state_dict().items()}
    manifest = build_manifest(delta_config=model.delta.config.to_dict(), template_text=template_text(config),
                              backbone=backbone, hyperparameters=config.to_dict(), metrics=metrics or {},
                              trainable_parameters=model.num_trainable_parameters())
    return save_checkpoint(folder, state, manifest)
