"""OpenPrompt's PromptForGeneration for decoder-only models: loss on the answer, batched greedy answers."""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import nn

from optqa.config import REGISTRY
from optqa.data import IGNORE_INDEX, InputExample, LMTokenizerWrapper, collate_for_generation, generation_batches
from optqa.deltas import PEFT_PROMPT_LEARNING, DeltaModel, _whole, attached_delta, is_delta_parameter, load_delta_state
from optqa.families import cache_argument as _cache_argument
from optqa.families import kv_layout
from optqa.families import new_cache as _new_cache
from optqa.hardware import is_sharded

log = logging.getLogger(__name__)


def _linear_with_cast_weight(module: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(hidden, module.__dict__["_optqa_weight"], module.bias)


def _cast_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``, made once and kept on the tensor: every model whose head is tied to the same
    embedding (the deltas ``--mode serve`` puts on one backbone) shares the one copy instead of 77 MB each on
    OPT-125m. An in-place change of the weight (its ``_version``) makes a fresh copy."""
    cached = weight.__dict__.get("_optqa_cast")
    if cached is None or cached[0] != (dtype, weight._version):
        cached = ((dtype, weight._version), weight.detach().to(dtype))
        weight.__dict__["_optqa_cast"] = cached
    return cached[1]


def _virtual_kind(model: nn.Module) -> str | None:
    """The prompt-learning delta type (``"soft_prompt"``, ``"prefix"``) of a PEFT prompt-learning model (optqa's
    or one loaded with ``PeftModel.from_pretrained``), else None."""
    if not hasattr(model, "prompt_encoder"):
        return None
    from optqa.errors import OptqaError

    peft_type = str(model.peft_config[model.active_adapter].peft_type).rsplit(".", 1)[-1]
    kinds = {peft: kind for kind, peft in PEFT_PROMPT_LEARNING.items()}
    if peft_type not in kinds:
        raise OptqaError(f"PEFT {peft_type} is not supported (prompt learning: prompt tuning and prefix tuning)")
    return kinds[peft_type]


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


class PromptForGeneration(nn.Module):
    """``PromptForGeneration(plm, template, tokenizer=tokenizer)``.

    ``plm`` is the backbone as returned by ``load_plm``; if a delta was attached to it with
    ``AutoDeltaModel.from_config(..., backbone_model=plm)`` (found with ``optqa.deltas.attached_delta``), the delta's
    model is what runs. Two attributes, named as OpenPrompt and the checkpoint keys name them: ``backbone`` is the
    transformers model itself, ``plm`` the module that runs (PEFT's wrapper around ``backbone`` for lora,
    soft_prompt and prefix; ``backbone`` itself for adapter and bitfit, which modify it in place).
    ``forward(batch)`` returns the mean cross-entropy over the answer tokens (and eos) only, with
    teacher forcing; ``generate(batch, **generation_arguments)`` returns OpenPrompt's ``(output_ids,
    output_sentences)``; ``generate_answers(batch)`` and ``answer(questions)`` return answer strings.
    """

    def __init__(self, plm: nn.Module, template, freeze_plm: bool = True, plm_eval_mode: bool = False,
                 gen_config=None, tokenizer=None, max_seq_length: int = 128, max_new_tokens: int = 32,
                 stop_at_newline: bool = True):
        super().__init__()
        if gen_config is not None:
            from optqa.errors import OptqaError

            raise OptqaError("PromptForGeneration: gen_config is not supported; pass generation arguments to "
                             "generate(batch, max_length=..., ...) or max_new_tokens= here")
        self.plm_eval_mode = plm_eval_mode
        self.delta: DeltaModel | None = attached_delta(plm)
        # the transformers model itself, also when a PeftModel made elsewhere is passed in; registered before
        # ``plm`` so that parameter names (and so checkpoint keys) start with "backbone."
        self.backbone = plm.get_base_model() if hasattr(plm, "get_base_model") else plm
        self.plm = self.delta.model if self.delta else plm
        self.template = template
        self.tokenizer = tokenizer or template.tokenizer
        self.wrapper = LMTokenizerWrapper(self.tokenizer, template, max_seq_length)
        self.max_new_tokens = max_new_tokens
        # an answer is one line: a prompt with worked examples (few-shot) otherwise runs on into the next question
        self.stop_at_newline = stop_at_newline
        self._line_tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # the blocks FSDP shards one by one (accelerate reads this name), e.g. OPTDecoderLayer
        self._no_split_modules = list(getattr(plm, "_no_split_modules", None) or [])
        self._autocast_dtype: torch.dtype | None = None
        self._weights_dtype = torch.float32  # what the frozen Linear weights are stored in now
        self._cast_heads: list[nn.Linear] = []
        # "int8" while optqa.quantize routes the frozen Linear layers through int8 kernels (answering only)
        self.quantization = "none"
        if freeze_plm:
            for name, param in self.named_parameters():
                param.requires_grad_(is_delta_parameter(name))
        self._soft_index: torch.Tensor | None = None
        if template.num_soft_tokens:
            plm.get_input_embeddings().register_forward_hook(self._substitute_soft_embeddings)
        # soft prompts and prefixes are applied here, not by PEFT's generation glue, which broke when
        # transformers 5.24 renamed the cache argument; PEFT still holds their parameters (its layout and export)
        self._virtual = _virtual_kind(self.plm)
        # where its virtual tokens go: "inputs" (embeddings before the prompt's) or "cache" (every layer's keys and
        # values), as its registry entry says
        self._virtual_place = REGISTRY[self._virtual].virtual_place if self._virtual else None
        self._cache_arg = _cache_argument(self.backbone)
        if self.delta is not None:  # save_finetuned then saves this template's soft tokens and text too
            self.delta.bind(self)

    def train(self, mode: bool = True) -> "PromptForGeneration":
        """``nn.Module.train``; with ``plm_eval_mode`` (OpenPrompt's) the language model stays in eval mode, so
        its dropout is off while the delta trains."""
        super().train(mode)
        if self.plm_eval_mode:
            self.plm.eval()
        return self

    def tie_weights(self, *args, **kwargs) -> None:
        """The backbone's own ties (OPT's head is its input embedding). accelerate re-ties through this after
        moving the model to the meta device (``accelerate launch --use_fsdp``, CPU-RAM-efficient loading):
        without it the head became a second, untied copy."""
        self.backbone.tie_weights(*args, **kwargs)

    # the state that belongs to the delta (and the template's soft tokens), by the shared predicate
    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole delta tensors; under FSDP the shards are gathered, so every process must call this."""
        return {n: _whole(p) for n, p in self.named_parameters() if is_delta_parameter(n)}

    def num_trainable_parameters(self) -> int:
        """How many delta parameters (including a template's soft tokens) this model trains."""
        return sum(p.numel() for n, p in self.named_parameters() if is_delta_parameter(n))

    def load_delta_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy delta weights in; a missing, unexpected or mis-shaped key is an error, never skipped."""
        load_delta_state(self, state, source)

    def _substitute_soft_embeddings(self, module, inputs, output):
        index = self._soft_index
        # only the pass over the whole prompt carries soft positions; cached decoding steps are shorter
        if index is None or output.shape[:2] != index.shape:
            return output
        mask = (index >= 0).unsqueeze(-1)
        soft = self.template.soft_embeds[index.clamp(min=0)].to(output.dtype)
        return torch.where(mask, soft, output)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16/fp16 autocast for every forward pass and generation; None: plain fp32."""
        return self._autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, dtype: torch.dtype | None) -> None:
        # the frozen weights follow on the next run, not now: a LoRA merge done after choosing the precision
        # (quantize.prepare_for_answering) is then still computed on fp32 weights
        if dtype is not None and self.quantization != "none":
            from optqa.errors import OptqaError

            raise OptqaError(f"an {self.quantization} backbone computes around its int8 matmuls in fp32; "
                             f"{dtype} autocast does not apply to it")
        self._autocast_dtype = dtype

    # the first cast may happen while answering, inside generate_answers' inference_mode: tensors made there
    # are inference tensors, which a later training step cannot save for backward (a run resumed at an
    # epoch's end scores dev before its next step); made here, outside it, they serve both
    @torch.inference_mode(False)
    def _store_frozen_weights_as(self, dtype: torch.dtype) -> None:
        """Keep the frozen Linear weights in the autocast dtype.

        Autocast casts a Linear's weight to bf16 on every call and caches only weights that require grad, so
        a frozen 125M-parameter backbone was copied in full on every forward pass and on every generated
        token (a third of a training step on OPT-125m; a single question's answer was slower in bf16 than
        in fp32). Casting once gives the matmuls the very same bf16 values; LayerNorm, the input embedding
        and every delta parameter stay fp32. Back to fp32, the weights keep their bf16 rounding.
        """
        embedding = self.backbone.get_input_embeddings().weight
        for module in self._cast_heads:
            del module.forward, module.__dict__["_optqa_weight"]
        self._cast_heads = []
        for module in self.plm.modules():
            # an int8 Linear (optqa.quantize) computes with its own packed copy, never with this weight
            if not isinstance(module, nn.Linear) or "_optqa_int8" in module.__dict__:
                continue
            if module.weight is embedding:
                if dtype != torch.float32:
                    # a head tied to the input embedding (which stays fp32) computes with its own cast copy;
                    # the tie, the state dict and the backbone fingerprint stay as they are
                    module.__dict__["_optqa_weight"] = _cast_copy(embedding, dtype)
                    module.forward = functools.partial(_linear_with_cast_weight, module)
                    self._cast_heads.append(module)
                continue
            for tensor in (module.weight, module.bias):
                if tensor is not None and not tensor.requires_grad and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)
        self._weights_dtype = dtype

    @contextlib.contextmanager
    def _running(self, batch):
        wanted = self._autocast_dtype or torch.float32
        # sharded weights are gathered for each block anew, in accelerate's FSDP mixed-precision dtype on a GPU
        if wanted != self._weights_dtype and not is_sharded(self):
            self._store_frozen_weights_as(wanted)
        self._soft_index = batch.get("soft_index") if self.template.num_soft_tokens else None
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        try:
            with autocast:
                yield
        finally:
            self._soft_index = None

    @property
    def device(self) -> torch.device:
        """The device of the backbone's parameters."""
        return next(self.plm.parameters()).device

    def loss_terms(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed token loss and the number of answer tokens, so several processes can average exactly.

        Args:
            batch: as for ``forward``.
        Returns:
            ``(loss_sum, tokens)``: two scalars; the logits are computed only from the first answer position on.
        """
        input_ids, labels = batch["input_ids"], batch["labels"]
        width = input_ids.shape[1]
        first_target = int((labels != IGNORE_INDEX).int().argmax(dim=1).min())
        # the vocabulary projection is only needed where an answer token is predicted
        keep = width - first_target + 1
        with self._running(batch):
            out = self.backbone(**self._backbone_inputs(input_ids, batch["attention_mask"], use_cache=False),
                                logits_to_keep=keep)
        logits = out.logits[:, -keep:-1].float()
        targets = labels[:, first_target:]
        loss_sum = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, (targets != IGNORE_INDEX).sum()

    def forward(self, batch) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens (and eos) of ``batch``, with teacher forcing.

        Args:
            batch: ``input_ids``, ``attention_mask`` and ``labels`` ``(batch, seq_len)`` (``IGNORE_INDEX`` on prompt
                and padding positions), as ``collate_for_training`` builds them.
        Returns:
            A scalar: the summed token loss divided by the number of answer tokens.
        """
        loss_sum, count = self.loss_terms(batch)
        return loss_sum / count.clamp(min=1)

    def _virtual_weight(self) -> torch.Tensor:
        """PEFT's prompt-encoder table: ``(num_virtual_tokens, width)``; width is the input embedding's for a
        soft prompt, ``layers * 2 * hidden`` for a prefix (PEFT's layout, kept so its export stays exact)."""
        return self.plm.prompt_encoder[self.plm.active_adapter].embedding.weight

    def _prefix_cache(self, batch_size: int):
        """A fresh KV cache holding the prefix: per layer, keys and values of shape
        ``(batch, kv_heads, num_virtual_tokens, head_dim)`` (the cache's key/value heads, fewer than the attention
        heads under grouped-query attention: ``optqa.families.kv_layout``), taken from the table as PEFT's
        ``get_prompt`` lays it out (Li & Liang, 2021, "Prefix-Tuning", https://arxiv.org/abs/2101.00190)."""
        config = self.backbone.config
        weight = self._virtual_weight()
        layers, kv_heads, head_dim = kv_layout(config)
        n = weight.shape[0]
        table = weight.view(n, 2 * layers, kv_heads, head_dim).permute(1, 2, 0, 3)  # (2 * layers, kv_heads, n, hd)
        cache = _new_cache(config)
        for layer in range(layers):
            keys, values = table[2 * layer], table[2 * layer + 1]
            cache.update(keys.unsqueeze(0).expand(batch_size, -1, -1, -1),
                         values.unsqueeze(0).expand(batch_size, -1, -1, -1), layer)
        return cache

    def _backbone_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool) -> dict:
        """Keyword arguments for the backbone's forward pass over whole prompts.

        A soft prompt (Lester et al., 2021, https://arxiv.org/abs/2104.08691) is prepended to the token
        embeddings; a prefix goes into a fresh KV cache ahead of the prompt. Either way the attention mask
        gains ``num_virtual_tokens`` leading ones. Positions are passed, counted along that mask
        (``positions``): OPT counts them so itself, but the other families count them from the cache's start, so
        a left-padded row would see other positions than the same prompt alone: GPT-2's learned absolute
        positions then change its answers (tests/test_families.py); rotary families (Llama, Qwen, Gemma,
        Mistral, Phi-3, GPT-NeoX) see only relative positions in attention, so there only the rounding moves.

        Args:
            input_ids: ``(batch, seq_len)`` token ids, left padded.
            attention_mask: ``(batch, seq_len)``, 0 on padding.
            use_cache: return a KV cache to decode with (always, for a prefix: it lives in the cache).
        Returns:
            ``input_ids`` or ``inputs_embeds``, ``attention_mask``, ``position_ids``, ``use_cache`` and, where a
            cache is used, the cache under this transformers' argument name.
        """
        batch = input_ids.shape[0]
        inputs: dict = {"use_cache": use_cache or self._virtual_place == "cache"}
        if self._virtual_place == "inputs":
            embeds = self.backbone.get_input_embeddings()(input_ids)
            prompt = self._virtual_weight().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            inputs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        else:
            inputs["input_ids"] = input_ids
        if self._virtual:
            ones = attention_mask.new_ones(batch, self._virtual_weight().shape[0])
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        inputs["attention_mask"] = attention_mask
        # a prefix's positions are in the cache already: the prompt's follow them
        width = inputs["inputs_embeds" if "inputs_embeds" in inputs else "input_ids"].shape[1]
        inputs["position_ids"] = positions(attention_mask)[:, -width:]
        if inputs["use_cache"]:
            inputs[self._cache_arg] = (self._prefix_cache(batch) if self._virtual_place == "cache"
                                       else _new_cache(self.backbone.config))
        return inputs

    def _greedy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                synced: bool = False, logits_processor=None) -> torch.Tensor:
        """Greedy decoding with a KV cache, owned here so no transformers generation internals are involved.

        Args:
            input_ids, attention_mask: ``(batch, seq_len)``, left padded.
            max_new_tokens: the most tokens generated per row.
            synced: sharded (FSDP): every process runs each step until every process's rows have ended.
            logits_processor: ``f(logits, step) -> logits`` on each step's ``(batch, vocab)`` logits, or None.
        Returns:
            ``(batch, steps)`` new token ids, ``steps <= max_new_tokens``; a row that ended holds eos then pad.
        """
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        inputs = self._backbone_inputs(input_ids, attention_mask, use_cache=True)
        cache, mask = inputs[self._cache_arg], inputs["attention_mask"]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        started = torch.zeros_like(done)  # the row has generated more than white space
        steps = []
        for step in range(max_new_tokens):
            logits = self.backbone(**inputs, logits_to_keep=1).logits[:, -1]
            if logits_processor is not None:
                logits = logits_processor(logits, step)
            self._soft_index = None  # {"soft"} positions exist only in the pass over the whole prompt
            next_ids = torch.where(done, pad, logits.argmax(dim=-1))
            steps.append(next_ids)
            done |= next_ids == eos
            if self.stop_at_newline:
                ends, started = self._ends_line(next_ids, started)
                done |= ends
            if _all_done(done, synced):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            inputs = {"input_ids": next_ids[:, None], "attention_mask": mask, "position_ids": positions(mask)[:, -1:],
                      "use_cache": True, self._cache_arg: cache}
        return torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)

    def _ends_line(self, next_ids: torch.Tensor, started: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which rows end their answer with ``next_ids`` ``(batch,)``: a token holding a line break after some text
        (leading blank lines do not end an answer). The per-token tables are built once, from the vocabulary.

        Returns:
            ``(ends, started)``, both ``(batch,)`` bool: the rows that end, and the rows that have now generated
            more than white space.
        """
        if self._line_tokens is None or self._line_tokens[0].device != next_ids.device:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            tables = [[("\n" in t), bool(t.split("\n", 1)[0].strip()) and "\n" in t, not t.strip()] for t in texts]
            self._line_tokens = tuple(torch.tensor(column, dtype=torch.bool, device=next_ids.device)
                                      for column in zip(*tables))
        newline, text_then_newline, blank = self._line_tokens
        ids = next_ids.clamp(max=newline.shape[0] - 1)  # ids past the tokenizer (padded embedding rows): no line
        known = next_ids < newline.shape[0]
        return known & newline[ids] & (started | text_then_newline[ids]), started | ~(known & blank[ids])

    def generate_answers(self, batch, max_new_tokens: int | None = None, verbose: bool = False,
                         logits_processor=None, return_ids: bool = False):
        """Greedy answers for a left-padded batch; each row stops at its own eos.

        Args:
            batch: ``input_ids`` and ``attention_mask`` ``(batch, seq_len)``, left padded (and ``soft_index`` for
                a template with ``{"soft"}`` tokens), as ``collate_for_generation`` builds them.
            max_new_tokens: the most answer tokens (default: the model's ``max_new_tokens``).
            verbose: log each answer.
            logits_processor: ``f(logits, step) -> logits`` applied to each step's ``(batch, vocab)`` logits
                before the argmax (``generate`` uses it for OpenPrompt's ``min_length`` and ``bad_words_ids``).
            return_ids: also return each row's generated ids, up to and including its eos.
        Returns:
            One answer string per row, special tokens removed and whitespace stripped; with ``return_ids``,
            ``(answers, ids)``.
        """
        eos = self.tokenizer.eos_token_id
        input_ids = batch["input_ids"].to(self.device)
        sharded = is_sharded(self)
        # no_grad, not inference_mode, under FSDP2: the buffers it gathers layers into outlive this call and
        # training reuses them, which it cannot do with tensors made in inference mode
        no_grad = torch.no_grad() if sharded else torch.inference_mode()
        with no_grad, self._running(batch), _gathered_root(self) if sharded else contextlib.nullcontext():
            new_ids = self._greedy(input_ids, batch["attention_mask"].to(self.device),
                                   max_new_tokens or self.max_new_tokens, synced=sharded,
                                   logits_processor=logits_processor)
        rows = [row[:row.index(eos) + 1] if eos in row else row for row in new_ids.tolist()]
        answers = [self.decode_answer(row) for row in rows]
        if verbose:
            for answer in answers:
                log.info("generated: %s", answer)
        return (answers, rows) if return_ids else answers

    def decode_answer(self, ids: list[int]) -> str:
        """Generated ids as answer text: cut at the tokenizer's eos, special tokens dropped, stripped; with
        ``stop_at_newline``, its first non-blank line."""
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[:ids.index(eos)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return text.split("\n", 1)[0].rstrip() if self.stop_at_newline else text

    def answer(self, questions: list[str], batch_size: int = 32, max_new_tokens: int | None = None,
               return_ids: bool = False):
        """Answer raw question strings (the REPL's path): render, batch by length, generate.

        Args:
            questions: the questions, each rendered through the template.
            batch_size: questions answered at once.
            max_new_tokens: caps each answer (default: the model's ``max_new_tokens``).
            return_ids: also return each answer's generated ids (up to and including eos, if it came).
        Returns:
            The answers in the order of ``questions``; with ``return_ids``, ``(answers, ids)``.
        """
        examples = [InputExample(guid=i, text_a=q) for i, q in enumerate(questions)]
        encoded = [self.wrapper.encode(e, i) for i, e in enumerate(examples)]
        return self.answer_encoded(encoded, batch_size, max_new_tokens, return_ids)

    def answer_encoded(self, encoded: list, batch_size: int = 32, max_new_tokens: int | None = None,
                       return_ids: bool = False):
        """``answer`` for prompts already rendered by ``self.wrapper.encode`` (the server encodes each request on
        its own, before it joins a batch); ``encoded[i].index`` must be ``i``.

        Returns:
            As ``answer``: the answers in the order of ``encoded``; with ``return_ids``, ``(answers, ids)``.
        """
        answers: list[str] = [""] * len(encoded)
        ids: list[list[int]] = [[] for _ in encoded]
        for chunk in generation_batches(encoded, batch_size):
            batch = collate_for_generation(chunk, self.tokenizer.pad_token_id)
            texts, rows = self.generate_answers(batch, max_new_tokens, return_ids=True)
            for index, text, row in zip(batch["index"], texts, rows):
                answers[index], ids[index] = text, row
        return (answers, ids) if return_ids else answers

    def generate(self, batch, verbose: bool = False, **generation_arguments) -> tuple[list[list[int]], list[str]]:
        """OpenPrompt's ``output_ids, output_sentences = prompt_model.generate(batch, verbose=False, **args)``.

        The whole batch is answered at once by optqa's greedy decoder (OpenPrompt answered decoder-only
        batches one example at a time); every row gets the answer it would get alone.

        Args:
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
        from optqa.errors import OptqaError

        if "labels" in batch:
            raise OptqaError("generate answers prompts: use a PromptDataLoader with teacher_forcing=False (this batch "
                             "holds the answers)")
        args = {k: v for k, v in generation_arguments.items() if k not in IGNORED_IN_GREEDY}
        max_length, max_new_tokens, min_length, min_new_tokens, eos_ids, bad_words = (
            args.pop(k, None) for k in ("max_length", "max_new_tokens", "min_length", "min_new_tokens",
                                        "eos_token_id", "bad_words_ids"))
        unknown = sorted(set(args) - set(GREEDY_EQUIVALENT))
        if unknown:
            raise OptqaError(f"generate does not take {', '.join(unknown)} (it takes max_length, max_new_tokens, "
                             "min_length, min_new_tokens, eos_token_id, bad_words_ids, "
                             f"{', '.join(sorted(IGNORED_IN_GREEDY | set(GREEDY_EQUIVALENT)))})")
        unsupported = [f"{k}={v!r}" for k, v in args.items() if GREEDY_EQUIVALENT[k] != v]
        if unsupported or any(len(words) != 1 for words in bad_words or []):
            what = ", ".join(unsupported) or "bad_words_ids with sequences longer than one token"
            raise OptqaError(f"generate: optqa answers greedily; {what} is not supported (use num_beams=1, "
                             "do_sample=False, repetition_penalty=1.0, single-token bad_words_ids)")
        lengths = batch["attention_mask"].sum(dim=1)
        count = len(lengths)
        if max_new_tokens is not None:
            budgets = [max_new_tokens] * count
        elif max_length is not None:
            budgets = (max_length - lengths).clamp(min=0).tolist()
        else:
            budgets = [self.max_new_tokens] * count
        stops = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        held = sorted({self.tokenizer.eos_token_id, *stops})
        banned = sorted({words[0] for words in bad_words or []})

        def process(logits: torch.Tensor, step: int) -> torch.Tensor:
            if banned:
                logits[:, banned] = float("-inf")
            # OpenPrompt's min_length counts each example's own prompt (one example at a time)
            hold = (lengths.to(logits.device) + step < (min_length or 0)) | (step < (min_new_tokens or 0))
            logits[:, held] = torch.where(hold[:, None], float("-inf"), logits[:, held])
            return logits

        generated: list[list[int]] = [[] for _ in range(count)]
        if max(budgets) > 0:
            needed = banned or min_length or min_new_tokens
            _, generated = self.generate_answers(batch, max(budgets), logits_processor=process if needed else None,
                                                 return_ids=True)
        output_ids, sentences = [], []
        for i, (budget, new) in enumerate(zip(budgets, generated)):
            new = new[:budget]  # a row with a longer prompt has less of max_length left
            end = next((j + 1 for j, token in enumerate(new) if token in stops), len(new))
            new = new[:end]
            output_ids.append(batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist() + new)
            sentences.append(self.decode_answer(new))
        if verbose:
            for sentence in sentences:
                log.info("generated: %s", sentence)
        return output_ids, sentences


# OpenPrompt generation arguments that change nothing in greedy decoding (sampling and beam settings, and
# output plumbing); the ones here with the greedy value are accepted, any other value is refused
IGNORED_IN_GREEDY = {"temperature", "top_k", "top_p", "length_penalty", "early_stopping", "pad_token_id",
                     "use_cache", "output_scores", "typical_p"}
GREEDY_EQUIVALENT = {"num_beams": 1, "do_sample": False, "num_return_sequences": 1, "repetition_penalty": 1.0,
                     "no_repeat_ngram_size": 0, "num_beam_groups": 1}
