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


def test_a_row_that_ends_its_line_returns_its_ids_without_the_batchs_padding(lively_opt):
    """The ids returned for an answer (the server's completion_tokens and finish_reason read them) end with the
    token that ended it, also when another row of the batch goes on."""
    model, _ = build_model(RunConfig(plm_path=str(lively_opt), delta_type="lora", max_new_tokens=8))
    model.eval()
    tokenizer = model.tokenizer
    ids = {p: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(p))[0] for p in (" water", "\n", " the")}
    plans = [[ids[" water"], ids["\n"]] + [ids[" the"]] * 8, [ids[" the"]] * 8]

    def processor(logits, step):
        out = torch.full_like(logits, -1e4)
        for row, plan in enumerate(plans):
            out[row, plan[step]] = 0.0
        return out
    encoded = [model.wrapper.encode(InputExample(guid=i, text_a=q), i) for i, q in enumerate(["What gas?", "Why?"])]
    batch = collate_for_generation(encoded, tokenizer.pad_token_id)
    answers, rows = model.generate_answers(batch, logits_processor=processor, return_ids=True)
    by_index = dict(zip(batch["index"], zip(answers, rows)))
    assert by_index[0] == ("water", [ids[" water"], ids["\n"]])
    assert by_index[1] == ("the the the the the the the the".strip(), [ids[" the"]] * 8)
