"""Small OPT backbones built locally, for the offline demo, the tests and the benchmarks.

Weights cannot be downloaded on offline machines, so these build a real ``OPTForCausalLM`` folder from
``OPTConfig`` and a byte-level BPE tokenizer trained with ``tokenizers`` in OPT's layout
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

    from optqa.checkpoints.assemble import build_model, template_text
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
