"""A course homework (ARC-DA, OpenPrompt 1.0.1 + OpenDelta 0.3.2 style) runs on optqa with only its imports changed.

``homework`` below is written as such a script is: its body calls only names importable from optqa, with
OpenPrompt's and OpenDelta's signatures. The original imports were::

    from openprompt.data_utils import InputExample
    from openprompt.plms import load_plm
    from openprompt.prompts import ManualTemplate, GenerationVerbalizer
    from openprompt import PromptDataLoader, PromptForGeneration
    from opendelta import AutoDeltaConfig, AutoDeltaModel
"""
from __future__ import annotations

import collections
import json
import logging
import re
import shutil
import string
from pathlib import Path

import pytest
import torch
from conftest import MEMORY_SET, write_split
from torch.optim import AdamW

from optqa import (
    AutoDeltaConfig,
    AutoDeltaModel,
    GenerationVerbalizer,
    InputExample,
    ManualTemplate,
    PromptDataLoader,
    PromptForGeneration,
    load_plm,
)
from optqa.deltas import attached_delta
from optqa.errors import OptqaError

TEMPLATE = '{"placeholder":"text_a"} Answer: {"mask"}'
# OpenPrompt's tutorial generation arguments, as homework scripts copied them (greedy: num_beams 1)
GENERATION_ARGUMENTS = {"max_length": 24, "max_new_tokens": None, "min_length": 5, "temperature": 1.0,
                        "do_sample": False, "top_k": 0, "top_p": 0.9, "repetition_penalty": 1.0, "num_beams": 1,
                        "bad_words_ids": None}


# ---- the homework script (its own code, as a student wrote it) ----

def load_arc_da(data_path: Path, split: str) -> list:
    examples = []
    with open(data_path / f"{split}.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            examples.append(InputExample(guid=row["question_id"], text_a=row["question"], label=0,
                                         meta={"answer": row["answers"][0], "answers": row["answers"]}))
    return examples


def normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def evaluate(prompt_model, dataloader) -> tuple[float, list[str]]:
    predictions, scores = [], []
    prompt_model.eval()
    for batch in dataloader:
        batch = batch.to("cpu")
        _, output_sentences = prompt_model.generate(batch, verbose=False, **GENERATION_ARGUMENTS)
        predictions += output_sentences
        scores += [token_f1(p, g) for p, g in zip(output_sentences, batch["tgt_text"])]
    return 100 * sum(scores) / len(scores), predictions


def homework(data_path: Path, plm_path: Path, raw_delta_save_path: Path, delta_save_path: Path,
             train_epochs: int = 26, lr: float = 1e-2) -> dict:
    torch.manual_seed(0)
    plm, tokenizer, model_config, WrapperClass = load_plm("opt", str(plm_path))
    delta_config = AutoDeltaConfig.from_dict({"delta_type": "lora", "modified_modules": ["self_attn", "fc1", "fc2"]})
    delta_model = AutoDeltaModel.from_config(delta_config, backbone_model=plm)
    delta_model.freeze_module(exclude=["deltas"], set_state_dict=True)
    delta_model.log(delta_ratio=True, trainable_ratio=True, visualization=True)

    dataset = {split: load_arc_da(data_path, split) for split in ("train", "dev")}
    template = ManualTemplate(tokenizer=tokenizer, text=TEMPLATE)
    verbalizer = GenerationVerbalizer(tokenizer, classes=None, is_rule=True, label_words={0: ["{'meta':'answer'}"]})
    train_dataloader = PromptDataLoader(dataset=dataset["train"], template=template, verbalizer=verbalizer,
                                        tokenizer=tokenizer, tokenizer_wrapper_class=WrapperClass, max_seq_length=64,
                                        decoder_max_length=16, batch_size=4, shuffle=True, teacher_forcing=True,
                                        predict_eos_token=True, truncate_method="tail")
    dev_dataloader = PromptDataLoader(dataset=dataset["dev"], template=template, verbalizer=verbalizer,
                                      tokenizer=tokenizer, tokenizer_wrapper_class=WrapperClass, max_seq_length=64,
                                      decoder_max_length=16, batch_size=8, shuffle=False, teacher_forcing=False,
                                      predict_eos_token=True, truncate_method="tail")
    prompt_model = PromptForGeneration(plm=plm, template=template, freeze_plm=True, plm_eval_mode=False)
    optimizer = AdamW(delta_model.parameters(), lr=lr)

    epoch_losses, dev_f1s, best = [], [], -1.0
    for epoch in range(train_epochs):
        prompt_model.train()
        total = 0.0
        for batch in train_dataloader:
            batch = batch.to("cpu")
            loss = prompt_model(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(delta_model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item()
        epoch_losses.append(total / len(train_dataloader))
        dev_f1, _ = evaluate(prompt_model, dev_dataloader)
        dev_f1s.append(dev_f1)
        if dev_f1 > best:
            best = dev_f1
            delta_model.save_checkpoint(raw_delta_save_path)
    delta_model.load_checkpoint(raw_delta_save_path)
    best_f1, best_predictions = evaluate(prompt_model, dev_dataloader)
    delta_model.save_finetuned(delta_save_path, push_to_dc=False, center_args={"name": "arc-da-lora"},
                               test_result={"dev_f1": best_f1})
    return {"losses": epoch_losses, "dev_f1": dev_f1s, "best_f1": best_f1, "predictions": best_predictions,
            "dev_dataloader": dev_dataloader, "prompt_model": prompt_model, "tokenizer": tokenizer}


def reload_and_answer(delta_save_path: Path, plm_path: Path, dev_dataloader) -> tuple[float, list[str]]:
    plm, tokenizer, model_config, WrapperClass = load_plm("opt", str(plm_path))
    delta_model = AutoDeltaModel.from_finetuned(delta_save_path, backbone_model=plm)
    prompt_model = PromptForGeneration(plm=plm, template=ManualTemplate(tokenizer=tokenizer, text=TEMPLATE))
    return evaluate(prompt_model, dev_dataloader)


# ---- the tests ----

@pytest.fixture(scope="module")
def course_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("arc-da-format")
    for split in ("train", "dev"):
        write_split(folder, MEMORY_SET, split)
    return folder


@pytest.fixture(scope="module")
def course_run(one_torch_thread, tiny_opt, course_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("course")
    result = homework(course_data, tiny_opt, out / "raw_delta_ckpts", out / "delta_ckpts")
    return {**result, "out": out}


def test_homework_trains_and_scores(course_run):
    losses, dev_f1 = course_run["losses"], course_run["dev_f1"]
    # measured with one torch thread in fp32 (LoRA init seeded, the loader's shuffle seeded)
    assert losses[0] == pytest.approx(11.98705, abs=1e-3)
    assert losses[-1] == pytest.approx(0.60253, abs=1e-3)
    assert max(losses[-3:]) < min(losses[:3]) / 5
    assert dev_f1[0] == 0.0 and course_run["best_f1"] == max(dev_f1) == 100.0
    assert course_run["predictions"] == [answers[0] for _, answers in MEMORY_SET]


def test_reloaded_delta_answers_the_same(course_run, tiny_opt, caplog):
    with caplog.at_level(logging.INFO, logger="optqa"):
        f1, predictions = reload_and_answer(course_run["out"] / "delta_ckpts", tiny_opt, course_run["dev_dataloader"])
    assert "Hash-check passed. You can safely use this checkpoint directly." in caplog.messages
    assert predictions == course_run["predictions"]
    assert f1 == course_run["best_f1"]


def test_saved_delta_is_an_optqa_checkpoint(course_run, tiny_opt):
    from optqa.build import load_trained
    from optqa.checkpoints.inspect import inspect_checkpoint

    manifest = json.loads((course_run["out"] / "delta_ckpts" / "optqa_manifest.json").read_bytes())
    assert manifest["delta"]["delta_type"] == "lora"
    assert manifest["template"] == TEMPLATE
    assert manifest["backbone"]["name_or_path"] == str(tiny_opt)
    assert manifest["delta_center"]["center_args"] == {"name": "arc-da-lora"}
    assert manifest["metrics"] == {"test_result": {"dev_f1": course_run["best_f1"]}}
    assert manifest["hyperparameters"] == {
        "plm_name": "opt", "delta_type": "lora", "modified_modules": ["self_attn", "fc1", "fc2"], "lora_r": 8,
        "lora_alpha": 16, "lora_dropout": 0.0, "max_seq_l": 128, "max_new_tokens": 32, "plm_path": str(tiny_opt),
        "template": TEMPLATE, "mode": "save_finetuned"}  # no training settings: the script's are unknown here
    lines = inspect_checkpoint(course_run["out"] / "delta_ckpts")
    assert ("saved        by a script's delta_model.save_finetuned (its training settings are its own; "
            "not recorded)") in lines
    assert 'metrics      test_result {"dev_f1": 100.0}' in lines
    # the CLI's loader (interactive_inference, evaluate) takes it and answers as the script's model did
    model, _, _ = load_trained(course_run["out"] / "delta_ckpts")
    questions = [q for q, _ in MEMORY_SET]
    assert model.answer(questions) == course_run["prompt_model"].answer(questions)


def test_flipped_byte_is_refused_with_the_reason(course_run, tiny_opt, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(course_run["out"] / "delta_ckpts", tampered)
    weights = tampered / "delta_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01
    weights.write_bytes(bytes(data))
    plm, _, _, _ = load_plm("opt", str(tiny_opt))
    with pytest.raises(OptqaError, match=r"integrity check failed: .*delta_model.safetensors has SHA-256 .* "
                                         r"\(the file was modified\)"):
        AutoDeltaModel.from_finetuned(tampered, backbone_model=plm)
    assert attached_delta(plm) is None  # nothing was attached


# ---- each OpenPrompt / OpenDelta call on its own ----

def memory_examples(with_targets: bool = True) -> list:
    return [InputExample(guid=f"q{i}", text_a=q, label=0, tgt_text=answers if with_targets else None)
            for i, (q, answers) in enumerate(MEMORY_SET)]


@pytest.fixture()
def fresh(tiny_opt):
    """A backbone straight from its folder, with a delta of the given config attached."""
    def make(delta: dict | None = None):
        plm, tokenizer, _, wrapper = load_plm("opt", str(tiny_opt))
        delta_model = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(delta), plm) if delta else None
        return plm, tokenizer, wrapper, delta_model
    return make


def test_loader_pads_per_batch_or_to_max_when_asked(fresh):
    plm, tokenizer, wrapper, _ = fresh()
    template = ManualTemplate(tokenizer, text=TEMPLATE)
    loader = PromptDataLoader(memory_examples(), template, tokenizer=tokenizer, tokenizer_wrapper_class=wrapper,
                              max_seq_length=40, batch_size=3, shuffle=True, teacher_forcing=True)
    assert len(loader) == 3
    epochs = [[guid for batch in loader for guid in batch["guid"]] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == [f"q{i}" for i in range(8)] and epochs[0] != epochs[1]
    for batch in loader:
        assert batch.to("cpu") is batch
        rows = batch["attention_mask"].sum(dim=1)
        assert batch["input_ids"].shape[1] == int(rows.max()) < 40  # padded to the batch's longest row
        for guid, text, labels in zip(batch["guid"], batch["tgt_text"], batch["labels"]):
            assert text == MEMORY_SET[int(guid[1:])][1][0]  # the first gold answer, as a string
            target = labels[labels != -100].tolist()
            assert target == tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    padded = PromptDataLoader(memory_examples(), template, tokenizer=tokenizer, tokenizer_wrapper_class=wrapper,
                              max_seq_length=40, batch_size=3, teacher_forcing=True, drop_last=True,
                              pad_to_max_length=True)
    batches = list(padded)
    assert len(padded) == len(batches) == 2
    assert [b["guid"] for b in batches] == [["q0", "q1", "q2"], ["q3", "q4", "q5"]]
    assert all(b["input_ids"].shape == (3, 40) for b in batches)


def test_verbalizer_and_loader_refusals(fresh):
    plm, tokenizer, wrapper, _ = fresh()
    template = ManualTemplate(tokenizer, text=TEMPLATE)
    fixed = GenerationVerbalizer(tokenizer, label_words={0: "yes"})
    loader = PromptDataLoader(memory_examples(False), template, tokenizer=tokenizer, tokenizer_wrapper_class=wrapper,
                              verbalizer=fixed, batch_size=8, teacher_forcing=True)
    assert next(iter(loader))["tgt_text"] == ["yes"] * 8
    rule = GenerationVerbalizer(tokenizer, label_words=["{'meta':'answer', 'post_processing':'lower'}!"], is_rule=True)
    assert rule.target_text(InputExample(guid=1, text_a="q", label=0, meta={"answer": "Ice"})) == "ice!"
    with pytest.raises(OptqaError, match="example q0 has no target text"):
        PromptDataLoader(memory_examples(False), template, tokenizer=tokenizer, teacher_forcing=True)
    with pytest.raises(OptqaError, match="truncate_method 'head' is not supported"):
        PromptDataLoader(memory_examples(), template, tokenizer=tokenizer, truncate_method="head")
    with pytest.raises(OptqaError, match="label 1 has no label words"):
        fixed.target_text(InputExample(guid="x", label=1))
    with pytest.raises(OptqaError, match="a mask piece cannot be part of a target text"):
        GenerationVerbalizer(tokenizer, label_words={0: '{"mask"}'}, is_rule=True)


def test_generate_counts_max_length_as_openprompt_and_answers_rows_as_alone(fresh):
    torch.manual_seed(0)
    plm, tokenizer, wrapper, _ = fresh({"delta_type": "lora", "modified_modules": ["fc1"]})
    with torch.no_grad():  # a LoRA that changes the answers (B starts at zero)
        for name, param in plm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    template = ManualTemplate(tokenizer, text=TEMPLATE)
    model = PromptForGeneration(plm=plm, template=template)
    model.eval()

    def loader(examples, size):
        return PromptDataLoader(examples, template, tokenizer=tokenizer, tokenizer_wrapper_class=wrapper,
                                batch_size=size)

    batch = next(iter(loader(memory_examples(), 8)))
    prompts = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert len({len(p) for p in prompts}) > 1  # prompts of different lengths share the batch
    ids, sentences = model.generate(batch, verbose=False, max_length=20)
    alone = [model.generate(b, max_length=20) for b in loader(memory_examples(), 1)]
    assert ids == [a[0][0] for a in alone] and sentences == [a[1][0] for a in alone]
    for prompt, row, sentence in zip(prompts, ids, sentences):
        assert row[:len(prompt)] == prompt and len(row) <= 20
        assert sentence == model.decode_answer(row[len(prompt):])
    assert any(len(row) == 20 for row in ids), sentences  # some answer ran into max_length
    ids, _ = model.generate(batch, max_length=20, max_new_tokens=3)  # max_new_tokens wins, as in transformers
    assert {len(row) - len(p) for row, p in zip(ids, prompts)} == {3}
    for bad, message in (({"num_return_sequences": 2}, "num_return_sequences=2 is not supported"),
                         ({"num_beams": 2}, "optqa answers greedily; num_beams=2 is not supported"),
                         ({"do_sample": True}, "do_sample=True is not supported"),
                         ({"bad_words_ids": [[5, 6]]}, "bad_words_ids with sequences longer than one token"),
                         ({"foo": 1}, "generate does not take foo")):
        with pytest.raises(OptqaError, match=message):
            model.generate(batch, **bad)
    train_batch = next(iter(PromptDataLoader(memory_examples(), template, tokenizer=tokenizer, teacher_forcing=True)))
    with pytest.raises(OptqaError, match="teacher_forcing=False"):
        model.generate(train_batch)



def test_generate_min_length_eos_and_bad_words_as_openprompt(course_run):
    """On the trained homework model, whose answers end with eos after a word or two."""
    model, loader = course_run["prompt_model"], course_run["dev_dataloader"]
    batch = next(iter(loader))
    prompts = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    plain, sentences = model.generate(batch, max_length=40)
    assert sentences == course_run["predictions"]
    assert all(row[-1] == model.tokenizer.eos_token_id for row in plain)
    longest = max(len(row) for row in plain)
    ids, _ = model.generate(batch, max_length=40, min_length=longest + 2)
    assert all(longest + 2 <= len(row) for row in ids)  # eos held back until prompt + answer reach min_length
    assert [row[:len(p) + 1] for row, p in zip(ids, prompts)] == [row[:len(p) + 1] for row, p in zip(plain, prompts)]
    first = plain[0][len(prompts[0])]
    ids, sentences = model.generate(batch, max_length=40, eos_token_id=first)
    assert ids[0] == prompts[0] + [first] and sentences[0] == model.decode_answer([first])
    ids, _ = model.generate(batch, max_length=40, bad_words_ids=[[first]])
    assert all(first not in row[len(p):] for row, p in zip(ids, prompts)) and ids[0] != plain[0]

def test_delta_model_calls(fresh, tmp_path, caplog):
    plm, tokenizer, _, delta_model = fresh({"delta_type": "adapter", "modified_modules": ["fc2"]})
    names = [n for n, _ in delta_model.named_parameters()]
    assert len(names) == 8 and all(".adapter." in n for n in names)
    assert sum(p.numel() for p in delta_model.parameters()) == 2 * (2 * 64 * 24 + 24 + 64)
    assert all(p.requires_grad for p in delta_model.parameters())
    with pytest.raises(OptqaError, match="never backbone modules \\(layernorm_embedding\\)"):
        delta_model.freeze_module(exclude=["deltas", "layernorm_embedding"])
    delta_model.freeze_module(exclude=["deltas"], set_state_dict=True)
    assert sorted("backbone." + k for k in plm.state_dict()) == sorted(names)
    delta_model.freeze_module(set_state_dict=False)
    assert len(plm.state_dict()) > len(names)
    assert delta_model.log() == ("backbone.model.decoder.layers.0.fc2 <- adapter (3,160 parameters)\n"
                                 "backbone.model.decoder.layers.1.fc2 <- adapter (3,160 parameters)\n"
                                 "Trainable Ratio: 6,320/186,928=3.380981%\n"
                                 "Delta Parameter Ratio: 6,320/180,608=3.499291%")

    first = next(delta_model.parameters())
    saved = first.detach().clone()
    path = delta_model.save_checkpoint(tmp_path / "raw")
    assert path == tmp_path / "raw" / "delta_model.safetensors"
    with torch.no_grad():
        first.add_(1.0)
    delta_model.load_checkpoint(tmp_path / "raw")
    assert torch.equal(first, saved)
    with caplog.at_level(logging.INFO, logger="optqa"):
        delta_model.save_finetuned(tmp_path / "shared", push_to_dc=True)
    assert ("push_to_dc: OpenDelta's DeltaCenter is gone; share the checkpoint on the Hugging Face Hub with: "
            f"python -m optqa --mode push --delta_save_path {tmp_path / 'shared'} --hub_repo OWNER/NAME"
            ) in caplog.messages
    with pytest.raises(OptqaError, match="not supported: cache_dir"):
        AutoDeltaModel.from_finetuned(tmp_path / "shared", fresh()[0], cache_dir="x")


def test_from_finetuned_passes_the_hash_check_only_on_the_recorded_weights(fresh, tmp_path, caplog):
    """save_finetuned records the backbone as every optqa checkpoint does (``backbone_record``); from_finetuned
    says "Hash-check passed" on those weights, and with check_hash=False onto other weights warns instead."""
    from optqa.checkpoints.format import backbone_record

    plm, _, _, delta_model = fresh({"delta_type": "bitfit"})
    delta_model.save_finetuned(tmp_path / "shared")
    manifest = json.loads((tmp_path / "shared" / "optqa_manifest.json").read_bytes())
    assert manifest["backbone"] == json.loads(json.dumps(backbone_record(plm, manifest["backbone"]["name_or_path"])))
    passed = "Hash-check passed. You can safely use this checkpoint directly."
    with caplog.at_level(logging.INFO, logger="optqa"):
        AutoDeltaModel.from_finetuned(tmp_path / "shared", fresh()[0])
    assert passed in caplog.messages
    caplog.clear()
    other = fresh()[0]
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with caplog.at_level(logging.INFO, logger="optqa"):
        AutoDeltaModel.from_finetuned(tmp_path / "shared", other, check_hash=False)
    assert passed not in caplog.messages
    assert any(m.endswith("loading anyway (--ignore_backbone_mismatch)") for m in caplog.messages)


def test_mixed_template_soft_tokens_train_save_and_reload(fresh, tmp_path):
    from optqa import MixedTemplate

    text = '{"soft":"Question:"} {"placeholder":"text_a"} {"soft"} Answer: {"mask"}'
    torch.manual_seed(0)
    plm, tokenizer, wrapper, delta_model = fresh({"delta_type": "lora"})
    template = MixedTemplate(model=plm, tokenizer=tokenizer, text=text)
    model = PromptForGeneration(plm=plm, template=template)
    loader = PromptDataLoader(memory_examples(), template, tokenizer=tokenizer, tokenizer_wrapper_class=wrapper,
                              batch_size=8, teacher_forcing=True)
    start = template.soft_embeds.detach().clone()
    optimizer = AdamW([*delta_model.parameters(), *template.parameters()], lr=1e-2)
    for batch in loader:
        model(batch).backward()
        optimizer.step()
    assert not torch.equal(template.soft_embeds, start)
    delta_model.save_finetuned(tmp_path / "mixed")
    dev = PromptDataLoader(memory_examples(), template, tokenizer=tokenizer, batch_size=8)
    expected = model.generate(next(iter(dev)), max_new_tokens=4)

    plm2, tokenizer2, _, _ = fresh()
    reloaded = AutoDeltaModel.from_finetuned(tmp_path / "mixed", plm2)
    assert reloaded.manifest["template"] == text
    template2 = MixedTemplate(plm2, tokenizer2, text=reloaded.manifest["template"])
    model2 = PromptForGeneration(plm=plm2, template=template2)
    assert torch.equal(template2.soft_embeds, template.soft_embeds)
    assert model2.generate(next(iter(dev)), max_new_tokens=4) == expected

    plm3, tokenizer3, _, _ = fresh()
    AutoDeltaModel.from_finetuned(tmp_path / "mixed", plm3)
    with pytest.raises(OptqaError, match="template soft tokens"):
        PromptForGeneration(plm=plm3, template=ManualTemplate(tokenizer3, text=TEMPLATE))


def test_prefix_tuning_template_is_the_prefix_delta(fresh, tmp_path):
    from optqa import PrefixTuningTemplate

    torch.manual_seed(0)
    plm, tokenizer, wrapper, _ = fresh()
    template = PrefixTuningTemplate(model=plm, tokenizer=tokenizer, text=TEMPLATE, num_token=5)
    model = PromptForGeneration(plm=plm, template=template)
    delta_model = template.delta_model
    assert model.delta is delta_model and delta_model.config.prefix_token_num == 5
    assert sum(p.numel() for p in delta_model.parameters()) == 5 * 2 * 2 * 64  # n * layers * (k, v) * hidden
    loader = PromptDataLoader(memory_examples(), template, tokenizer=tokenizer, tokenizer_wrapper_class=wrapper,
                              batch_size=8, teacher_forcing=True)
    optimizer = AdamW(delta_model.parameters(), lr=1e-1)
    losses = []
    for _ in range(3):
        for batch in loader:
            loss = model(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    delta_model.save_finetuned(tmp_path / "prefix")
    dev = next(iter(PromptDataLoader(memory_examples(), template, tokenizer=tokenizer, batch_size=8)))
    expected = model.generate(dev, max_new_tokens=4)
    plm2, tokenizer2, _, _ = fresh()
    AutoDeltaModel.from_finetuned(tmp_path / "prefix", plm2)
    reloaded = PromptForGeneration(plm2, ManualTemplate(tokenizer2, text=TEMPLATE))
    assert reloaded.generate(dev, max_new_tokens=4) == expected
    with pytest.raises(OptqaError, match="prefix_dropout are not supported"):
        PrefixTuningTemplate(fresh()[0], tokenizer, prefix_dropout=0.1)


@pytest.mark.parametrize("name, instead", [("SoftTemplate", "MixedTemplate"), ("PtuningTemplate", "MixedTemplate"),
                                           ("PTRTemplate", "ManualTemplate")])
def test_other_openprompt_templates_are_refused_naming_what_to_use(name, instead):
    import optqa

    with pytest.raises(OptqaError, match=f"OpenPrompt's {name} is not part of optqa; use {instead}"):
        getattr(optqa, name)(model=None, tokenizer=None, text="x")


def test_prompt_model_arguments_are_honoured_or_refused(fresh):
    """plm_eval_mode keeps the language model's dropout off while the delta trains (OpenPrompt's meaning);
    gen_config and a placeholder_mapping other than OpenPrompt's default would be ignored, so they are refused."""
    plm, tokenizer, _, _ = fresh()
    template = ManualTemplate(tokenizer, text=TEMPLATE, placeholder_mapping={"<text_a>": "text_a", "<text_b>": "text_b"})
    with pytest.raises(OptqaError, match="^template: placeholder_mapping {'<text_a>': 'question'} is not supported"):
        ManualTemplate(tokenizer, text=TEMPLATE, placeholder_mapping={"<text_a>": "question"})
    with pytest.raises(OptqaError, match="^PromptForGeneration: gen_config is not supported"):
        PromptForGeneration(plm=plm, template=template, gen_config={"max_length": 20})
    plain = PromptForGeneration(plm=plm, template=template).train()
    assert plain.plm.training
    frozen = PromptForGeneration(plm=plm, template=template, plm_eval_mode=True).train()
    assert frozen.training and not any(m.training for m in frozen.plm.modules())
    frozen.eval().train()
    assert not frozen.plm.training
