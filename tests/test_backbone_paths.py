"""Issue 13, classes 3 and 5: load_plm's specials_to_add resizes the embeddings as OpenPrompt does; a checkpoint
records its backbone so that it loads from any folder, and the banner names the backbone actually used."""
from __future__ import annotations

import io
import json
import logging
import shutil
import sys

import pytest
import torch
from conftest import MEMORY_SET, sample_texts, train_in_process

from optqa.checkpoints import format as ckpt
from optqa.cli import main
from optqa.data import InputExample, collate_for_training
from optqa.model import PromptForGeneration
from optqa.plm import backbone_reference, load_plm
from optqa.template import ManualTemplate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def no_pad_opt(tmp_path_factory):
    """A tiny OPT whose tokenizer has no pad token (GPT-2 style)."""
    from optqa.tiny import build_opt

    return build_opt(tmp_path_factory.mktemp("no-pad-opt"), sample_texts(), seed=0, pad=False)


def test_specials_to_add_pad_resizes_the_embeddings_and_says_so(no_pad_opt, caplog):
    rows = json.loads((no_pad_opt / "config.json").read_text())["vocab_size"]
    caplog.set_level(logging.INFO, logger="optqa.plm")
    plm, tokenizer, _, _ = load_plm("opt", str(no_pad_opt), specials_to_add=["<pad>"])
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", rows)
    assert plm.get_input_embeddings().num_embeddings == rows + 1
    assert plm.get_output_embeddings().weight.shape[0] == rows + 1  # the tied head grew with it
    assert [m for m in caplog.messages if m.startswith(("added", "resized"))] == [
        f"added pad token <pad> (id {rows})", f"resized the embeddings from {rows} to {rows + 1} rows"]
    # a batch of mixed lengths, padded with the new id, trains and answers
    template = ManualTemplate(tokenizer, text='{"placeholder":"text_a"} Answer: {"mask"}')
    model = PromptForGeneration(plm, template, tokenizer=tokenizer)
    (short, answers), (long, _) = MEMORY_SET[2], (MEMORY_SET[0][0] + " " + MEMORY_SET[1][0], None)
    encoded = [model.wrapper.encode(InputExample(text_a=q), i, "ice") for i, q in enumerate((short, long))]
    batch = collate_for_training(encoded, tokenizer.pad_token_id)
    assert (batch["input_ids"] == rows).any()  # padding used the new row
    assert torch.isfinite(model(batch))
    assert len(model.answer([short, long])) == 2


def test_specials_to_add_adds_other_tokens_too(no_pad_opt, caplog):
    """OpenPrompt's add_special_tokens skipped every token but a pad; here each one the tokenizer lacks is added."""
    rows = json.loads((no_pad_opt / "config.json").read_text())["vocab_size"]
    caplog.set_level(logging.INFO, logger="optqa.plm")
    plm, tokenizer, _, _ = load_plm("opt", str(no_pad_opt), specials_to_add=["<pad>", "<sep>", "<pad>"])
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<sep>"]) == [rows, rows + 1]
    assert tokenizer("a <sep> b", add_special_tokens=False)["input_ids"].count(rows + 1) == 1  # kept whole
    assert plm.get_input_embeddings().num_embeddings == rows + 2  # one resize for both
    assert [m for m in caplog.messages if m.startswith(("added", "resized"))] == [
        f"added pad token <pad> (id {rows})", f"added special token <sep> (id {rows + 1})",
        f"resized the embeddings from {rows} to {rows + 2} rows"]


def test_without_specials_nothing_is_resized(no_pad_opt):
    rows = json.loads((no_pad_opt / "config.json").read_text())["vocab_size"]
    plm, tokenizer, _, _ = load_plm("opt", str(no_pad_opt))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # padded positions are masked out
    assert plm.get_input_embeddings().num_embeddings == rows


def test_a_hub_id_is_kept_and_a_folder_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert backbone_reference("facebook/opt-125m") == "facebook/opt-125m"
    assert backbone_reference("models/tiny") == str(tmp_path / "models" / "tiny")


def test_a_relative_backbone_folder_is_recorded_absolute(tiny_opt, memory_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_opt.parent)
    train_in_process(tiny_opt.name, memory_data, tmp_path, "--train_epochs", "1", "--precision", "fp32",
                     "--max_new_tokens", "2")
    manifest = json.loads((tmp_path / "delta_ckpts" / ckpt.MANIFEST_NAME).read_text())
    assert manifest["backbone"]["name_or_path"] == str(tiny_opt.resolve())
    assert len(manifest["backbone"]["fingerprint"]) == 64


def test_the_banner_names_the_backbone_actually_used(tiny_opt, memory_data, tmp_path, monkeypatch, caplog, capsys):
    train_in_process(tiny_opt, memory_data, tmp_path, "--train_epochs", "1", "--precision", "fp32",
                     "--max_new_tokens", "2")
    copy = shutil.copytree(tiny_opt, tmp_path / "copy-of-tiny")
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(sys, "stdin", io.StringIO("quit()\n"))
    assert main(["--mode", "interactive_inference", "--delta_save_path", str(tmp_path / "delta_ckpts"),
                 "--plm_path", str(copy)]) == 0
    assert f"delta adapter on {copy} ready; type quit() to stop" in caplog.text
