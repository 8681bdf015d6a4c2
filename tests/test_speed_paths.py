"""The speed paths keep the numbers: bf16 vs fp32, batched vs one-at-a-time answers, merged vs unmerged LoRA,
length-grouped batches, tokenisation done once."""
from __future__ import annotations

import pytest
import torch
from conftest import MEMORY_SET, train_in_process
from torch import nn

from optqa.build import assemble, build_model
from optqa.checkpoints.format import backbone_fingerprint
from optqa.config import DELTA_CONFIGS, RunConfig
from optqa.data import (
    Encoded,
    InputExample,
    LengthGroupedBatchSampler,
    LMTokenizerWrapper,
    collate_for_generation,
    collate_for_training,
    generation_batches,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = [q for q, _ in MEMORY_SET] + ["Why?", "What do plants take in from the air and what do bees make from it?"]
SOFT_TEMPLATE = '{"soft":"Question:"} {"placeholder":"text_a"} {"soft"} Answer: {"mask"}'


def make_model(plm, delta: str = "lora", template: str | None = None, **overrides):
    torch.manual_seed(0)
    config = RunConfig(plm_path=str(plm), delta_type=delta, max_new_tokens=6, max_seq_l=64,
                       **{"modified_modules": DELTA_CONFIGS[delta]().to_dict().get("modified_modules") or ["self_attn"],
                          **overrides})
    model, _ = build_model(config, template='{"placeholder":"text_a"} Answer: {"mask"}' if template is None
                           else template)
    return model.eval()


def memory_batches(model, batch_size: int = 4):
    examples = [InputExample(guid=i, text_a=q, tgt_text=a) for i, (q, a) in enumerate(MEMORY_SET)]
    encoded = model.wrapper.encode_all(examples, targets="first")
    pad = model.tokenizer.pad_token_id
    return [collate_for_training(encoded[i:i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


def train_a_little(model, steps: int = 150, lr: float = 3e-2) -> None:
    """Enough steps to memorise MEMORY_SET (loss ~0.1): answers then have margins that rounding cannot flip."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    batches = memory_batches(model, batch_size=len(MEMORY_SET))
    model.train()
    for step in range(steps):
        loss = model(batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("delta", ["lora", "adapter"])
def test_bf16_and_fp32_give_matching_losses_and_answers(tiny_opt, delta):
    model = make_model(tiny_opt, delta)
    train_a_little(model)
    batches = memory_batches(model)
    state_keys = set(model.backbone.state_dict())
    fingerprint = backbone_fingerprint(model.backbone)
    with torch.no_grad():
        fp32_losses = [float(model(b)) for b in batches]
    fp32_answers = model.answer(QUESTIONS)

    model.autocast_dtype = torch.bfloat16
    with torch.no_grad():
        bf16_losses = [float(model(b)) for b in batches]
    bf16_answers = model.answer(QUESTIONS)
    for fp32, bf16 in zip(fp32_losses, bf16_losses):
        assert bf16 == pytest.approx(fp32, rel=0.05, abs=0.05)
    same = sum(a == b for a, b in zip(fp32_answers, bf16_answers))
    assert same >= len(QUESTIONS) - 1, list(zip(fp32_answers, bf16_answers))
    # trained questions have large margins: those answers must not move at all
    assert bf16_answers[:len(MEMORY_SET)] == fp32_answers[:len(MEMORY_SET)]

    # the bf16 run keeps frozen Linear weights in bf16 (cast once, not per call); the delta stays fp32, and
    # neither the backbone's state dict nor its fingerprint can tell
    embedding = model.backbone.get_input_embeddings().weight
    frozen = [m.weight for m in model.plm.modules()
              if isinstance(m, nn.Linear) and not m.weight.requires_grad and m.weight is not embedding]
    assert frozen and all(w.dtype == torch.bfloat16 for w in frozen)
    assert all(p.dtype == torch.float32 for p in model.delta_state_dict().values())
    assert embedding.dtype == torch.float32 and model.backbone.get_output_embeddings().weight is embedding
    assert set(model.backbone.state_dict()) == state_keys
    assert backbone_fingerprint(model.backbone) == fingerprint

    # back to fp32: weights and the tied output head are fp32 again, and training still runs
    model.autocast_dtype = None
    train_a_little(model, steps=1)
    assert all(m.weight.dtype == torch.float32 for m in model.plm.modules() if isinstance(m, nn.Linear))
    assert "forward" not in vars(model.backbone.get_output_embeddings())


def test_bf16_training_steps_track_fp32(tiny_opt):
    losses = {}
    for dtype in (None, torch.bfloat16):
        model = make_model(tiny_opt, "lora")
        model.autocast_dtype = dtype
        train_a_little(model, steps=40)
        with torch.no_grad():
            model.autocast_dtype = None
            losses[dtype] = [float(model(b)) for b in memory_batches(model)]
    for fp32, bf16 in zip(losses[None], losses[torch.bfloat16]):
        assert bf16 == pytest.approx(fp32, rel=0.1, abs=0.1)


def give_lora_weight(model) -> None:
    # LoRA starts as a no-op (B = 0): small random B factors make it change the answers
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)


@pytest.mark.parametrize("delta,template", [
    ("lora", None), ("adapter", None), ("soft_prompt", None), ("prefix", None), ("lora", SOFT_TEMPLATE)])
def test_batched_answers_equal_one_at_a_time(lively_opt, delta, template):
    model = make_model(lively_opt, delta, template)
    give_lora_weight(model)
    single = [model.answer([q])[0] for q in QUESTIONS]
    batched = model.answer(QUESTIONS, batch_size=len(QUESTIONS))
    assert batched == single
    assert len(set(single)) == len(QUESTIONS)  # answers depend on the question: the comparison means something
    # rows of very different lengths share one left-padded batch
    widths = [len(model.wrapper.encode(InputExample(text_a=q)).prompt_ids) for q in QUESTIONS]
    assert max(widths) - min(widths) >= 10


def test_merged_and_unmerged_lora_agree(lively_opt):
    model = make_model(lively_opt, "lora")
    base = model.answer(QUESTIONS)
    give_lora_weight(model)
    batch = memory_batches(model, batch_size=8)[0]
    with torch.no_grad():
        before_loss = float(model(batch))
    before = model.answer(QUESTIONS)
    assert before != base  # the LoRA weights matter
    lora_weights = {k: v.clone() for k, v in model.delta_state_dict().items()}
    assert model.delta.merge_lora()
    assert not model.delta.merge_lora()  # merging twice would add the delta twice
    with torch.no_grad():
        assert float(model(batch)) == pytest.approx(before_loss, rel=1e-4, abs=1e-4)
    assert model.answer(QUESTIONS) == before
    # the LoRA factors themselves are untouched, so a checkpoint written from here holds the same delta
    assert all(torch.equal(lora_weights[k], v) for k, v in model.delta_state_dict().items())


def test_lora_folded_without_peft_is_peft_merge_bit_for_bit(lively_opt):
    from optqa.deltas import attached_delta, fold_lora, is_delta_parameter
    from optqa.errors import OptqaError
    from optqa.plm import load_plm

    # alpha / r = 1.375: scaling by a power of two would be exact in any order of operations
    model = make_model(lively_opt, "lora", template=SOFT_TEMPLATE, lora_alpha=11)
    give_lora_weight(model)
    with torch.no_grad():
        model.template.soft_embeds.normal_()
    state = model.delta_state_dict()
    before = model.answer(QUESTIONS)
    plm = load_plm("opt", str(lively_opt))[0]
    wrong = {k: v[:, :-1] if k.endswith("lora_A.default.weight") else v for k, v in state.items()}
    with pytest.raises(OptqaError, match=r"^ckpt: backbone\.model\.decoder\.layers\.0\.self_attn\.q_proj\.lora_A"
                                         r"\.default\.weight has shape \(8, 63\), this model expects \(8, 64\)"):
        fold_lora(model.delta.config, plm, wrong, "ckpt")
    delta, rest = fold_lora(model.delta.config, plm, state, "ckpt")
    assert list(rest) == ["template.soft_embeds"]  # what is not LoRA's is left for the template
    assert attached_delta(plm) is delta and delta.model is plm and not delta.merge_lora()
    assert not any(p.requires_grad for p in plm.parameters()) and delta.num_trainable_parameters() == 0
    assert model.delta.merge_lora()
    peft_merged = {n.replace(".base_layer", ""): p for n, p in model.backbone.named_parameters()
                   if not is_delta_parameter(n)}
    folded = dict(plm.named_parameters())
    assert folded.keys() == peft_merged.keys()
    assert all(torch.equal(folded[n], peft_merged[n]) for n in folded)  # the same weights, bit for bit
    assert model.answer(QUESTIONS) == before
    # and assembled as attach_checkpoint assembles it, the soft tokens loaded from the rest, it answers the same
    config = RunConfig(plm_path=str(lively_opt), delta_type="lora", max_new_tokens=6, max_seq_l=64)
    answering, _ = assemble(plm, model.tokenizer, model.delta.config.to_dict(), SOFT_TEMPLATE, "test", config,
                            delta=delta)
    answering.load_delta_state_dict(rest)
    assert answering.eval().answer(QUESTIONS) == before


@pytest.mark.parametrize("delta", ["soft_prompt", "prefix"])
def test_prompt_tables_answer_without_peft_as_peft_does(lively_opt, delta):
    from optqa.deltas import PromptTable, attach_prompt_table, attached_delta, is_delta_parameter
    from optqa.errors import OptqaError
    from optqa.plm import load_plm

    model = make_model(lively_opt, delta, template=SOFT_TEMPLATE)
    torch.manual_seed(1)
    with torch.no_grad():
        model.template.soft_embeds.normal_()
        model._virtual_weight().normal_(0.0, 0.5)
    state = {k: v.clone() for k, v in model.delta_state_dict().items()}  # detached, but the same storage
    before, before_logits = model.answer(QUESTIONS), first_step_logits(model)
    with torch.no_grad():
        model._virtual_weight().normal_(0.0, 0.5)
    assert model.answer(QUESTIONS) != before  # the table decides the answers
    plm, tokenizer, _, _ = load_plm("opt", str(lively_opt))
    delta_model = attach_prompt_table(model.delta.config, plm)
    assert type(delta_model.model) is PromptTable and attached_delta(plm) is delta_model
    config = RunConfig(plm_path=str(lively_opt), delta_type=delta, max_new_tokens=6, max_seq_l=64)
    answering, _ = assemble(plm, tokenizer, model.delta.config.to_dict(), SOFT_TEMPLATE, "test", config,
                            delta=delta_model)
    # the same names as PEFT's model has: the checkpoint loads unchanged
    assert [n for n, _ in answering.named_parameters() if is_delta_parameter(n)] == list(state)
    name = "plm.prompt_encoder.default.embedding.weight"
    rows, width = state[name].shape
    with pytest.raises(OptqaError, match=rf"^ckpt: {name} has shape \({rows - 1}, {width}\), this model expects "
                                         rf"\({rows}, {width}\)"):
        answering.load_delta_state_dict({**state, name: state[name][1:]}, source="ckpt")
    answering.load_delta_state_dict(state)
    assert torch.equal(first_step_logits(answering.eval()), before_logits)  # bit for bit
    assert answering.answer(QUESTIONS) == before


def first_step_logits(model, questions: list[str] = QUESTIONS) -> torch.Tensor:
    """Logits of the first answer token for every question, through optqa's own inputs (soft prompt, prefix
    cache) as answering builds them: ``(questions, vocabulary)``. PEFT's own forward for a prefix would still pass
    ``past_key_values``, which transformers 5.24 deprecates (gone in 5.40)."""
    encoded = [model.wrapper.encode(InputExample(guid=i, text_a=q), i) for i, q in enumerate(questions)]
    batch = collate_for_generation(encoded, model.tokenizer.pad_token_id)
    with torch.inference_mode(), model.running():
        out = model.backbone(**model.backbone_inputs(batch["input_ids"], batch["attention_mask"], use_cache=False,
                                                     soft_index=batch["soft_index"]))
    return out.logits[:, -1].float()


def test_length_grouped_sampler_covers_each_example_once_and_groups_lengths():
    generator = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(5, 120, (203,), generator=generator)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, chunk_batches=5)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(len(lengths)))  # every example exactly once
        assert len(batches) == len(sampler) and all(len(b) <= 8 for b in batches)
        epochs.append(flat)
    assert epochs[0] != epochs[1] != epochs[2]
    sampler.set_epoch(1)
    assert [i for b in sampler for i in b] == epochs[1]  # an epoch's order is reproducible (resume)

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    random_order = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group_by_length=False)
    sampler.set_epoch(0)
    grouped = list(sampler)
    assert padding(grouped) < 0.25 * padding(list(random_order))
    # batches, not just examples, come in random order: lengths do not rise steadily through the epoch
    firsts = [lengths[b[0]] for b in grouped]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_answering_batches_cover_every_prompt_and_keep_long_questions_apart():
    lengths = [17 + i % 5 for i in range(40)] + [150]
    encoded = [Encoded(i, i, "q", [], [0] * n, [-1] * n) for i, n in enumerate(lengths)]
    batches = generation_batches(encoded, batch_size=32)
    assert sorted(e.index for b in batches for e in b) == list(range(len(lengths)))
    assert all(len(b) <= 32 for b in batches)
    assert [len(b) for b in batches] == [32, 8, 1]  # the 150-token question does not make 8 others pad to it
    for batch in batches:  # sorted by length: little left padding inside a batch
        widths = [len(e.prompt_ids) for e in batch]
        assert max(widths) - min(widths) <= 4 or len(batch) == 1


def test_training_tokenises_each_example_once(tiny_opt, memory_data, tmp_path, monkeypatch):
    from optqa.template import ManualTemplate

    encoded, rendered = [], []
    original_encode, original_render = LMTokenizerWrapper.encode, ManualTemplate.render

    def counting_encode(self, example, *args, **kwargs):
        encoded.append(example.text_a)
        return original_encode(self, example, *args, **kwargs)

    def counting_render(self, example, *args, **kwargs):
        rendered.append(example.text_a)
        return original_render(self, example, *args, **kwargs)

    monkeypatch.setattr(LMTokenizerWrapper, "encode", counting_encode)
    monkeypatch.setattr(ManualTemplate, "render", counting_render)
    train_in_process(tiny_opt, memory_data, tmp_path, "--train_epochs", "3", "--batch_size", "4",
                     "--max_new_tokens", "2", "--save_steps", "0")
    # train, dev and test are each MEMORY_SET: three renderings per question for three epochs, not nine
    assert len(encoded) == len(rendered) == 3 * len(MEMORY_SET)

