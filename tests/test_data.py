"""Reading any QA jsonl (validation names file and line) and cutting long inputs (only the question)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import train_args

from optqa.config import RunConfig
from optqa.data import InputExample, LMTokenizerWrapper, load_split, read_qa_jsonl
from optqa.errors import OptqaError

GOOD = {"question_id": "q1", "question": "What is frozen water called?", "answers": ["ice"]}


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# (bad line, words the message must contain); the bad row is line 3, after a good row and a blank line
BAD_ROWS = {
    "bad json": ('{"question": "x", "answers": ["y"]', "not valid JSON"),
    "not an object": ('["x", ["y"]]', "expected a JSON object"),
    "missing question": ('{"answers": ["y"]}', "missing field 'question'"),
    "missing answers": ('{"question": "x"}', "missing field 'answers'"),
    "empty question": ('{"question": "", "answers": ["y"]}', "'question' must be a non-empty string"),
    "blank question": ('{"question": "  \\t", "answers": ["y"]}', "'question' must be a non-empty string"),
    "question not text": ('{"question": 7, "answers": ["y"]}', "'question' must be a non-empty string"),
    "answers empty list": ('{"question": "x", "answers": []}', "'answers' must be a non-empty list of strings"),
    "answers null": ('{"question": "x", "answers": null}', "'answers' must be a non-empty list of strings"),
    "answers object": ('{"question": "x", "answers": {"a": 1}}', "'answers' must be a non-empty list of strings"),
    "answers number": ('{"question": "x", "answers": 3}', "'answers' must be a non-empty list of strings"),
    "answer not text": ('{"question": "x", "answers": ["y", 2]}', "'answers' must hold only non-empty strings"),
    "answer empty": ('{"question": "x", "answers": ["y", " "]}', "'answers' must hold only non-empty strings"),
    "empty string answer": ('{"question": "x", "answers": ""}', "'answers' must"),
}
# rows the parser or the tokenizer would have failed on with a traceback, and their exact one-line reasons
UNREADABLE_ROWS = {
    "nested 100k deep": ('{"question": "x", "answers": ["y"], "meta": ' + "[" * 100_000 + "]" * 100_000 + "}",
                         "not valid JSON (nested too deeply for Python's JSON parser)"),
    "5000-digit id": ('{"question_id": ' + "9" * 5000 + ', "question": "x", "answers": ["y"]}',
                      "a number has more digits than Python reads (4300); write such an id as a string"),
    "surrogate in the question": ('{"question": "bad \\ud800 q", "answers": ["y"]}',
                                  "field 'question' holds a lone surrogate ('\\ud800' at character 4), which is "
                                  "not text; write the character itself, in UTF-8"),
    "surrogate in an answer": ('{"question": "x", "answers": ["y", "\\udc80"]}',
                               "field 'answers' holds a lone surrogate ('\\udc80' at character 0), which is not "
                               "text; write the character itself, in UTF-8"),
    "surrogate in a nested key": ('{"question": "x", "answers": ["y"], "meta": {"a": [{"\\ud83d": 1}]}}',
                                  "field 'meta.a' holds a lone surrogate ('\\ud83d' at character 0), which is not "
                                  "text; write the character itself, in UTF-8"),
}


def _refusal_of_line_3(folder: Path, bad: str) -> tuple[Path, str]:
    """The file (a good row, a blank line, ``bad``, a good row) and the message reading it is refused with."""
    path = _write_lines(folder / "train.jsonl", [json.dumps(GOOD), "", bad, json.dumps(GOOD)])
    with pytest.raises(OptqaError) as err:
        read_qa_jsonl(path)
    return path, str(err.value)


@pytest.mark.parametrize("case", BAD_ROWS)
def test_each_bad_row_names_file_and_line(tmp_path, case):
    bad, words = BAD_ROWS[case]
    path, message = _refusal_of_line_3(tmp_path, bad)
    assert message.startswith(f"{path}:3: ") and words in message and "\n" not in message


@pytest.mark.parametrize("case", UNREADABLE_ROWS)
def test_rows_the_parser_or_tokenizer_would_fail_on_are_one_line(tmp_path, case):
    bad, reason = UNREADABLE_ROWS[case]
    path, message = _refusal_of_line_3(tmp_path, bad)
    assert message == f"{path}:3: {reason}"


def test_custom_field_names_and_single_string_answer(tmp_path):
    # a single string is taken as the only gold answer: many QA sets store one answer that way
    path = _write_lines(tmp_path / "mine.jsonl", [
        json.dumps({"qid": 10, "q": " Capital of France? ", "golds": "Paris", "source": "atlas"}),
        json.dumps({"qid": 11, "q": "Two plus two?", "golds": ["four", " 4 "]}),
        json.dumps({"q": "No id here?", "golds": ["none"]}),
    ])
    examples = read_qa_jsonl(path, question_field="q", answers_field="golds", id_field="qid")
    assert [(e.guid, e.text_a, e.tgt_text) for e in examples] == [
        (10, "Capital of France?", ["Paris"]), (11, "Two plus two?", ["four", "4"]),
        ("mine-3", "No id here?", ["none"])]  # without an id the row is named after file and line
    assert examples[0].meta == {"qid": 10, "source": "atlas"}
    # ARC-DA's field names are then wrong for this file, and the error says which one
    with pytest.raises(OptqaError, match=rf"^{path}:1: missing field 'question'$"):
        read_qa_jsonl(path)


def test_split_flags_pick_files_and_fields(tmp_path):
    custom = _write_lines(tmp_path / "elsewhere.jsonl", [json.dumps({"id": "a", "text": "Why?", "ok": ["because"]})])
    config = RunConfig(data_path=str(tmp_path / "absent"), dev_file=str(custom), question_field="text",
                       answers_field="ok", id_field="id")
    assert [(e.guid, e.text_a, e.tgt_text) for e in load_split(config, "dev")] == [("a", "Why?", ["because"])]
    with pytest.raises(OptqaError, match=rf"^data file not found: {tmp_path / 'absent' / 'test.jsonl'}$"):
        load_split(config, "test")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(OptqaError, match=rf"^data file not found: {tmp_path / 'nope.jsonl'}$"):
        read_qa_jsonl(tmp_path / "nope.jsonl")
    empty = _write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(OptqaError, match="no questions"):
        read_qa_jsonl(empty)


def test_bad_dev_row_stops_training_before_the_model_loads(tiny_opt, memory_data, tmp_path, capsys, caplog):
    # in process: test_inputs.py runs the one real command of this class of refusal
    from optqa.cli import main

    dev = _write_lines(tmp_path / "dev.jsonl", [json.dumps(GOOD), '{"question": "x", "answers": []}'])
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    assert main(train_args(tiny_opt, memory_data, tmp_path, "--dev_file", str(dev))) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {dev}:2: field 'answers' must be a non-empty list of strings"]
    assert "loading backbone" not in caplog.text and not (tmp_path / "runs").exists()


# ---- inputs longer than --max_seq_l -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_opt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_opt)


def _wrapper(tokenizer, max_seq_length: int) -> LMTokenizerWrapper:
    from optqa.template import ManualTemplate

    # fixed text on both sides of the question, so both must survive the cut
    template = ManualTemplate(tokenizer, text='Question: {"placeholder":"text_a"} Answer: {"mask"}')
    return LMTokenizerWrapper(tokenizer, template, max_seq_length=max_seq_length)


LONG = ("Which process moves water from the leaves of a plant into the air, and why does it happen faster "
        "on a hot, dry and windy day than on a cool, damp and still one?")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_long_question_is_cut_never_answer_or_template(tokenizer):
    head, question, tail = _ids(tokenizer, "Question:"), _ids(tokenizer, " " + LONG), _ids(tokenizer, " Answer:")
    answer = _ids(tokenizer, " water vapor leaving leaves") + [tokenizer.eos_token_id]
    max_len = 1 + len(head) + len(tail) + len(answer) + 5  # room for 5 question tokens
    assert len(question) > 5
    wrapper = _wrapper(tokenizer, max_len)
    example = InputExample(guid="long", text_a=LONG, tgt_text=["water vapor leaving leaves"])

    encoded = wrapper.encode(example, target="water vapor leaving leaves")
    ids = encoded.prompt_ids + encoded.target_ids
    assert encoded.truncated and len(ids) == max_len
    assert encoded.target_ids == answer and ids[-len(answer):] == answer  # the whole answer, then eos
    # bos, the template's fixed text, the first question tokens, the fixed text again
    assert encoded.prompt_ids == [wrapper.bos_id] + head + question[:5] + tail

    # a prompt to answer (no target) keeps more of the question, still cut at the same limit
    prompt = wrapper.encode(example)
    assert prompt.truncated and len(prompt.prompt_ids) == max_len
    assert prompt.prompt_ids[-len(tail):] == tail and prompt.prompt_ids[1:1 + len(head)] == head

    short = InputExample(guid="short", text_a="What is ice?", tgt_text=["frozen water"])
    assert not wrapper.encode(short, target="frozen water").truncated


def test_cut_examples_are_counted_in_the_log(tokenizer, caplog):
    wrapper = _wrapper(tokenizer, 24)
    examples = [InputExample(guid=i, text_a=text, tgt_text=["ice", "frozen water"])
                for i, text in enumerate([LONG, "What is ice?", LONG + " Explain.", "Why?"])]
    with caplog.at_level(logging.INFO, logger="optqa.data"):
        encoded = wrapper.encode_all(examples, targets="all", desc="tokenising train")
    assert [e.truncated for e in encoded] == [True, True, False, False, True, True, False, False]
    assert "tokenising train: 4 of 8 examples were longer than max_seq_l=24; their questions were cut" in [
        r.getMessage() for r in caplog.records]


def test_template_and_answer_alone_too_long_keep_everything_but_the_question(tokenizer, caplog):
    # the limit is then exceeded rather than cutting an answer or the template: a wrong target is worse
    wrapper = _wrapper(tokenizer, 4)
    encoded = wrapper.encode(InputExample(text_a=LONG, tgt_text=["a"]), target="carbon dioxide gas")
    assert encoded.question_lost
    examples = [InputExample(guid=f"q{i}", text_a=text, tgt_text=["carbon dioxide gas"])
                for i, text in enumerate(["Why?", LONG])]
    with caplog.at_level(logging.WARNING, logger="optqa.data"):
        wrapper.encode_all(examples, targets="first", desc="tokenising train")
    assert ("tokenising train: 2 of 2 examples kept no question tokens at all (the template and the answer alone "
            "fill max_seq_l=4; first: question q0); raise --max_seq_l") in [r.getMessage() for r in caplog.records]
    assert not _wrapper(tokenizer, 128).encode(examples[1], target="gas").question_lost
    assert encoded.prompt_ids == [wrapper.bos_id] + _ids(tokenizer, "Question:") + _ids(tokenizer, " Answer:")
    assert encoded.target_ids == _ids(tokenizer, " carbon dioxide gas") + [tokenizer.eos_token_id]



def test_a_byte_order_mark_is_accepted_and_a_repeated_id_is_refused(tmp_path):
    rows = [{"question_id": "q1", "question": "What is ice?", "answers": ["frozen water"]},
            {"question_id": "q2", "question": "What is steam?", "answers": ["water vapor"]}]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode("utf-8") + b"\n")
    assert [e.guid for e in read_qa_jsonl(path)] == ["q1", "q2"]

    rows[1]["question_id"] = "q1"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with pytest.raises(OptqaError, match=r"bom\.jsonl:2: question id 'q1' already used on line 1"):
        read_qa_jsonl(path)


def _cut_one_token_at_a_time(segments, budget):
    """The cut as it was first written (quadratic, kept as the reference): the longest shortenable segment loses
    its last token until the prompt fits; ties go to the first."""
    excess, cut = sum(len(ids) for _, ids, _ in segments) - budget, 0
    while excess > 0:
        candidates = [i for i, (_, ids, shortenable) in enumerate(segments) if shortenable and ids]
        if not candidates:
            break
        longest = max(candidates, key=lambda i: len(segments[i][1]))
        kind, ids, shortenable = segments[longest]
        segments[longest] = (kind, ids[:-1], shortenable)
        excess, cut = excess - 1, cut + 1
    return cut


def test_the_cut_at_once_equals_the_token_at_a_time_cut():
    import random

    from optqa.data import _cut_to_budget

    rng = random.Random(0)
    for _ in range(3000):
        segments = [("text", list(range(rng.randint(0, 30))), rng.random() < 0.6) for _ in range(rng.randint(1, 5))]
        budget = rng.randint(-5, 100)
        reference, fast = list(segments), list(segments)
        assert (_cut_to_budget(fast, budget), fast) == (_cut_one_token_at_a_time(reference, budget), reference)


class _CountingTokenizer:
    """The tokenizer, recording how many characters each call was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, text, **kwargs):
        self.calls.append(len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_megabyte_question_costs_what_its_kept_tokens_cost(tokenizer):
    # 5 MB of ordinary text: only a head is tokenised (at most twice the characters the kept tokens stand for)
    # and the prompt is exactly what tokenising all of it and cutting gives
    counting = _CountingTokenizer(tokenizer)
    wrapper = _wrapper(counting, 64)
    question = " ".join([LONG] * (5_000_000 // (len(LONG) + 1)))
    counting.calls.clear()
    encoded = wrapper.encode(InputExample(text_a=question), target="water vapor")
    budget = 64 - 1 - len(encoded.target_ids)
    head_chars = (budget + 8) * 8  # template.HEAD_SPARE_TOKENS, HEAD_CHARS_PER_TOKEN
    assert sum(counting.calls) < 4 * head_chars + 200  # the heads, the answer and the template's fixed text
    whole = _ids(tokenizer, " " + question)
    head, tail = _ids(tokenizer, "Question:"), _ids(tokenizer, " Answer:")
    kept = 64 - 1 - len(head) - len(tail) - len(encoded.target_ids)
    assert encoded.prompt_ids == [wrapper.bos_id] + head + whole[:kept] + tail
    assert encoded.truncated and encoded.question_tokens == kept and encoded.tokens_cut >= 8


def test_a_head_ends_before_whitespace_so_kept_tokens_match_the_whole_text(tokenizer):
    # words of every length, so heads end inside words: the kept tokens are still the whole text's first ones
    import random

    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 14))) for _ in range(3000)]
    question = " ".join(words)
    for max_len in (16, 40, 100):
        encoded = _wrapper(tokenizer, max_len).encode(InputExample(text_a=question))
        head, tail = _ids(tokenizer, "Question:"), _ids(tokenizer, " Answer:")
        kept = max_len - 1 - len(head) - len(tail)
        assert encoded.prompt_ids[1 + len(head):-len(tail)] == _ids(tokenizer, " " + question)[:kept]


def test_an_answer_longer_than_max_seq_l_by_itself_is_refused_without_tokenising_it_all(tokenizer):
    wrapper = _wrapper(tokenizer, 24)
    given = []
    encode = wrapper.template._encode
    wrapper.template._encode = lambda text: given.append(len(text)) or encode(text)
    with pytest.raises(OptqaError) as info:
        # 6 MB: it was tokenised whole, and its training row (a million tokens) overran the backbone's positions
        wrapper.encode(InputExample(guid="q9", text_a="Why?"), target="water " * 1_000_000)
    assert str(info.value) == ("question q9: its answer alone is longer than max_seq_l 24 tokens (answers are never "
                               "cut; it begins 'water water water water water ')")
    assert sum(given) < 2_000  # a head of it
    # an answer that fits alone is kept whole, even where the template and it overrun max_seq_l (tested above)
    assert wrapper.encode(InputExample(text_a="Why?"), target="water " * 10).target_ids == \
        _ids(tokenizer, " " + ("water " * 10).strip()) + [tokenizer.eos_token_id]


def test_a_data_file_that_cannot_be_read_is_one_error(tmp_path, monkeypatch):
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")

    def denied(self, *args, **kwargs):  # what a file without read permission gives (root reads any file)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(OptqaError, match=rf"^cannot read data file {path} \(Permission denied\)$"):
        read_qa_jsonl(path)
