"""OpenPrompt's PromptForGeneration for decoder-only models: the module (backbone + delta + template) and the loss.

Answers come from ``optqa.generate`` (greedy decoding over this module) and are computed as ``model.runtime``
(``optqa.answering.AnsweringRuntime``: precision, int8, LoRA merged) says; the methods below that answer are
thin doors to those. OpenPrompt's ``generate(batch, **generation_arguments)`` is in ``optqa.compat.openprompt``.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from optqa import generate
from optqa.answering import AnsweringRuntime
from optqa.config import REGISTRY
from optqa.data import IGNORE_INDEX, LMTokenizerWrapper
from optqa.deltas import PEFT_PROMPT_LEARNING, DeltaModel, _whole, attached_delta, is_delta_parameter, load_delta_state
from optqa.errors import OptqaError
from optqa.families import cache_argument, kv_layout, new_cache
from optqa.generate import positions

log = logging.getLogger(__name__)


def _virtual_kind(model: nn.Module) -> str | None:
    """The prompt-learning delta type (``"soft_prompt"``, ``"prefix"``) of a PEFT prompt-learning model (optqa's
    or one loaded with ``PeftModel.from_pretrained``), else None."""
    if not hasattr(model, "prompt_encoder"):
        return None
    peft_type = str(model.peft_config[model.active_adapter].peft_type).rsplit(".", 1)[-1]
    kinds = {peft: kind for kind, peft in PEFT_PROMPT_LEARNING.items()}
    if peft_type not in kinds:
        raise OptqaError(f"PEFT {peft_type} is not supported (prompt learning: prompt tuning and prefix tuning)")
    return kinds[peft_type]


class PromptForGeneration(nn.Module):
    """``PromptForGeneration(plm, template, tokenizer=tokenizer)``.

    ``plm`` is the backbone as returned by ``load_plm``; if a delta was attached to it with
    ``AutoDeltaModel.from_config(..., backbone_model=plm)`` (found with ``optqa.deltas.attached_delta``), the delta's
    model is what runs. Two attributes, named as OpenPrompt and the checkpoint keys name them: ``backbone`` is the
    transformers model itself, ``plm`` the module that runs (PEFT's wrapper around ``backbone`` for lora,
    soft_prompt and prefix; ``backbone`` itself for adapter and bitfit, which modify it in place).
    ``forward(batch)`` returns the mean cross-entropy over the answer tokens (and eos) only, with
    teacher forcing; ``generate_answers(batch)`` and ``answer(questions)`` return answer strings
    (``optqa.compat.openprompt.PromptForGeneration`` adds OpenPrompt's ``generate(batch, **generation_arguments)``).
    ``runtime`` holds how it computes (``AnsweringRuntime``: autocast dtype, int8, LoRA merged).
    """

    def __init__(self, plm: nn.Module, template, freeze_plm: bool = True, plm_eval_mode: bool = False,
                 gen_config=None, tokenizer=None, max_seq_length: int = 128, max_new_tokens: int = 32,
                 stop_at_newline: bool = True):
        super().__init__()
        if gen_config is not None:
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
        self.line_ends = generate.line_ends(self.tokenizer)  # shared by the models on this tokenizer
        # the blocks FSDP shards one by one (accelerate reads this name), e.g. OPTDecoderLayer
        self._no_split_modules = list(getattr(plm, "_no_split_modules", None) or [])
        self.runtime = AnsweringRuntime(self)  # not a module: no parameters, no state dict
        if freeze_plm:
            for name, param in self.named_parameters():
                param.requires_grad_(is_delta_parameter(name))
        # soft prompts and prefixes are applied here, not by PEFT's generation glue, which broke when
        # transformers 5.24 renamed the cache argument; PEFT still holds their parameters (its layout and export)
        self._virtual = _virtual_kind(self.plm)
        # where its virtual tokens go: "inputs" (embeddings before the prompt's) or "cache" (every layer's keys and
        # values), as its registry entry says
        self._virtual_place = REGISTRY[self._virtual].virtual_place if self._virtual else None
        # the keyword this transformers' backbone takes its KV cache under (greedy decoding passes it each step)
        self.cache_arg = cache_argument(self.backbone)
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

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16/fp16 autocast for every forward pass and generation; None: plain fp32 (``runtime``'s)."""
        return self.runtime.autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, dtype: torch.dtype | None) -> None:
        self.runtime.autocast_dtype = dtype

    @property
    def quantization(self) -> str:
        """``"int8"`` while the frozen Linear layers run on int8 kernels (answering only), else ``"none"``."""
        return self.runtime.quantization

    @contextlib.contextmanager
    def running(self):
        """Inside: the frozen weights are held in the autocast dtype and every forward pass runs under that
        autocast."""
        self.runtime.follow_autocast()
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            yield

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
        with self.running():
            inputs = self.backbone_inputs(input_ids, batch["attention_mask"], use_cache=False,
                                          soft_index=batch.get("soft_index"))
            out = self.backbone(**inputs, logits_to_keep=keep)
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
        cache = new_cache(config)
        for layer in range(layers):
            keys, values = table[2 * layer], table[2 * layer + 1]
            cache.update(keys.unsqueeze(0).expand(batch_size, -1, -1, -1),
                         values.unsqueeze(0).expand(batch_size, -1, -1, -1), layer)
        return cache

    def token_embeddings(self, input_ids: torch.Tensor, soft_index: torch.Tensor | None) -> torch.Tensor:
        """The backbone's input embeddings of ``input_ids``, with the template's ``{"soft"}`` tokens in their places.

        Args:
            input_ids: ``(batch, seq_len)`` token ids.
            soft_index: ``(batch, seq_len)`` long: at a ``{"soft"}`` position the row of ``template.soft_embeds``
                that goes there, elsewhere ``SOFT_NONE`` (-1), as the collate functions build it; None for a
                template without ``{"soft"}`` tokens.
        Returns:
            ``(batch, seq_len, width)`` embeddings.
        Raises:
            OptqaError: the template has ``{"soft"}`` tokens and ``soft_index`` is missing or of another shape.
        """
        embeds = self.backbone.get_input_embeddings()(input_ids)
        if not self.template.num_soft_tokens:
            return embeds
        if soft_index is None or soft_index.shape != input_ids.shape:
            raise OptqaError("this template has {\"soft\"} tokens: pass the batch's soft_index (batch, seq_len), as "
                             "collate_for_training / collate_for_generation build it")
        index = soft_index.to(embeds.device)
        soft = self.template.soft_embeds[index.clamp(min=0)].to(embeds.dtype)
        return torch.where((index >= 0).unsqueeze(-1), soft, embeds)

    def backbone_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool,
                        soft_index: torch.Tensor | None = None) -> dict:
        """Keyword arguments for the backbone's forward pass over whole prompts.

        The template's ``{"soft"}`` tokens are put in their places in the token embeddings (``token_embeddings``).
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
            soft_index: ``(batch, seq_len)``, the batch's ``soft_index``: needed for a template with ``{"soft"}``
                tokens, else unused.
        Returns:
            ``input_ids`` or ``inputs_embeds``, ``attention_mask``, ``position_ids``, ``use_cache`` and, where a
            cache is used, the cache under this transformers' argument name.
        """
        batch = input_ids.shape[0]
        inputs: dict = {"use_cache": use_cache or self._virtual_place == "cache"}
        if self._virtual_place == "inputs":
            embeds = self.token_embeddings(input_ids, soft_index)
            prompt = self._virtual_weight().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            inputs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        elif self.template.num_soft_tokens:
            inputs["inputs_embeds"] = self.token_embeddings(input_ids, soft_index)
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
            inputs[self.cache_arg] = (self._prefix_cache(batch) if self._virtual_place == "cache"
                                       else new_cache(self.backbone.config))
        return inputs

    def generate_answers(self, batch, max_new_tokens: int | None = None, verbose: bool = False,
                         logits_processor=None, return_ids: bool = False):
        """Greedy answers for a left-padded batch: ``optqa.generate.generate_answers(self, batch, ...)``."""
        return generate.generate_answers(self, batch, max_new_tokens, verbose, logits_processor, return_ids)

    def decode_answer(self, ids: list[int]) -> str:
        """Generated ids as answer text: ``optqa.generate.decode_answer(self, ids)``."""
        return generate.decode_answer(self, ids)

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
        return self.answer_encoded(generate.encode_questions(self, questions), batch_size, max_new_tokens,
                                   return_ids)

    def answer_encoded(self, encoded: list, batch_size: int = 32, max_new_tokens: int | None = None,
                       return_ids: bool = False):
        """``answer`` for prompts already rendered by ``self.wrapper.encode`` (the server encodes each request on
        its own, before it joins a batch): ``optqa.generate.answer_encoded(self, encoded, ...)``."""
        return generate.answer_encoded(self, encoded, batch_size, max_new_tokens, return_ids)
