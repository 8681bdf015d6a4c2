"""OpenPrompt's ``GenerationVerbalizer``, ``PromptDataLoader`` and ``PromptForGeneration.generate`` on optqa.

A course script builds its batches with these: examples are rendered through the template and tokenised
once (with a progress bar); ``teacher_forcing=True`` gives training batches (prompt + target + eos, loss on
the target), otherwise prompts to answer. optqa pads each batch to its longest row and groups rows of similar
length when shuffling; ``pad_to_max_length=True`` gives OpenPrompt's padding of every row to ``max_seq_length``.
OpenPrompt's ``generate(batch, **generation_arguments)`` runs on optqa's greedy decoder (``optqa.generate``).
"""
from __future__ import annotations

import logging
import random
from typing import Iterator

import torch
from torch import nn

from optqa.data import (
    InputExample,
    LengthGroupedBatchSampler,
    LMTokenizerWrapper,
    collate_for_generation,
    collate_for_training,
)
from optqa.errors import OptqaError
from optqa.model import PromptForGeneration as _PromptModule
from optqa.template import ManualTemplate, parse_template, piece_text


class GenerationVerbalizer:
    """``GenerationVerbalizer(tokenizer, classes=None, num_classes=None, is_rule=False, label_words=None)``.

    The target text of an example is ``label_words[example.label]``; with ``is_rule=True`` that text is a rule
    in template syntax evaluated on the example, e.g. ``{0: ["{'meta':'answer'}"]}`` takes ``meta["answer"]``
    (text, ``{"placeholder":"text_a"}`` and ``{"meta":...}`` pieces, with ``post_processing``), the pieces
    joined as written (OpenPrompt put a space between every two pieces; a one-piece rule is the same). A list
    of label words uses its first entry, as OpenPrompt does. The examples are not modified (OpenPrompt wrote
    the target into ``tgt_text``); the loader's batches carry it as ``tgt_text``.

    Raises:
        OptqaError: no label words, a rule with a mask/soft/special piece, an example whose label has no words.
    """

    def __init__(self, tokenizer, classes=None, num_classes: int | None = None, is_rule: bool = False,
                 label_words: dict | list | None = None):
        if not label_words:
            raise OptqaError("GenerationVerbalizer needs label_words, e.g. {0: [\"{'meta':'answer'}\"]}")
        if isinstance(label_words, (list, tuple)):
            label_words = dict(enumerate(label_words))
        self.tokenizer = tokenizer
        self.classes = classes
        self.is_rule = is_rule
        self.label_words = {label: words[0] if isinstance(words, (list, tuple)) else words
                            for label, words in label_words.items()}
        self._rules = {}
        if is_rule:
            for label, words in self.label_words.items():
                pieces = parse_template(words, f"GenerationVerbalizer rule for label {label!r}", require_mask=False)
                wrong = [p for p in pieces if p.kind not in ("text", "placeholder", "meta")]
                if wrong:
                    raise OptqaError(f"GenerationVerbalizer rule {words!r}: a {wrong[0].kind} piece cannot be part "
                                     "of a target text (use text, placeholder and meta pieces)")
                self._rules[label] = pieces

    def target_text(self, example: InputExample) -> str:
        """The training target of ``example`` (stripped text)."""
        if example.label not in self.label_words:
            raise OptqaError(f"example {example.guid}: label {example.label!r} has no label words in the "
                             f"GenerationVerbalizer (it has {sorted(self.label_words, key=repr)})")
        if not self.is_rule:
            return str(self.label_words[example.label]).strip()
        return "".join(piece_text(p, example, "GenerationVerbalizer rule") for p in self._rules[example.label]).strip()


class PromptBatch(dict):
    """One batch: ``input_ids``, ``attention_mask``, ``soft_index`` (and ``labels`` when teacher forced) as
    tensors of shape ``(rows, width)``; ``tgt_text`` (each row's target text, str or None), ``golds`` (each
    row's gold answers, a list), ``guid`` and ``index`` (position in the loader's dataset) as lists."""

    def to(self, device) -> "PromptBatch":
        """Move the tensors to ``device`` in place; returns the batch (``batch = batch.to(device)``)."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self

    def cuda(self, device=None) -> "PromptBatch":
        return self.to(device if device is not None else "cuda")


def _gold_list(example: InputExample) -> list[str]:
    value = example.tgt_text
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


class PromptDataLoader:
    """OpenPrompt's ``PromptDataLoader(dataset, template, tokenizer_wrapper=None, tokenizer=None,
    tokenizer_wrapper_class=None, verbalizer=None, max_seq_length=512, batch_size=1, shuffle=False,
    teacher_forcing=False, decoder_max_length=-1, predict_eos_token=False, truncate_method="tail",
    drop_last=False)``; iterate it for :class:`PromptBatch` es.

    Args:
        dataset: InputExamples. The target of each (``teacher_forcing``) is ``verbalizer.target_text(example)``
            when a verbalizer is given, else ``tgt_text`` (a string, or the first of a list).
        template: the ManualTemplate / MixedTemplate / PrefixTuningTemplate rendering each example.
        tokenizer_wrapper_class: what ``load_plm`` returned (``LMTokenizerWrapper``); or pass ``tokenizer_wrapper``.
        max_seq_length: tokens per example, bos + prompt + target + eos; longer questions are cut at their
            end (``truncate_method="tail"``, the only method).
        teacher_forcing: True: right-padded training rows with ``labels`` (-100 outside the target);
            False: left-padded prompts for ``PromptForGeneration.generate``.
        predict_eos_token: accepted; optqa always trains the eos after the target, so that answers stop.
        decoder_max_length: accepted; it only applies to encoder-decoder models.
        shuffle: a new random order every epoch (each ``iter``), seeded by ``seed``.
        pad_to_max_length: OpenPrompt's padding of every row to ``max_seq_length`` (and no length grouping);
            off by default: optqa pads to the batch's longest row.
        group_by_length: batch rows of similar length, in a random batch order that changes every epoch
            (optqa's padding saver). None (default): with ``shuffle=True``; a loader without shuffle keeps the
            dataset's order, as OpenPrompt's does, so answers line up with the dataset.
        seed: seed of the shuffled order.

    Raises:
        OptqaError: an unknown tokenizer wrapper or truncate method, an example without a target when teacher
            forcing, a bad template or rule.
    """

    def __init__(self, dataset, template, tokenizer_wrapper: LMTokenizerWrapper | None = None, tokenizer=None,
                 tokenizer_wrapper_class=None, verbalizer: GenerationVerbalizer | None = None,
                 max_seq_length: int = 512, batch_size: int = 1, shuffle: bool = False, teacher_forcing: bool = False,
                 decoder_max_length: int = -1, predict_eos_token: bool = False, truncate_method: str = "tail",
                 drop_last: bool = False, pad_to_max_length: bool = False, group_by_length: bool | None = None,
                 seed: int = 0):
        if truncate_method != "tail":
            raise OptqaError(f"PromptDataLoader: truncate_method {truncate_method!r} is not supported; optqa cuts "
                             "the end of the question ('tail') and never the template text or the target")
        if tokenizer_wrapper is None:
            wrapper_class = tokenizer_wrapper_class or LMTokenizerWrapper
            if not (isinstance(wrapper_class, type) and issubclass(wrapper_class, LMTokenizerWrapper)):
                raise OptqaError(f"PromptDataLoader: tokenizer_wrapper_class {wrapper_class!r} is not optqa's "
                                 "LMTokenizerWrapper (pass the WrapperClass that optqa's load_plm returned)")
            tokenizer_wrapper = wrapper_class(tokenizer or template.tokenizer, template, max_seq_length)
        self.wrapper = tokenizer_wrapper
        self.examples = list(dataset)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.teacher_forcing = teacher_forcing
        self.drop_last = drop_last
        self.pad_to_max_length = pad_to_max_length
        self.seed = seed
        self.epoch = 0
        self.tgt_text: list[str | None] = []
        for example in self.examples:
            if verbalizer is not None:
                self.tgt_text.append(verbalizer.target_text(example))
            else:
                golds = _gold_list(example)
                self.tgt_text.append(golds[0] if golds else None)
        if teacher_forcing:
            missing = [e.guid for e, text in zip(self.examples, self.tgt_text) if not text]
            if missing:
                raise OptqaError(f"PromptDataLoader(teacher_forcing=True): example {missing[0]} has no target text "
                                 "(give it tgt_text, or pass a GenerationVerbalizer)")
        # tokenised once, here, with the bar OpenPrompt users know
        self.encoded = self.wrapper.encode_all(self.examples, list(self.tgt_text) if teacher_forcing else None,
                                               desc="tokenizing", progress=True)
        lengths = [len(e) for e in self.encoded]
        grouped = (shuffle if group_by_length is None else group_by_length) and not pad_to_max_length
        self.sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=seed, shuffle=shuffle,
                                                 group_by_length=grouped)

    def _batches(self) -> list[list[int]]:
        self.sampler.set_epoch(self.epoch)
        if self.pad_to_max_length:  # OpenPrompt's order: the dataset's, or a fresh permutation per epoch
            order = list(range(len(self.encoded)))
            if self.shuffle:
                random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
            batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        else:
            batches = list(self.sampler)
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.encoded) // self.batch_size
        return (len(self.encoded) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[PromptBatch]:
        batches = self._batches()
        self.epoch += 1
        pad = self.wrapper.tokenizer.pad_token_id
        width = self.wrapper.max_seq_length if self.pad_to_max_length else None
        for rows in batches:
            chunk = [self.encoded[i] for i in rows]
            collate = collate_for_training if self.teacher_forcing else collate_for_generation
            batch = PromptBatch(collate(chunk, pad, width=width))
            batch["index"] = [e.index for e in chunk]
            batch["guid"] = [e.guid for e in chunk]
            batch["tgt_text"] = [self.tgt_text[e.index] for e in chunk]
            batch["golds"] = [_gold_list(self.examples[e.index]) for e in chunk]
            yield batch


class MixedTemplate(ManualTemplate):
    """OpenPrompt's ``MixedTemplate(model, tokenizer, text=...)``: hard text with ``{"soft"}`` pieces.

    It is a ManualTemplate whose soft pieces take their initial embeddings from ``model``'s input embedding
    (``{"soft":"words"}``: one trainable vector per token of the words; ``{"soft"}``: one vector copied from a
    random vocabulary row). The vectors are ``template.parameters()``: train them with the delta
    (``AdamW([*delta_model.parameters(), *template.parameters()])``); ``save_finetuned`` saves them with it.

    Args:
        model: the backbone from ``load_plm`` (with or without a delta attached).
        tokenizer: its tokenizer.
        text: template text; the ``{"mask"}`` comes last.
        placeholder_mapping: None or OpenPrompt's default (another mapping is refused).

    Raises:
        OptqaError: a malformed template, or OpenPrompt keys optqa's parser lacks (``soft_id``, ``duplicate``).
    """

    def __init__(self, model: nn.Module, tokenizer, text: str | None = None, placeholder_mapping: dict | None = None):
        super().__init__(tokenizer, text=text, placeholder_mapping=placeholder_mapping, source="MixedTemplate",
                         embedding=model.get_input_embeddings())


class PrefixTuningTemplate(ManualTemplate):
    """OpenPrompt's ``PrefixTuningTemplate(model, tokenizer, text=..., num_token=5)``, on optqa's prefix delta.

    OpenPrompt's template owns trainable key/value prefixes for every layer; optqa's ``prefix`` delta (PEFT's
    prefix tuning) is exactly that, so this attaches ``AutoDeltaConfig.from_dict({"delta_type": "prefix",
    "prefix_token_num": num_token})`` to ``model`` and renders ``text`` like a ManualTemplate. The delta is
    ``template.delta_model`` (train ``template.delta_model.parameters()``, save it with ``save_finetuned``).
    The prefixes are trained directly: OpenPrompt's reparametrisation MLP (``mid_dim``) is a training aid that
    is not part of the saved result, and optqa does not build it.

    Raises:
        OptqaError: ``prefix_dropout`` other than 0 or a ``mapping_hook`` (not supported), a backbone that
            already carries a delta.
    """

    def __init__(self, model: nn.Module, tokenizer, mapping_hook=None, text: str | None = None, num_token: int = 5,
                 placeholder_mapping: dict | None = None, prefix_dropout: float = 0.0, mid_dim: int = 512,
                 using_encoder_past_key_values: bool = True, using_decoder_past_key_values: bool = True):
        from optqa.compat.opendelta import AutoDeltaModel

        if mapping_hook is not None or prefix_dropout:
            raise OptqaError("PrefixTuningTemplate: mapping_hook and prefix_dropout are not supported (optqa's "
                             "prefix delta trains the key/value prefixes directly)")
        super().__init__(tokenizer, text=text or '{"placeholder":"text_a"} {"mask"}', source="PrefixTuningTemplate",
                         placeholder_mapping=placeholder_mapping, embedding=model.get_input_embeddings())
        self.__dict__["delta_model"] = AutoDeltaModel.from_config(
            {"delta_type": "prefix", "prefix_token_num": num_token}, backbone_model=model, tokenizer=tokenizer)


def _refused_template(name: str, instead: str) -> type:
    def __init__(self, *args, **kwargs):
        raise OptqaError(f"OpenPrompt's {name} is not part of optqa; use {instead}")

    return type(name, (), {"__init__": __init__, "__doc__": f"Refused with one line: use {instead}."})


SoftTemplate = _refused_template(
    "SoftTemplate", 'MixedTemplate with {"soft"} pieces, or AutoDeltaConfig.from_dict({"delta_type": "soft_prompt"})')


PtuningTemplate = _refused_template(
    "PtuningTemplate", 'MixedTemplate with {"soft"} pieces (trained directly, without the LSTM/MLP prompt encoder)')


SoftManualTemplate = _refused_template("SoftManualTemplate", 'MixedTemplate with {"soft":"words"} pieces')


PTRTemplate = _refused_template("PTRTemplate", "ManualTemplate (PTR's sub-prompts are for classification)")


log = logging.getLogger(__name__)

# OpenPrompt generation arguments that change nothing in greedy decoding (sampling and beam settings, and
# output plumbing); the ones here with the greedy value are accepted, any other value is refused
IGNORED_IN_GREEDY = {"temperature", "top_k", "top_p", "length_penalty", "early_stopping", "pad_token_id",
                     "use_cache", "output_scores", "typical_p"}
GREEDY_EQUIVALENT = {"num_beams": 1, "do_sample": False, "num_return_sequences": 1, "repetition_penalty": 1.0,
                     "no_repeat_ngram_size": 0, "num_beam_groups": 1}
_TAKEN = ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "eos_token_id", "bad_words_ids")


def _greedy_settings(generation_arguments: dict) -> dict:
    """The arguments greedy decoding acts on (``_TAKEN``, None where not given), the others checked.

    Raises:
        OptqaError: an unknown argument, or one asking for more than greedy decoding (beams, sampling, several
            sequences, repetition penalties, multi-token ``bad_words_ids``).
    """
    args = {k: v for k, v in generation_arguments.items() if k not in IGNORED_IN_GREEDY}
    taken = {k: args.pop(k, None) for k in _TAKEN}
    unknown = sorted(set(args) - set(GREEDY_EQUIVALENT))
    if unknown:
        raise OptqaError(f"generate does not take {', '.join(unknown)} (it takes max_length, max_new_tokens, "
                         "min_length, min_new_tokens, eos_token_id, bad_words_ids, "
                         f"{', '.join(sorted(IGNORED_IN_GREEDY | set(GREEDY_EQUIVALENT)))})")
    unsupported = [f"{k}={v!r}" for k, v in args.items() if GREEDY_EQUIVALENT[k] != v]
    if unsupported or any(len(words) != 1 for words in taken["bad_words_ids"] or []):
        what = ", ".join(unsupported) or "bad_words_ids with sequences longer than one token"
        raise OptqaError(f"generate: optqa answers greedily; {what} is not supported (use num_beams=1, "
                         "do_sample=False, repetition_penalty=1.0, single-token bad_words_ids)")
    return taken


def _budgets(lengths: torch.Tensor, settings: dict, default: int) -> list[int]:
    """Answer tokens each row may have: ``max_new_tokens`` (taking precedence, as in transformers), else what
    ``max_length`` leaves after the row's own prompt of ``lengths`` tokens, else ``default``."""
    if settings["max_new_tokens"] is not None:
        return [settings["max_new_tokens"]] * len(lengths)
    if settings["max_length"] is not None:
        return (settings["max_length"] - lengths).clamp(min=0).tolist()
    return [default] * len(lengths)


def _logits_processor(lengths: torch.Tensor, settings: dict, held: list[int], banned: list[int]):
    """``f(logits, step) -> logits`` that never picks a ``banned`` token and holds back the ``held`` ones (eos)
    before ``min_length``/``min_new_tokens``; None where neither applies."""
    min_length, min_new_tokens = settings["min_length"] or 0, settings["min_new_tokens"] or 0
    if not (banned or min_length or min_new_tokens):
        return None

    def process(logits: torch.Tensor, step: int) -> torch.Tensor:
        if banned:
            logits[:, banned] = float("-inf")
        # OpenPrompt's min_length counts each example's own prompt (one example at a time)
        hold = (lengths.to(logits.device) + step < min_length) | (step < min_new_tokens)
        logits[:, held] = torch.where(hold[:, None], float("-inf"), logits[:, held])
        return logits

    return process


def generate(model: _PromptModule, batch, verbose: bool = False,
             **generation_arguments) -> tuple[list[list[int]], list[str]]:
    """OpenPrompt's ``output_ids, output_sentences = prompt_model.generate(batch, verbose=False, **args)``.

    The whole batch is answered at once by optqa's greedy decoder (OpenPrompt answered decoder-only
    batches one example at a time); every row gets the answer it would get alone.

    Args:
        model: an optqa ``PromptForGeneration``.
        batch: from ``PromptDataLoader(..., teacher_forcing=False)`` (left-padded prompts).
        verbose: log each generated sentence.
        generation_arguments: OpenPrompt's. ``max_length`` counts prompt plus answer tokens of each row, as
            OpenPrompt counts them; ``max_new_tokens`` (taking precedence, as in transformers) the answer
            alone; neither: the model's ``max_new_tokens``. ``min_length`` (counted like ``max_length``) and
            ``min_new_tokens`` hold back eos; ``eos_token_id`` (int or list) also ends an answer (the text
            keeps that token, as OpenPrompt's does); single-token ``bad_words_ids`` are never generated.
            Settings that only act in sampling or beam search (``temperature``, ``top_k``, ``top_p``,
            ``length_penalty``, ``early_stopping``) change nothing in greedy decoding and are accepted.

    Returns:
        ``(output_ids, output_sentences)``: per row, the prompt's ids without padding followed by the
        generated ids up to and including the token it stopped at (``list[list[int]]``), and the answer
        text (cut at eos, stripped).

    Raises:
        OptqaError: a teacher-forced batch; beam search, sampling, several sequences, repetition
            penalties, multi-token ``bad_words_ids`` or an unknown argument (optqa answers greedily).
    """
    if "labels" in batch:
        raise OptqaError("generate answers prompts: use a PromptDataLoader with teacher_forcing=False (this batch "
                         "holds the answers)")
    settings = _greedy_settings(generation_arguments)
    lengths = batch["attention_mask"].sum(dim=1)
    budgets = _budgets(lengths, settings, model.max_new_tokens)
    eos_ids = settings["eos_token_id"]
    stops = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    banned = sorted({words[0] for words in settings["bad_words_ids"] or []})
    process = _logits_processor(lengths, settings, sorted({model.tokenizer.eos_token_id, *stops}), banned)
    generated: list[list[int]] = [[] for _ in budgets]
    if max(budgets) > 0:
        _, generated = model.generate_answers(batch, max(budgets), logits_processor=process, return_ids=True)
    output_ids, sentences = [], []
    for i, (budget, new) in enumerate(zip(budgets, generated)):
        new = new[:budget]  # a row with a longer prompt has less of max_length left
        new = new[:next((j + 1 for j, token in enumerate(new) if token in stops), len(new))]
        output_ids.append(batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist() + new)
        sentences.append(model.decode_answer(new))
    if verbose:
        for sentence in sentences:
            log.info("generated: %s", sentence)
    return output_ids, sentences


class PromptForGeneration(_PromptModule):
    """OpenPrompt's ``PromptForGeneration(plm, template, freeze_plm=True, plm_eval_mode=False, tokenizer=None)``:
    optqa's ``optqa.model.PromptForGeneration`` (the module, its loss and ``answer``) with OpenPrompt's
    ``generate(batch, verbose=False, **generation_arguments)``. ``from optqa import PromptForGeneration`` is this."""

    def generate(self, batch, verbose: bool = False, **generation_arguments) -> tuple[list[list[int]], list[str]]:
        """OpenPrompt's generate: ``optqa.compat.openprompt.generate(self, batch, verbose, **arguments)``."""
        return generate(self, batch, verbose, **generation_arguments)
