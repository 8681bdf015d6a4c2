"""An answer is one line: greedy decoding stops at a line break that follows some text (a few-shot prompt otherwise
runs on into the next worked example), leading blank lines are skipped, and ``stop_at_newline=False`` keeps every
line."""
from __future__ import annotations

import pytest
import torch

from optqa.build import build_model
from optqa.config import RunConfig
from optqa.data import InputExample, collate_for_generation

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def forced(tokenizer, pieces: list[str]):
    """A logits processor that makes step k emit ``pieces[k]`` (one token each), then eos."""
    ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(p)) for p in pieces]
    assert all(len(i) == 1 for i in ids), ids
    plan = [i[0] for i in ids] + [tokenizer.eos_token_id] * 20

    def processor(logits, step):
        out = torch.full_like(logits, -1e4)
        out[:, plan[step]] = 0.0
        return out
    return processor


@pytest.mark.parametrize("stop,text,steps", [(True, "water", 3), (False, "water\n the", 6)])
def test_an_answer_ends_at_its_first_line_break_after_text(lively_opt, stop, text, steps):
    model, _ = build_model(RunConfig(plm_path=str(lively_opt), delta_type="lora", max_new_tokens=8))
    model.stop_at_newline = stop
    model.eval()
    tokenizer = model.tokenizer
    batch = collate_for_generation([model.wrapper.encode(InputExample(guid=0, text_a="What gas?"))],
                                   tokenizer.pad_token_id)
    # a leading line break does not end the answer; the one after " water" does
    answers, rows = model.generate_answers(batch, logits_processor=forced(tokenizer, ["\n", " water", "\n", " the",
                                                                                      "\n"]), return_ids=True)
    assert answers == [text]
    assert len(rows[0]) == steps


def forced_rows(tokenizer, plans: list[list[str]]):
    """A logits processor that makes row r emit ``plans[r][k]`` (one token each) at step k, then eos."""
    rows = [tokenizer.convert_tokens_to_ids([tokenizer.tokenize(p)[0] for p in plan]) + [tokenizer.eos_token_id] * 20
            for plan in plans]

    def processor(logits, step):
        out = torch.full_like(logits, -1e4)
        for row, plan in enumerate(rows):
            out[row, plan[step]] = 0.0
        return out
    return processor


def test_a_row_that_ends_at_a_line_break_returns_no_padding_while_another_goes_on(lively_opt):
    """Row 0 ends at its line break on step 2 while row 1 runs to max_new_tokens: row 0's ids end at the line
    break (the steps after it were padding, not its answer)."""
    model, _ = build_model(RunConfig(plm_path=str(lively_opt), delta_type="lora", max_new_tokens=5))
    model.eval()
    tokenizer = model.tokenizer
    encoded = [model.wrapper.encode(InputExample(guid=i, text_a=q), i) for i, q in enumerate(["What gas?", "Why?"])]
    batch = collate_for_generation(encoded, tokenizer.pad_token_id)
    plans = [[" water", "\n"], [" the", " sun", " is", " hot", " and"]]
    answers, rows = model.generate_answers(batch, logits_processor=forced_rows(tokenizer, plans), return_ids=True)
    ids = [tokenizer.convert_tokens_to_ids([tokenizer.tokenize(p)[0] for p in plan]) for plan in plans]
    assert answers == ["water", "the sun is hot and"]
    assert rows == ids  # row 0: " water", "\n" and nothing after it
    assert tokenizer.pad_token_id not in rows[0]


def test_models_on_one_tokenizer_share_one_line_end_table(lively_opt, monkeypatch):
    """The line-end tables come from decoding the whole vocabulary: models on one tokenizer (serve's deltas on
    one backbone) share one table, decoded once."""
    from optqa.model import PromptForGeneration
    from optqa.plm import load_plm
    from optqa.template import ManualTemplate

    plm, tokenizer, _, _ = load_plm("opt", str(lively_opt))
    decoded = []
    batch_decode = tokenizer.batch_decode
    monkeypatch.setattr(tokenizer, "batch_decode",
                        lambda ids, **kw: decoded.append(len(ids)) or batch_decode(ids, **kw))
    models = [PromptForGeneration(plm, ManualTemplate(tokenizer, '{"placeholder":"text_a"} Answer: {"mask"}'),
                                  max_new_tokens=3).eval() for _ in range(2)]
    assert models[0].line_ends is models[1].line_ends
    for model in models:
        model.answer(["What gas?"])
    assert decoded == [len(tokenizer)]  # the vocabulary, decoded once for both
