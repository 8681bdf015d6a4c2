"""OpenPrompt's PromptForGeneration for decoder-only models: loss on the answer, batched greedy answers."""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import nn

from .data import IGNORE_INDEX, LMTokenizerWrapper, InputExample, collate_for_generation, generation_batches
from .deltas import DeltaModel, is_delta_parameter
from .runtime import is_sharded

log = logging.getLogger(__name__)


def _linear_with_cast_weight(module: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(hidden, module.__dict__["_optqa_weight"], module.bias)


def _whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter as one plain tensor: an FSDP shard (DTensor) is gathered from every process."""
    return param.full_tensor().detach() if hasattr(param, "full_tensor") else param.detach()


def _like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out like ``param``: this process's shard when ``param`` is an FSDP DTensor."""
    if not hasattr(param, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements)


@contextlib.contextmanager
def _gathered_root(model):
    """The root shard group (embeddings, head, soft prompt, prefix) gathered while generate runs: generate
    enters the backbone below the root's forward, which would otherwise gather it. The decoder layers
    gather themselves step by step."""
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


class PromptForGeneration(nn.Module):
    """``PromptForGeneration(plm, template, tokenizer=tokenizer)``.

    ``plm`` is the backbone as returned by ``load_plm``; if a delta was attached to it with
    ``AutoDeltaModel.from_config(..., backbone_model=plm)``, the delta's model is what runs.
    ``forward(batch)`` returns the mean cross-entropy over the answer tokens (and eos) only, with
    teacher forcing; ``generate(batch)`` returns the answers as strings.
    """

    def __init__(self, plm: nn.Module, template, freeze_plm: bool = True, plm_eval_mode: bool = False,
                 gen_config=None, tokenizer=None, max_seq_length: int = 128, max_new_tokens: int = 32):
        super().__init__()
        self.delta: DeltaModel | None = plm.__dict__.get("_optqa_delta")
        self.backbone = plm
        self.plm = self.delta.model if self.delta else plm
        self.template = template
        self.tokenizer = tokenizer or template.tokenizer
        self.wrapper = LMTokenizerWrapper(self.tokenizer, template, max_seq_length)
        self.max_new_tokens = max_new_tokens
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
        return sum(p.numel() for n, p in self.named_parameters() if is_delta_parameter(n))

    def load_delta_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy delta weights in; a missing, unexpected or mis-shaped key is an error, never skipped."""
        from .errors import OptqaError

        own = {n: p for n, p in self.named_parameters() if is_delta_parameter(n)}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise OptqaError(f"{source} does not fit this delta: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                             f", unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        for name, param in own.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise OptqaError(f"{source}: {name} has shape {tuple(state[name].shape)}, this model expects "
                                 f"{tuple(param.shape)} (a delta for another backbone?)")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(_like(param, state[name].to(param.dtype)))

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
            from .errors import OptqaError

            raise OptqaError(f"an {self.quantization} backbone computes around its int8 matmuls in fp32; "
                             f"{dtype} autocast does not apply to it")
        self._autocast_dtype = dtype

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
                    module.__dict__["_optqa_weight"] = embedding.detach().to(dtype)
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
        return next(self.plm.parameters()).device

    def loss_terms(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed token loss and the number of answer tokens, so several processes can average exactly."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        width = input_ids.shape[1]
        first_target = int((labels != IGNORE_INDEX).int().argmax(dim=1).min())
        # the vocabulary projection is only needed where an answer token is predicted
        keep = width - first_target + 1
        with self._running(batch):
            out = self.plm(input_ids=input_ids, attention_mask=batch["attention_mask"], logits_to_keep=keep,
                           use_cache=False)
        logits = out.logits[:, -keep:-1].float()
        targets = labels[:, first_target:]
        loss_sum = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, (targets != IGNORE_INDEX).sum()

    def forward(self, batch) -> torch.Tensor:
        loss_sum, count = self.loss_terms(batch)
        return loss_sum / count.clamp(min=1)

    @torch.inference_mode()
    def generate_answers(self, batch, max_new_tokens: int | None = None, verbose: bool = False) -> list[str]:
        """Greedy answers for a left-padded batch; each row stops at its own eos."""
        from transformers import GenerationConfig

        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        config = GenerationConfig(max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False,
                                  num_beams=1, eos_token_id=eos, pad_token_id=pad, bos_token_id=eos)
        input_ids = batch["input_ids"].to(self.device)
        sharded = is_sharded(self)
        with self._running(batch), _gathered_root(self) if sharded else contextlib.nullcontext():
            # sharded, every process runs each decoding step until the last one's answers end (synced_gpus)
            out = self.plm.generate(input_ids=input_ids, attention_mask=batch["attention_mask"].to(self.device),
                                    generation_config=config, synced_gpus=sharded)
        answers = []
        for row in out[:, input_ids.shape[1]:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            answers.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        if verbose:
            for answer in answers:
                log.info("generated: %s", answer)
        return answers

    def answer(self, questions: list[str], batch_size: int = 32) -> list[str]:
        """Answer raw question strings (the REPL's path): render, batch by length, generate."""
        examples = [InputExample(guid=i, text_a=q) for i, q in enumerate(questions)]
        encoded = [self.wrapper.encode(e, i) for i, e in enumerate(examples)]
        answers: list[str] = [""] * len(encoded)
        for chunk in generation_batches(encoded, batch_size):
            batch = collate_for_generation(chunk, self.tokenizer.pad_token_id)
            for index, text in zip(batch["index"], self.generate_answers(batch)):
                answers[index] = text
        return answers
