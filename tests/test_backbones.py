"""Backbones shaped like opt-350m: embeddings narrower than the hidden size, post-layer-norm blocks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import MEMORY_SET, sample_texts, train_in_process
from safetensors.torch import load_file

from optqa.build import load_trained
from optqa.checkpoints import format as ckpt
from optqa.config import DELTA_TYPES

HIDDEN, EMBED, LAYERS = 64, 32, 2
# opt-350m: hidden 1024, word_embed_proj_dim 512, do_layer_norm_before False (project_in / project_out)
OPT_350M_LIKE = dict(hidden_size=HIDDEN, word_embed_proj_dim=EMBED, do_layer_norm_before=False,
                     num_hidden_layers=LAYERS)
SOFT_TEMPLATE = '{"soft"} {"placeholder":"text_a"} Answer: {"mask"}'


@pytest.fixture(scope="module")
def opt_350m_like(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from optqa.tiny import build_opt

    folder = build_opt(tmp_path_factory.mktemp("opt-350m-like"), sample_texts(), seed=0, **OPT_350M_LIKE)
    # OPT's init (std 0.02) makes the random projections shrink the logits to near uniform, so every answer
    # would be empty; scale-preserving projections, as trained ones are, give real answers to compare
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for projection in (model.model.decoder.project_in, model.model.decoder.project_out):
            projection.weight.normal_(0.0, projection.in_features ** -0.5)
    model.save_pretrained(folder)
    return folder


def test_the_backbone_has_opt_350m_projections(opt_350m_like):
    from transformers import AutoModelForCausalLM

    decoder = AutoModelForCausalLM.from_pretrained(opt_350m_like).model.decoder
    assert (decoder.project_in.in_features, decoder.project_in.out_features) == (EMBED, HIDDEN)
    assert decoder.embed_tokens.embedding_dim == EMBED and decoder.final_layer_norm is None


@pytest.mark.parametrize("delta_type", DELTA_TYPES)
def test_every_delta_trains_saves_and_reloads(opt_350m_like, memory_data, tmp_path, delta_type):
    extra = ("--modified_modules", "self_attn.q_proj", "self_attn.v_proj") if delta_type == "lora" else ()
    summary = train_in_process(opt_350m_like, memory_data, tmp_path, "--delta_type", delta_type, *extra,
                               "--template", SOFT_TEMPLATE, "--precision", "fp32", "--lr", "1e-2",
                               "--batch_size", "4", "--train_epochs", "3", "--max_new_tokens", "4")
    run = Path(summary.run_dir)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]
    losses = [row["train_loss"] for row in epochs]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses

    state = load_file(str(tmp_path / "delta_ckpts" / ckpt.WEIGHTS_NAME))
    # soft tokens live at the embedding width (word_embed_proj_dim), not the hidden size
    assert state["template.soft_embeds"].shape == (1, EMBED)
    prompt = {k: v for k, v in state.items() if "prompt_encoder" in k}
    if delta_type == "soft_prompt":
        assert [tuple(v.shape) for v in prompt.values()] == [(20, EMBED)]
    elif delta_type == "prefix":
        # a key and a value per layer, each hidden-size wide (attention works at the hidden size)
        assert [tuple(v.shape) for v in prompt.values()] == [(6, LAYERS * 2 * HIDDEN)]
    else:
        assert not prompt

    model, manifest, _ = load_trained(tmp_path / "delta_ckpts")
    rows = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    assert any(row["prediction"] for row in rows)
    assert model.answer([q for q, _ in MEMORY_SET]) == [row["prediction"] for row in rows]
    assert manifest["delta"]["delta_type"] == delta_type
