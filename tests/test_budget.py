"""Issue 13, class 2: the length budget is checked against the backbone's max_position_embeddings at start, and
the REPL says when it cut a question. The tiny OPT has 256 positions, as in the issue's examples."""
from __future__ import annotations

import io
import logging
from functools import partial

import pytest
from conftest import MEMORY_SET, train_args, train_in_process, write_split

from optqa.build import build_model, load_trained
from optqa.cli import answer_with_notes, main, parse_args
from optqa.compat.openprompt import generate
from optqa.config import RunConfig
from optqa.data import InputExample, LMTokenizerWrapper, collate_for_generation
from optqa.interactive import one_line, repl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the example: one question of 40 sentences, far longer than the backbone's 256 positions
LONG = " ".join(f"Sentence {i} says that green plants need light and water to grow." for i in range(40))


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long-data")
    for split in ("train", "dev", "test"):
        write_split(folder, [*MEMORY_SET[:3], (LONG, ["light"])], split)
    return folder


def refusal(capsys, caplog, argv) -> str:
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert "loading backbone" not in caplog.text  # checked from config.json, before the weights load
    return errors[0]


@pytest.mark.parametrize("extra, line", [
    ((), "--max_seq_l 250 + --max_new_tokens 32 = 282 positions, more than the 256 of backbone {plm} "
         "(max_position_embeddings); lower --max_seq_l to 224 or less"),
    (("--delta_type", "soft_prompt"),
     "--max_seq_l 250 + --max_new_tokens 32 + --soft_token_num 20 = 302 positions, more than the 256 of backbone "
     "{plm} (max_position_embeddings); lower --max_seq_l to 204 or less"),
    (("--delta_type", "prefix"),
     "--max_seq_l 250 + --max_new_tokens 32 + --prefix_token_num 6 = 288 positions, more than the 256 of backbone "
     "{plm} (max_position_embeddings); lower --max_seq_l to 218 or less"),
], ids=["adapter", "soft_prompt", "prefix"])
def test_a_budget_over_the_positions_is_refused_at_start(capsys, caplog, tiny_opt, long_data, tmp_path, extra, line):
    argv = train_args(tiny_opt, long_data, tmp_path, "--max_seq_l", "250", *extra)
    assert refusal(capsys, caplog, argv) == "error: " + line.format(plm=tiny_opt)
    assert not (tmp_path / "runs").exists()


def test_at_the_budget_the_long_question_is_cut_and_the_run_completes(tiny_opt, long_data, tmp_path):
    summary = train_in_process(tiny_opt, long_data, tmp_path, "--max_seq_l", "224", "--precision", "fp32",
                               "--train_epochs", "1", "--batch_size", "4")
    assert summary.truncated == {"train": 1, "dev": 1, "test": 1}


def test_at_the_budget_a_prefix_prompt_and_the_longest_answer_fit(tiny_opt):
    # 218 prompt tokens + 32 answer tokens + 6 prefix positions = 256: generated in full, with no IndexError
    config = RunConfig.of(parse_args(["--plm_path", str(tiny_opt), "--delta_type", "prefix", "--max_seq_l", "218",
                                      "--precision", "fp32"]))
    model, _ = build_model(config)
    encoded = model.wrapper.encode(InputExample(text_a=LONG))
    assert len(encoded.prompt_ids) == 218 and encoded.tokens_cut > 0
    # optqa's own decoder, which answers (PEFT's generate passes the cache under both of its names on transformers
    # 5.24, one of them deprecated)
    batch = collate_for_generation([encoded], model.tokenizer.pad_token_id)
    output_ids, _ = generate(model, batch, max_new_tokens=32, min_new_tokens=32)  # OpenPrompt's generate
    assert len(output_ids[0]) == 218 + 32


@pytest.fixture(scope="module")
def checkpoint_64(tiny_opt, long_data, tmp_path_factory):
    """A delta trained with --max_seq_l 64."""
    out = tmp_path_factory.mktemp("ckpt-64")
    train_in_process(tiny_opt, long_data, out, "--max_seq_l", "64", "--max_new_tokens", "4", "--precision", "fp32",
                     "--train_epochs", "1")
    return out / "delta_ckpts"


def test_answering_with_too_many_new_tokens_is_refused_before_loading(capsys, caplog, tiny_opt, checkpoint_64):
    argv = ["--mode", "interactive_inference", "--delta_save_path", str(checkpoint_64), "--max_new_tokens", "250"]
    assert refusal(capsys, caplog, argv) == (
        f"error: --max_seq_l 64 + --max_new_tokens 250 = 314 positions, more than the 256 of backbone {tiny_opt} "
        "(max_position_embeddings); lower --max_new_tokens to 192 or less")


def test_the_repl_says_when_it_cut_a_question(tiny_opt, checkpoint_64):
    model, _, _ = load_trained(checkpoint_64)
    # the question tokens that fit: 64 less bos and the template's own tokens, counted on an empty question
    fixed = LMTokenizerWrapper(model.tokenizer, model.template, max_seq_length=10_000).encode(InputExample(text_a=""))
    kept = 64 - len(fixed.prompt_ids)
    short = MEMORY_SET[0][0]
    stdout = io.StringIO()
    repl(partial(answer_with_notes, model), stdin=io.StringIO(f"{LONG}\n{short}\n"), stdout=stdout)
    long_answer, short_answer = model.answer([LONG, short])
    assert [line for line in stdout.getvalue().split("\n") if line.startswith("Answer:")] == [
        f"Answer: {one_line(long_answer)}   [question cut to its first {kept} tokens to fit max_seq_l 64]",
        f"Answer: {one_line(short_answer)}"]
