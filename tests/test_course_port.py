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
from torch.optim import AdamW

from conftest import MEMORY_SET, write_split
from optqa import (AutoDeltaConfig, AutoDeltaModel, GenerationVerbalizer, InputExample, ManualTemplate,
                   PromptDataLoader, PromptForGeneration, load_plm)
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

    manifest = json.loads((course_run["out"] / "delta_ckpts" / "optqa_manifest.json").read_bytes())
    assert manifest["delta"]["delta_type"] == "lora"
    assert manifest["template"] == TEMPLATE
    assert manifest["backbone"]["name_or_path"] == str(tiny_opt)
    assert manifest["delta_center"]["center_args"] == {"name": "arc-da-lora"}
    assert manifest["metrics"] == {"test_result": {"dev_f1": course_run["best_f1"]}}
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
    assert "_optqa_delta" not in plm.__dict__  # nothing was attached
