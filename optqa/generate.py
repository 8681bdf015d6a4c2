"""Greedy decoding over a ``PromptForGeneration``, as functions (litgpt's ``generate``/``next_token`` shape).

optqa owns its loop over the KV cache so no transformers generation internals are involved: the model gives
the backbone's inputs for whole prompts (soft prompt and prefix applied, ``model.backbone_inputs``) and runs
each forward pass under its precision (``model.running``); these functions pick tokens, stop rows (eos, and
with ``stop_at_newline`` a line break after some text), keep FSDP processes in step and decode the answers.
"""
from __future__ import annotations

import contextlib
import logging
import weakref

import torch

from optqa.data import InputExample, collate_for_generation, generation_batches
from optqa.hardware import is_sharded

log = logging.getLogger(__name__)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position, counted along the attention mask (padding skipped), as OPT counts them itself
    (``OPTLearnedPositionalEmbedding``) and transformers' ``generate`` does for the other families.

    Args:
        attention_mask: ``(batch, seq_len)``, 0 on (left) padding; with virtual tokens, their leading ones.
    Returns:
        ``(batch, seq_len)`` long positions from 0; padding gets 0 (GPT-2's position table has no row -1, and
        a padding position is never attended to).
    """
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class LineEnds:
    """Which generated tokens end a one-line answer: a token holding a line break after some text (leading
    blank lines do not end an answer). The per-token tables are built once, from the vocabulary; get one through
    ``line_ends(tokenizer)``, which every model on that tokenizer shares.

    Args:
        tokenizer: the model's tokenizer.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _build(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(newline, text_then_newline, blank)``: one ``(vocab,)`` bool table each."""
        texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        tables = [[("\n" in t), bool(t.split("\n", 1)[0].strip()) and "\n" in t, not t.strip()] for t in texts]
        return tuple(torch.tensor(column, dtype=torch.bool, device=device) for column in zip(*tables))

    def __call__(self, next_ids: torch.Tensor, started: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which rows end their answer with ``next_ids`` ``(batch,)``.

        Args:
            next_ids: ``(batch,)`` the tokens just generated.
            started: ``(batch,)`` bool, the rows that had generated more than white space before.
        Returns:
            ``(ends, started)``, both ``(batch,)`` bool: the rows that end, and the rows that have now generated
            more than white space.
        """
        if self._tables is None or self._tables[0].device != next_ids.device:
            self._tables = self._build(next_ids.device)
        newline, text_then_newline, blank = self._tables
        ids = next_ids.clamp(max=newline.shape[0] - 1)  # ids past the tokenizer (padded embedding rows): no line
        known = next_ids < newline.shape[0]
        return known & newline[ids] & (started | text_then_newline[ids]), started | ~(known & blank[ids])


# one LineEnds per tokenizer: serving N deltas on one backbone decodes the vocabulary once, not N times; weak
# keys, so a tokenizer (and its tables) go when its last model does
_LINE_ENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def line_ends(tokenizer) -> LineEnds:
    """The ``LineEnds`` of ``tokenizer``, shared by every model built on it (its tables built on first use)."""
    if tokenizer not in _LINE_ENDS:
        _LINE_ENDS[tokenizer] = LineEnds(tokenizer)
    return _LINE_ENDS[tokenizer]


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    """Whether every row has ended; sharded, on every process (each must run every step: synced_gpus)."""
    if not synced:
        return bool(done.all())
    import torch.distributed as dist

    pending = torch.tensor(0.0 if bool(done.all()) else 1.0, device=done.device)
    dist.all_reduce(pending)
    return pending.item() == 0


@contextlib.contextmanager
def _gathered_root(model):
    """The root shard group (embeddings, head, soft prompt, prefix) gathered while generate runs: generate
    enters the backbone below the root's forward, which would otherwise gather it. The decoder layers
    gather themselves step by step."""
    # FSDP2 settles which module is its root on the first forward (lazy init); answering before any training
    # step (a run resumed at an epoch's end scores dev first) would make each decoder layer its own root, and
    # the next training step fail ("FSDP state has already been lazily initialized"). No public call does it.
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def next_token(model, inputs: dict, step: int, logits_processor=None) -> torch.Tensor:
    """The greedy next token of every row.

    Args:
        model: a ``PromptForGeneration``.
        inputs: the backbone's keyword arguments for this step (the whole prompts first, then one token).
        step: the number of tokens generated before this one.
        logits_processor: ``f(logits, step) -> logits`` on the ``(batch, vocab)`` logits, or None.
    Returns:
        ``(batch,)`` token ids.
    """
    logits = model.backbone(**inputs, logits_to_keep=1).logits[:, -1]
    if logits_processor is not None:
        logits = logits_processor(logits, step)
    return logits.argmax(dim=-1)


def greedy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           synced: bool = False, logits_processor=None,
           soft_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with a KV cache; call inside ``model.running()``.

    Args:
        model: a ``PromptForGeneration``.
        input_ids, attention_mask: ``(batch, seq_len)``, left padded.
        max_new_tokens: the most tokens generated per row.
        synced: sharded (FSDP): every process runs each step until every process's rows have ended.
        logits_processor: ``f(logits, step) -> logits`` on each step's ``(batch, vocab)`` logits, or None.
        soft_index: ``(batch, seq_len)``, where the template's ``{"soft"}`` tokens go (needed for a template with
            them): only the first pass, over the whole prompts, has such positions.
    Returns:
        ``(ids, lengths)``: ``(batch, steps)`` new token ids, ``steps <= max_new_tokens`` (a row that ended
        early holds pad after its last token), and ``(batch,)`` each row's own length: up to and including the
        token that ended it (eos, or with ``stop_at_newline`` the line break), else ``steps``.
    """
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    inputs = model.backbone_inputs(input_ids, attention_mask, use_cache=True, soft_index=soft_index)
    cache, mask = inputs[model.cache_arg], inputs["attention_mask"]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    started = torch.zeros_like(done)  # the row has generated more than white space
    # each row's length so far: it stops growing once the row ends (kept on the device: no sync per step)
    lengths = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    steps = []
    for step in range(max_new_tokens):
        chosen = next_token(model, inputs, step, logits_processor)
        next_ids = torch.where(done, pad, chosen)
        steps.append(next_ids)
        lengths += ~done
        done |= next_ids == eos
        if model.stop_at_newline:
            ends, started = model.line_ends(next_ids, started)
            done |= ends
        if _all_done(done, synced):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        inputs = {"input_ids": next_ids[:, None], "attention_mask": mask, "position_ids": positions(mask)[:, -1:],
                  "use_cache": True, model.cache_arg: cache}
    ids = torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)
    return ids, lengths


def decode_answer(model, ids: list[int]) -> str:
    """Generated ids as answer text: cut at the tokenizer's eos, special tokens dropped, stripped; with the
    model's ``stop_at_newline``, its first non-blank line."""
    eos = model.tokenizer.eos_token_id
    if eos in ids:
        ids = ids[:ids.index(eos)]
    text = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
    return text.split("\n", 1)[0].rstrip() if model.stop_at_newline else text


def generate_answers(model, batch, max_new_tokens: int | None = None, verbose: bool = False,
                     logits_processor=None, return_ids: bool = False):
    """Greedy answers for a left-padded batch; each row stops at its own eos.

    Args:
        model: a ``PromptForGeneration``.
        batch: ``input_ids`` and ``attention_mask`` ``(batch, seq_len)``, left padded (and ``soft_index`` for
            a template with ``{"soft"}`` tokens), as ``collate_for_generation`` builds them.
        max_new_tokens: the most answer tokens (default: the model's ``max_new_tokens``).
        verbose: log each answer.
        logits_processor: ``f(logits, step) -> logits`` applied to each step's ``(batch, vocab)`` logits
            before the argmax (OpenPrompt's ``generate`` uses it for ``min_length`` and ``bad_words_ids``).
        return_ids: also return each row's generated ids, up to and including the token that ended it (eos,
            or with ``stop_at_newline`` the line break).
    Returns:
        One answer string per row, special tokens removed and whitespace stripped; with ``return_ids``,
        ``(answers, ids)``.
    """
    sharded = is_sharded(model)
    # no_grad, not inference_mode, under FSDP2: the buffers it gathers layers into outlive this call and
    # training reuses them, which it cannot do with tensors made in inference mode
    no_grad = torch.no_grad() if sharded else torch.inference_mode()
    with no_grad, model.running(), _gathered_root(model) if sharded else contextlib.nullcontext():
        new_ids, lengths = greedy(model, batch["input_ids"].to(model.device),
                                  batch["attention_mask"].to(model.device), max_new_tokens or model.max_new_tokens,
                                  synced=sharded, logits_processor=logits_processor,
                                  soft_index=batch.get("soft_index"))
    # each row up to the token that ended it (eos or a line break), never the pad after it
    rows = [row[:n] for row, n in zip(new_ids.tolist(), lengths.tolist())]
    answers = [decode_answer(model, row) for row in rows]
    if verbose:
        for answer in answers:
            log.info("generated: %s", answer)
    return (answers, rows) if return_ids else answers


def answer_encoded(model, encoded: list, batch_size: int = 32, max_new_tokens: int | None = None,
                   return_ids: bool = False):
    """Answer prompts already rendered by ``model.wrapper.encode``, batched by length; ``encoded[i].index``
    must be ``i``.

    Returns:
        The answers in the order of ``encoded``; with ``return_ids``, ``(answers, ids)``.
    """
    answers: list[str] = [""] * len(encoded)
    ids: list[list[int]] = [[] for _ in encoded]
    for chunk in generation_batches(encoded, batch_size):
        batch = collate_for_generation(chunk, model.tokenizer.pad_token_id)
        texts, rows = model.generate_answers(batch, max_new_tokens, return_ids=True)
        for index, text, row in zip(batch["index"], texts, rows):
            answers[index], ids[index] = text, row
    return (answers, ids) if return_ids else answers


def encode_questions(model, questions: list[str]) -> list:
    """Raw question strings rendered through the model's template, ``index`` ``i`` for ``questions[i]``."""
    return [model.wrapper.encode(InputExample(guid=i, text_a=q), i) for i, q in enumerate(questions)]
