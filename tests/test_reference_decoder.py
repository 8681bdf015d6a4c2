"""optqa's own KV-cache greedy decoder against a plain reference: for every delta type, with the delta's weights
noised away from their initial values (so a dropped delta changes the answers), answers from one left-padded
batch of 32 questions of mixed lengths equal a loop that runs the full forward pass, without a cache, one
question at a time; the first step's logits agree.

The reference runs the model the way training always has, through PEFT's own forward for PEFT's deltas: it
shares no code with optqa's decoder (``optqa.generate.greedy``, ``backbone_inputs``, the prefix cache; it puts a
template's {"soft"} tokens into the embeddings itself), so a soft prompt prepended twice or a prefix that never
reaches the cache (transformers 5.24 with PEFT's generation glue) fails here.
"""
from __future__ import annotations

import pytest
import torch
from conftest import MEMORY_SET

from optqa.build import build_model
from optqa.config import DELTA_CONFIGS, RunConfig
from optqa.data import InputExample, collate_for_generation, collate_for_training

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOFT_TEMPLATE = '{"soft":"Question:"} {"placeholder":"text_a"} {"soft"} Answer: {"mask"}'
PLAIN_TEMPLATE = '{"placeholder":"text_a"} Answer: {"mask"}'
WORDS = "what which plants gas water heat light energy the earth sun moon rock ice air".split()
# 32 questions from 1 to 25 words: one answering batch, heavily left padded
QUESTIONS = [q for q, _ in MEMORY_SET] + ["Why?"] + [
    " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + (i * 5) % 25)) + "?" for i in range(23)]
NEW_TOKENS = 5
CASES = [("adapter", PLAIN_TEMPLATE), ("lora", PLAIN_TEMPLATE), ("bitfit", PLAIN_TEMPLATE),
         ("soft_prompt", PLAIN_TEMPLATE), ("prefix", PLAIN_TEMPLATE), ("adapter", SOFT_TEMPLATE)]


def noised_model(plm, delta: str, template: str):
    torch.manual_seed(0)
    config = RunConfig(plm_path=str(plm), delta_type=delta, max_new_tokens=NEW_TOKENS, max_seq_l=64,
                       modified_modules=DELTA_CONFIGS[delta]().to_dict().get("modified_modules") or ["self_attn"])
    model, _ = build_model(config, template=template)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * (0.5 if param.dim() > 1 else 0.2))
    return model.eval()


def reference_inputs(model, ids: list[int], soft: list[int]) -> dict:
    """The token ids of one prompt, or where the template has {"soft"} tokens its embeddings with those tokens' own
    (``template.soft_embeds[soft[i]]`` at each position ``i`` with ``soft[i] >= 0``), computed here by hand."""
    if all(i < 0 for i in soft):
        return {"input_ids": torch.tensor([ids])}
    embeds = model.backbone.get_input_embeddings()(torch.tensor([ids]))[0]
    for position, row in enumerate(soft):
        if row >= 0:
            embeds[position] = model.template.soft_embeds[row]
    return {"inputs_embeds": embeds[None]}


def reference_answer(model, question: str) -> tuple[list[int], torch.Tensor]:
    """Greedy ids for one question by the full forward pass at every step (no cache), and step 1's logits."""
    encoded = model.wrapper.encode(InputExample(guid=0, text_a=question))
    ids, soft = list(encoded.prompt_ids), list(encoded.soft_index)
    first_logits, new = None, []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            out = model.plm(**reference_inputs(model, ids, soft), use_cache=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            logits = out.logits[0, -1].float()
            first_logits = logits if first_logits is None else first_logits
            token = int(logits.argmax())
            new.append(token)
            if token == model.tokenizer.eos_token_id:
                break
            ids.append(token)
            soft.append(-1)
    return new, first_logits


def decode(model, ids: list[int]) -> str:
    """The reference's answer text: up to eos, stripped, its first line (an answer is one line; the reference runs
    on past a line break, which changes nothing before it)."""
    eos = model.tokenizer.eos_token_id
    text = model.tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids, skip_special_tokens=True).strip()
    return text.split("\n", 1)[0].rstrip()


@pytest.mark.parametrize("delta,template", CASES, ids=[f"{d}-{'soft' if t == SOFT_TEMPLATE else 'plain'}"
                                                         for d, t in CASES])
def test_batched_cached_answers_equal_the_uncached_reference(lively_opt, delta, template):
    model = noised_model(lively_opt, delta, template)
    encoded = [model.wrapper.encode(InputExample(guid=i, text_a=q), i) for i, q in enumerate(QUESTIONS)]
    batch = collate_for_generation(encoded, model.tokenizer.pad_token_id)
    widths = batch["attention_mask"].sum(dim=1)
    assert len(QUESTIONS) == 32 and int(widths.max() - widths.min()) >= 20  # one batch, heavily left padded

    batched = dict(zip(batch["index"], model.generate_answers(batch)))
    reference = [reference_answer(model, q) for q in QUESTIONS]
    assert [batched[i] for i in range(len(QUESTIONS))] == [decode(model, ids) for ids, _ in reference]
    assert len({ids[0] for ids, _ in reference}) > 3  # answers depend on the question: the comparison bites

    # step 1's logits of the batched, cached pass (every row, left padded) against the reference's
    with torch.no_grad(), model.running():
        inputs = model.backbone_inputs(batch["input_ids"], batch["attention_mask"], use_cache=True,
                                       soft_index=batch["soft_index"])
        first = model.backbone(**inputs, logits_to_keep=1).logits[:, -1].float()
    for row, index in enumerate(batch["index"]):
        torch.testing.assert_close(first[row], reference[index][1], rtol=1e-3, atol=1e-3)  # fp32 rounding of a large-weight model


@pytest.mark.parametrize("delta", ["soft_prompt", "prefix"])
def test_training_loss_equals_pefts_own_forward(lively_opt, delta):
    """The loss optqa computes with its own soft-prompt / prefix inputs is the one PEFT's forward gives: the
    parameter layout is PEFT's, so a PEFT export of the delta is the same model."""
    model = noised_model(lively_opt, delta, PLAIN_TEMPLATE)
    examples = [InputExample(guid=i, text_a=q, tgt_text=a) for i, (q, a) in enumerate(MEMORY_SET)]
    batch = collate_for_training(model.wrapper.encode_all(examples, targets="first"), model.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = float(model(batch))
        theirs = float(model.plm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=batch["labels"], use_cache=False).loss)
    assert ours == pytest.approx(theirs, rel=1e-5)
    # and the delta is live: without it the loss is another number
    with torch.no_grad():
        model._virtual_weight().zero_()
        assert float(model(batch)) != pytest.approx(ours, rel=1e-3)
