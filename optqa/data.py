"""QA jsonl in, token ids out: reading and validating rows, rendering them once, batching them.

Rows are validated as they are read so that a bad file fails in one line naming file and line; every
example is rendered and tokenised once per data set, never per step.
"""
from __future__ import annotations

import codecs
import json
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from optqa.errors import OptqaError
from optqa.template import SOFT_NONE

log = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")
IGNORE_INDEX = -100


@dataclass
class InputExample:
    """OpenPrompt's InputExample; ``tgt_text`` holds the gold answers (a list)."""
    guid: Any = None
    text_a: str = ""
    text_b: str = ""
    label: Any = None
    meta: dict = field(default_factory=dict)
    tgt_text: Any = None


def iter_jsonl_objects(path: str | Path, kind: str) -> Iterator[tuple[str, int, dict]]:
    """``(file:line, line number, row)`` for each non-blank line; a missing file, bad JSON or a row that is not
    an object is an OptqaError naming ``file:line``. Read as bytes: a file's encoding and line ends never
    depend on the platform."""
    path = Path(path)
    if not path.is_file():
        raise OptqaError(f"{kind} not found: {path}")
    try:
        yield from _jsonl_objects(path)
    except OSError as exc:  # no permission, a disk error: the file cannot be read
        raise OptqaError(f"cannot read {kind} {path} ({exc.strerror or exc})") from None


def _jsonl_objects(path: Path) -> Iterator[tuple[str, int, dict]]:
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            if line_no == 1:  # editors on Windows often save UTF-8 with a byte-order mark
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise OptqaError(f"{where}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
            except ValueError:  # Python reads no integer of over 4300 digits (sys.get_int_max_str_digits)
                raise OptqaError(f"{where}: a number has more digits than Python reads "
                                 f"({sys.get_int_max_str_digits()}); write such an id as a string") from None
            except RecursionError:
                raise OptqaError(f"{where}: not valid JSON (nested too deeply for Python's JSON parser)") from None
            if not isinstance(row, dict):
                raise OptqaError(f"{where}: expected a JSON object, got {type(row).__name__}")
            _refuse_lone_surrogates(row, where)
            yield where, line_no, row


def _refuse_lone_surrogates(row: dict, where: str) -> None:
    """A JSON escape such as ``"\\ud800"`` is valid JSON but no text: the tokenizer and every UTF-8 file it
    would be written to refuse it later, far from the line that holds it. Walked without recursion: a row may
    nest as deeply as the parser allowed."""
    stack: list[tuple[str, Any]] = [(name, value) for name, value in row.items()]
    while stack:
        name, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{name}.{key}", item) for key, item in value.items())
            value = list(value)  # the keys are strings too
        if isinstance(value, list):
            stack.extend((name, item) for item in value if isinstance(item, (str, dict, list)))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise OptqaError(f"{where}: field {name!r} holds a lone surrogate ({value[exc.start]!r} at character "
                                 f"{exc.start}), which is not text; write the character itself, in UTF-8") from None


def read_qa_jsonl(path: str | Path, question_field: str = "question", answers_field: str = "answers",
                  id_field: str = "question_id") -> list[InputExample]:
    """Read a QA jsonl; each bad row is an OptqaError naming ``file:line``."""
    path = Path(path)
    examples = []
    seen_ids: dict[str, int] = {}
    for where, line_no, row in iter_jsonl_objects(path, "data file"):
        question = row.get(question_field)
        if question_field not in row:
            raise OptqaError(f"{where}: missing field {question_field!r}")
        if not isinstance(question, str) or not question.strip():
            raise OptqaError(f"{where}: field {question_field!r} must be a non-empty string")
        answers = row.get(answers_field)
        if answers_field not in row:
            raise OptqaError(f"{where}: missing field {answers_field!r} (a question needs gold answers)")
        else:
            answers = _validate_answers(answers, answers_field, where)
        meta = {k: v for k, v in row.items() if k not in (question_field, answers_field)}
        guid = row.get(id_field, f"{path.stem}-{line_no}")
        # predictions are matched to gold answers by id, so an id used twice would make scores ambiguous
        if str(guid) in seen_ids:
            raise OptqaError(f"{where}: question id {guid!r} already used on line {seen_ids[str(guid)]}")
        seen_ids[str(guid)] = line_no
        examples.append(InputExample(guid=guid, text_a=question.strip(),
                                     meta=meta, tgt_text=answers))
    if not examples:
        raise OptqaError(f"{path}: no questions in the file")
    return examples


def _validate_answers(answers: Any, name: str, where: str) -> list[str]:
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise OptqaError(f"{where}: field {name!r} must be a non-empty list of strings")
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise OptqaError(f"{where}: field {name!r} must hold only non-empty strings")
    return [a.strip() for a in answers]


def split_files(config) -> dict[str, Path]:
    """The jsonl per split: --train_file/--dev_file/--test_file, else <data_path>/<split>.jsonl."""
    base = Path(config.data_path)
    return {split: Path(getattr(config, f"{split}_file") or base / f"{split}.jsonl") for split in SPLITS}


def load_split(config, split: str) -> list[InputExample]:
    """The examples of ``split`` (train, dev or test) from the file ``config`` names for it.

    Raises:
        OptqaError: a missing file or a malformed row (naming file and line).
    """
    return read_qa_jsonl(split_files(config)[split], config.question_field, config.answers_field, config.id_field)


def draw_shots(examples: list[InputExample], num_shots: int, seed: int) -> list[InputExample]:
    """The in-context examples of a few-shot prompt: ``num_shots`` + 1 training examples drawn once with ``seed``
    (``random.Random(seed).sample``), in the drawn order. The first ``num_shots`` are the shots of every question;
    the spare one stands in for a shot that is the question being asked (``LMTokenizerWrapper.use_shots``).

    Raises:
        OptqaError: fewer training examples than ``num_shots``.
    """
    if num_shots > len(examples):
        raise OptqaError(f"--num_shots {num_shots} asks for more shots than the {len(examples)} questions of the "
                         "train split; lower --num_shots")
    order = random.Random(seed).sample(range(len(examples)), min(num_shots + 1, len(examples)))
    return [examples[i] for i in order]


@dataclass
class Encoded:
    """One rendered example: prompt ids (bos first), which prompt positions are soft, and the target."""
    index: int
    guid: Any
    question: str
    golds: list[str]
    prompt_ids: list[int]
    soft_index: list[int]
    target_ids: list[int] = field(default_factory=list)
    truncated: bool = False
    question_lost: bool = False  # cut to nothing: the template and the answer alone fill max_seq_l
    # question tokens removed to fit max_seq_l, counted in what was tokenised: of a question far longer than
    # max_seq_l only a head is (template.render's max_tokens), so there it is a lower bound
    tokens_cut: int = 0
    question_tokens: int = 0  # question (shortenable) tokens kept in the prompt

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


class LMTokenizerWrapper:
    """Renders examples through a template into token ids (OpenPrompt's WrapperClass for decoder LMs).

    Examples longer than ``max_seq_length`` lose tokens from the end of their shortenable pieces (the
    question); the template's fixed text and the answer are never cut.
    """

    def __init__(self, tokenizer, template, max_seq_length: int = 128):
        self.tokenizer = tokenizer
        self.template = template
        self.max_seq_length = max_seq_length
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        # how prompts are built around the template (set by use_chat_template / use_shots; off: the plain prompt)
        self.chat_template = False
        self.shots: list[InputExample] = []  # draw_shots' K + 1 examples: the K shots and one spare
        self.num_shots = 0

    def use_chat_template(self, on: bool = True) -> None:
        """Render every prompt as the user message of the tokenizer's chat template (``apply_chat_template``
        with ``add_generation_prompt=True``); answers (and training targets) then follow the assistant's header
        without a leading space.

        Raises:
            OptqaError: the tokenizer has no chat template, or the template has ``{"soft"}`` pieces (no text).
        """
        if on and not getattr(self.tokenizer, "chat_template", None):
            raise OptqaError(f"--chat_template: the tokenizer of {self.tokenizer.name_or_path} has no chat template "
                             "(no chat_template in its tokenizer_config.json); drop --chat_template")
        if on and self.template.num_soft_tokens:
            raise OptqaError('--chat_template writes the prompt as text into the chat, and a template with {"soft"} '
                             "pieces has no text form; drop one of them")
        self.chat_template = on

    def use_shots(self, drawn: list[InputExample], num_shots: int) -> None:
        """Put ``num_shots`` examples (``draw_shots``' list) before every prompt: each rendered through the template
        with its first gold answer after it, then a newline (in a chat: a user turn and an assistant turn each).

        The shots are the first ``num_shots`` of ``drawn`` whose question is not the one being asked: the same K
        for every question, except where the question is itself one of them (scoring the train split), where the
        next drawn example takes its place, last. Shots are never cut; only the question is.
        """
        self.shots, self.num_shots = list(drawn), num_shots

    def shots_for(self, example: InputExample) -> list[InputExample]:
        """The shots put before ``example`` (see ``use_shots``).

        Raises:
            OptqaError: too few training questions other than this one.
        """
        shots = [s for s in self.shots if s.text_a != example.text_a][:self.num_shots]
        if len(shots) < self.num_shots:
            raise OptqaError(f"--num_shots {self.num_shots}: the train split has too few questions other than "
                             f"question {example.guid} to draw {self.num_shots} shots from; lower --num_shots")
        return shots

    def _answer_ids(self, answer: str) -> list[int]:
        """An answer's ids (at most ``max_seq_length`` + a few, see ``encode_head``): after a plain prompt with a
        leading space, which makes its first word a word-initial BPE token as after "Answer:"; after a chat's
        assistant header, as the message's text."""
        return self.template.encode_head(("" if self.chat_template else " ") + answer.strip(), self.max_seq_length)

    def encode_target(self, answer: str, guid: Any = None) -> list[int]:
        """The ids of an answer as the model must generate it, then the eos.

        Raises:
            OptqaError: the answer alone has more than ``max_seq_length`` tokens: answers are never cut, and no row
                could hold it (only the head of the answer that shows it is tokenised).
        """
        ids = self._answer_ids(answer)
        if len(ids) > self.max_seq_length:
            raise OptqaError(f"question {guid}: its answer alone is longer than max_seq_l {self.max_seq_length} "
                             f"tokens (answers are never cut; it begins {answer.strip()[:30]!r})")
        return ids + [self.eos_id]

    def encode(self, example: InputExample, index: int = 0, target: str | None = None) -> Encoded:
        """One example as model input: the rendered prompt, then (for training) the answer and eos.

        Args:
            example: an ``InputExample``.
            index: its position in the split (kept to put answers back in order).
            target: the answer to train on; None for a prompt to answer.
        Returns:
            An ``Encoded``: the prompt ids (bos first), the target ids (answer and eos; empty to answer), ``soft_index``
            for ``{"soft"}`` positions, and how many question tokens were cut to fit ``max_seq_length``.
        """
        target_ids = self.encode_target(target, example.guid) if target is not None else []
        shots = self.shots_for(example) if self.num_shots else []
        if self.chat_template:
            prompt_ids, segments, tokens_cut = self._chat_prompt(example, shots, len(target_ids))
            soft_index = [SOFT_NONE] * len(prompt_ids)
        else:
            segments = [segment for shot in shots for segment in self._shot_segments(shot)]
            fixed = sum(len(ids) for _, ids, _ in segments)
            budget = self.max_seq_length - 1 - len(target_ids)
            # a question far longer than the budget is tokenised only as far as it can be kept (render's max_tokens)
            segments += self.template.render(example, max_tokens=max(budget - fixed, 0))
            tokens_cut = _cut_to_budget(segments, budget)
            prompt_ids, soft_index = self._join([("special", [self.bos_id], False), *segments])
        question_tokens = sum(len(ids) for _, ids, shortenable in segments if shortenable)
        truncated = tokens_cut > 0
        question_lost = truncated and not question_tokens
        if shots and question_lost:
            raise OptqaError(f"--num_shots {self.num_shots}: the shots leave no room for question {example.guid} "
                             f"within --max_seq_l {self.max_seq_length} tokens; lower --num_shots or raise "
                             "--max_seq_l")
        golds = list(example.tgt_text or [])
        return Encoded(index, example.guid, example.text_a, golds, prompt_ids, soft_index, target_ids, truncated,
                       question_lost, tokens_cut, question_tokens)

    def _join(self, segments: list[tuple[str, list[int], bool]]) -> tuple[list[int], list[int]]:
        """Prompt ids and soft indices of rendered segments (soft positions carry the pad id)."""
        prompt_ids: list[int] = []
        soft_index: list[int] = []
        for kind, ids, _ in segments:
            if kind == "soft":
                prompt_ids += [self.tokenizer.pad_token_id] * len(ids)
                soft_index += ids
            else:
                prompt_ids += ids
                soft_index += [SOFT_NONE] * len(ids)
        return prompt_ids, soft_index

    def _shot_segments(self, shot: InputExample) -> list[tuple[str, list[int], bool]]:
        """One shot as prompt segments, none shortenable: its prompt, its first gold answer, a newline."""
        rendered = [(kind, ids, False) for kind, ids, _ in self.template.render(shot)]
        return [*rendered, ("text", self._answer_ids(shot.tgt_text[0]), False),
                ("text", self.template._encode("\n"), False)]

    def _prompt_text(self, segments: list[tuple[str, list[int], bool]]) -> str:
        """The text of a rendered prompt (no soft pieces: ``use_chat_template`` refuses them)."""
        return self.tokenizer.decode([i for _, ids, _ in segments for i in ids])

    def _chat_prompt(self, example: InputExample, shots: list[InputExample],
                     target_tokens: int) -> tuple[list[int], list, int]:
        """The chat-template prompt: each shot a user turn (its prompt's text) and an assistant turn (its first
        answer), then the question's prompt text as the last user turn and the assistant's header.

        The question is cut until the whole conversation and ``target_tokens`` fit ``max_seq_length``; cut text is
        decoded from the kept tokens and tokenised again inside the chat, so a cut is checked again (a token may
        merge differently there).

        Returns:
            ``(prompt ids, the question's segments after cutting, question tokens cut)``.
        """
        messages = []
        for shot in shots:
            messages += [{"role": "user", "content": self._prompt_text(self.template.render(shot))},
                         {"role": "assistant", "content": shot.tgt_text[0].strip()}]
        budget = self.max_seq_length - target_tokens
        segments = self.template.render(example, max_tokens=max(budget, 0))
        cut = 0
        while True:
            text = self.tokenizer.apply_chat_template(
                [*messages, {"role": "user", "content": self._prompt_text(segments)}],
                tokenize=False, add_generation_prompt=True)
            # the chat template writes its own special tokens (bos among them where the model wants one)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            excess = len(ids) - budget
            more = _cut_to_budget(segments, sum(len(i) for _, i, _ in segments) - excess) if excess > 0 else 0
            if not more:
                return ids, segments, cut
            cut += more

    def encode_all(self, examples: list[InputExample], targets: str | list[str] | None = None,
                   desc: str = "tokenising", progress: bool | None = None) -> list[Encoded]:
        """Render every example once.

        Args:
            targets: None (prompts only), "first" or "all" gold answers (``tgt_text``), or a list holding one
                target text per example (what a ``GenerationVerbalizer`` made).
            progress: show a tqdm bar; None shows it from 500 examples on.
        """
        encoded = []
        bar = tqdm(examples, desc=desc, leave=False, disable=len(examples) < 500 if progress is None else not progress)
        for index, example in enumerate(bar):
            if targets is None:
                encoded.append(self.encode(example, index))
                continue
            if isinstance(targets, list):
                encoded.append(self.encode(example, index, targets[index]))
                continue
            answers = example.tgt_text[:1] if targets == "first" else example.tgt_text
            encoded.extend(self.encode(example, index, answer) for answer in answers)
        cut = sum(e.truncated for e in encoded)
        if cut:
            log.info("%s: %d of %d examples were longer than max_seq_l=%d; their questions were cut",
                     desc, cut, len(encoded), self.max_seq_length)
        lost = [e for e in encoded if e.question_lost]
        if lost:
            log.warning("%s: %d of %d examples kept no question tokens at all (the template and the answer alone "
                        "fill max_seq_l=%d; first: question %s); raise --max_seq_l", desc, len(lost), len(encoded),
                        self.max_seq_length, lost[0].guid)
        return encoded


def _cut_to_budget(segments: list[tuple[str, list[int], bool]], budget: int) -> int:
    """Cut the tails of the shortenable segments until the prompt fits ``budget`` tokens; returns how many tokens
    were cut.

    The longest shortenable segment loses a token, then the longest again, and so on (ties: the first in the
    template), as OpenPrompt's ``truncate`` does, but computed at once: every segment longer than a level ``L``
    is cut to ``L``, and the ``rest`` tokens still over the budget come off the first segments standing at ``L``.
    Fixed text and the answer are never cut. Each segment is sliced once (the one-token-at-a-time loop copied
    the list per token: quadratic in the question's length).
    """
    excess = sum(len(ids) for _, ids, _ in segments) - budget
    lengths = {i: len(ids) for i, (_, ids, shortenable) in enumerate(segments) if shortenable and ids}
    if excess <= 0 or not lengths:
        return 0
    excess = min(excess, sum(lengths.values()))  # beyond that only fixed text is left
    # the highest level L at which cutting every segment down to L removes at least ``excess`` tokens
    low, high = 0, max(lengths.values())
    while low < high:
        level = (low + high + 1) // 2
        if sum(max(n - level, 0) for n in lengths.values()) >= excess:
            low = level
        else:
            high = level - 1
    level = low
    rest = excess - sum(max(n - level - 1, 0) for n in lengths.values())  # cut to level + 1 first, then these
    for i, n in lengths.items():  # dicts keep the template's order: ties go to the first segment
        keep = min(n, level + 1)
        if keep == level + 1 and rest > 0:
            keep, rest = level, rest - 1
        kind, ids, shortenable = segments[i]
        segments[i] = (kind, ids[:keep], shortenable)
    return excess


def collate_for_training(batch: list[Encoded], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad prompt+target to the longest in the batch (or to ``width`` if longer, OpenPrompt's pad-to-max);
    the loss sees only target tokens."""
    width = max(width or 0, max(len(e) for e in batch))
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    soft = torch.full((len(batch), width), SOFT_NONE, dtype=torch.long)
    for row, e in enumerate(batch):
        ids = e.prompt_ids + e.target_ids
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, len(e.prompt_ids):len(ids)] = torch.tensor(e.target_ids)
        attention[row, :len(ids)] = 1
        soft[row, :len(e.prompt_ids)] = torch.tensor(e.soft_index)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "soft_index": soft}


def collate_for_generation(batch: list[Encoded], pad_id: int, width: int | None = None) -> dict[str, Any]:
    """Left-pad prompts (to the longest, or to ``width`` if longer) so every row's next token is generated at the
    same position."""
    width = max(width or 0, max(len(e.prompt_ids) for e in batch))
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    soft = torch.full((len(batch), width), SOFT_NONE, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.prompt_ids)
        input_ids[row, width - n:] = torch.tensor(e.prompt_ids)
        attention[row, width - n:] = 1
        soft[row, width - n:] = torch.tensor(e.soft_index)
    return {"input_ids": input_ids, "attention_mask": attention, "soft_index": soft,
            "index": [e.index for e in batch]}


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of similar-length examples, in a random order that changes every epoch.

    Own code because transformers' LengthGroupedSampler orders each megabatch longest-first and has no
    ``set_epoch``, so a resumed epoch could not replay its batches (``--resume`` is exact; tested).

    The data are shuffled, cut into chunks of ``batch_size * chunk_batches``, each chunk is sorted by length
    and split into batches, and the batches are shuffled: padding shrinks while any example can still meet
    any other. Every example appears exactly once per epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = True, chunk_batches: int = 50):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.chunk = batch_size * chunk_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next epoch's order (a function of the seed and ``epoch`` alone, so a resume replays it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 1000003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            chunks = [sorted(order[i:i + self.chunk], key=self.lengths.__getitem__)
                      for i in range(0, len(order), self.chunk)]
            order = [i for chunk in chunks for i in chunk]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return iter(batches)


def generation_batches(encoded: list[Encoded], batch_size: int, max_padding: float = 0.3) -> list[list[Encoded]]:
    """Answering batches of prompts sorted by length, so left padding stays short.

    A batch also ends early once its left padding would pass ``max_padding`` of its prompt tokens: question
    lengths have a long tail (ARC-DA: median 17 tokens, max 152), and a few long questions at the end of the
    order would otherwise make up to ``batch_size - 1`` shorter ones pad to their length.
    """
    ordered = sorted(encoded, key=lambda e: len(e.prompt_ids))
    batches: list[list[Encoded]] = []
    current: list[Encoded] = []
    real = 0
    for example in ordered:
        width = len(example.prompt_ids)  # the longest so far: the batch's width if it joins
        too_padded = (len(current) + 1) * width * (1 - max_padding) > real + width
        # a short batch saves padding but costs a whole run of decoding steps: only cut ones that are not short
        if current and (len(current) >= batch_size or (too_padded and len(current) >= max(batch_size // 4, 1))):
            batches.append(current)
            current, real = [], 0
        current.append(example)
        real += width
    if current:
        batches.append(current)
    return batches
