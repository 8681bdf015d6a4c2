"""The answering runtime: how a ``PromptForGeneration`` computes (precision, int8, LoRA merged).

One ``AnsweringRuntime`` per model (``model.runtime``) holds that state and is the only code that changes how
the frozen backbone computes: it casts the frozen Linear weights to the autocast dtype once (a head tied to
the fp32 input embedding gets a ``CastLinear`` with a bf16 copy), puts ``Int8Linear`` layers in
(``optqa.quantize``), and folds LoRA into the weights. ``prepare_for_answering`` and
``prepare_shared_for_answering`` are the entry points for everything that only answers; training scores on
int8 inside ``int8_while_scoring``.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch
from torch import nn

from optqa.errors import OptqaError
from optqa.hardware import autocast_dtype, is_sharded
from optqa.quantize import dequantize, describe_cpu, is_quantized, quantize_int8, resolve_quantize
from optqa.wrappers import CastLinear, replace, restore

log = logging.getLogger(__name__)


class AnsweringRuntime:
    """How one ``PromptForGeneration`` computes: its autocast dtype, the dtype its frozen weights are held in,
    int8 layers, and a background int8 packing still running.

    Args:
        model: the ``PromptForGeneration`` (``model.runtime`` is this object).
        cast_copies: casts of tied weights by ``(data_ptr, shape, dtype)``, shared by the models of one server
            (``prepare_shared_for_answering``): each tied head then computes from one bf16 copy, not one per
            delta (77 MB each on OPT-125m).
    """

    def __init__(self, model: nn.Module, cast_copies: dict | None = None):
        self.model = model
        self._autocast_dtype: torch.dtype | None = None
        self.weights_dtype = torch.float32  # what the frozen Linear weights are stored in now
        self.cast_copies = {} if cast_copies is None else cast_copies
        self._pending: tuple[threading.Thread, dict] | None = None

    @property
    def quantization(self) -> str:
        """``"int8"`` while the frozen Linear layers run on int8 kernels (answering only), else ``"none"``."""
        return "int8" if is_quantized(self.model.plm) else "none"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16/fp16 autocast for every forward pass and generation; None: plain fp32."""
        return self._autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, dtype: torch.dtype | None) -> None:
        # the frozen weights follow on the next run, not now: a LoRA merge done after choosing the precision
        # (prepare_for_answering) is then still computed on fp32 weights
        if dtype is not None and self.quantization != "none":
            raise OptqaError(f"an {self.quantization} backbone computes around its int8 matmuls in fp32; "
                             f"{dtype} autocast does not apply to it")
        self._autocast_dtype = dtype

    def follow_autocast(self) -> None:
        """Hold the frozen weights in the autocast dtype before a forward pass (sharded weights are gathered for
        each block anew, in accelerate's FSDP mixed-precision dtype on a GPU: left alone)."""
        wanted = self._autocast_dtype or torch.float32
        if wanted != self.weights_dtype and not is_sharded(self.model):
            self.store_frozen_weights_as(wanted)

    # the first cast may happen while answering, inside generate_answers' inference_mode: tensors made there
    # are inference tensors, which a later training step cannot save for backward (a run resumed at an
    # epoch's end scores dev before its next step); made here, outside it, they serve both
    @torch.inference_mode(False)
    def store_frozen_weights_as(self, dtype: torch.dtype) -> None:
        """Keep the frozen Linear weights in ``dtype``.

        Autocast casts a Linear's weight to bf16 on every call and caches only weights that require grad, so
        a frozen 125M-parameter backbone was copied in full on every forward pass and on every generated
        token (a third of a training step on OPT-125m; a single question's answer was slower in bf16 than
        in fp32). Casting once gives the matmuls the very same bf16 values; LayerNorm, the input embedding
        and every delta parameter stay fp32. Back to fp32, the weights keep their bf16 rounding.
        """
        plm = self.model.plm
        restore(plm, CastLinear)
        embedding = self.model.backbone.get_input_embeddings().weight
        # an Int8Linear is no nn.Linear: it computes with its own packed copy, never with this weight
        linears = [(name, module) for name, module in plm.named_modules() if isinstance(module, nn.Linear)]
        for name, module in linears:
            if module.weight is embedding:
                if dtype != torch.float32:
                    # a head tied to the input embedding (which stays fp32) computes with its own cast copy;
                    # the tie, the state dict and the backbone fingerprint stay as they are
                    replace(plm, name, CastLinear(module, self._cast_copy(embedding, dtype)))
                continue
            for tensor in (module.weight, module.bias):
                if tensor is not None and not tensor.requires_grad and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)
        self.weights_dtype = dtype

    def _cast_copy(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``weight`` in ``dtype``, made once per weight for every model sharing ``cast_copies``; an in-place
        change of the weight (its ``_version``) makes a fresh copy."""
        key = (weight.data_ptr(), tuple(weight.shape), dtype)
        cached = self.cast_copies.get(key)
        if cached is None or cached[0] is not weight or cached[1] != weight._version:
            cached = (weight, weight._version, weight.detach().to(dtype))
            self.cast_copies[key] = cached
        return cached[2]

    def to_int8(self, shared: dict | None = None) -> dict:
        """The frozen Linear layers to int8 (``quantize_int8``; ``shared``: packed layers reused across models),
        the compute around them to fp32.

        Returns:
            ``quantize_int8``'s statistics.
        """
        self.autocast_dtype = None
        if self.weights_dtype != torch.float32:
            self.store_frozen_weights_as(torch.float32)  # int8 is packed from the weights as they are held now
        return quantize_int8(self.model.plm, shared=shared)

    def to_float(self, dtype: torch.dtype | None) -> None:
        """Undo ``to_int8``: the Linear layers back, computing under ``dtype`` autocast (None: fp32)."""
        dequantize(self.model.plm)
        self.autocast_dtype = dtype

    def merge_lora(self) -> bool:
        """Fold a LoRA delta into the backbone's weights for answering; True if merged now."""
        delta = self.model.delta
        return delta is not None and delta.merge_lora()

    def start(self, work) -> None:
        """Run ``work()`` in a background thread; ``wait_until_ready`` joins it and re-raises what it raised."""
        outcome: dict[str, BaseException] = {}

        def run() -> None:
            try:
                work()
            except BaseException as exc:  # handed to the thread that waits for it
                outcome["error"] = exc

        thread = threading.Thread(target=run, name="optqa-int8", daemon=True)
        self._pending = (thread, outcome)
        thread.start()

    def wait_until_ready(self) -> None:
        """Wait for the background work ``start`` began, if any; re-raise what it raised."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        thread, outcome = pending
        thread.join()
        if "error" in outcome:
            raise outcome["error"]


def _describe(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype else "fp32"


def prepare_for_answering(model, config, default: str = "auto", background: bool = False) -> str:
    """Make a loaded model ready to answer: precision, LoRA merged, and ``--quantize`` applied.

    The one entry point for everything that only answers (the question loop, ``--mode evaluate``, a server).

    Args:
        model: a ``PromptForGeneration`` (e.g. from ``optqa.build.load_trained``), in eval mode.
        config: a ``RunConfig``; reads ``quantize`` (None: ``default``), ``precision`` and ``merge_lora``.
        default: what ``quantize=None`` means for this caller: ``auto`` for the question loop and serving,
            ``none`` where scores are reported (they must not move with the CPU they were computed on).
        background: quantise in a thread and return at once (the question loop shows its prompt while a
            person types); call ``wait_until_ready(model)`` before answering.
    Returns:
        ``"none"`` or ``"int8"``, what is applied (also logged in one line with the CPU's flags).
    Raises:
        OptqaError: ``--quantize int8`` where it cannot run (see ``resolve_quantize``).
    """
    runtime = model.runtime
    choice = config.quantize or default
    resolved = resolve_quantize(choice, config.precision, model.device, sharded=is_sharded(model))
    runtime.autocast_dtype = None if resolved == "int8" else autocast_dtype(config.precision, model.device)
    if config.merge_lora and runtime.merge_lora():
        log.info("LoRA merged into the backbone weights for answering")
    if resolved == "none":
        log.info("quantize %s: none (%s answering); CPU: %s", choice, _describe(runtime.autocast_dtype),
                 describe_cpu() if model.device.type == "cpu" else model.device.type)
        return resolved

    def to_int8() -> None:
        stats = runtime.to_int8()
        log.info("quantize %s: int8 backbone (%d Linear layers, %.1fM weights, %s kernels, %.2f s); CPU: %s",
                 choice, stats["layers"], stats["parameters"] / 1e6, stats["engine"], stats["seconds"],
                 describe_cpu())

    if background:
        runtime.start(to_int8)
    else:
        to_int8()
    return resolved


def wait_until_ready(model) -> None:
    """Wait for ``prepare_for_answering(..., background=True)`` to finish; re-raise what it raised, if anything."""
    model.runtime.wait_until_ready()


def prepare_shared_for_answering(models: list, quantize: str | None, precision: str) -> str:
    """``prepare_for_answering`` for several deltas on one shared backbone (``--mode serve``).

    LoRA stays unmerged (merging would change the weights every delta shares; its update is added in fp32),
    the shared Linear layers are packed to int8 once for all of them, and a tied head's bf16 copy is made once.

    Args:
        models: ``PromptForGeneration`` objects whose backbones share their weight tensors.
        quantize: ``--quantize`` (None: ``auto``, as for the question loop).
        precision: the one ``--precision`` they all compute in.
    Returns:
        ``"none"`` or ``"int8"``.
    Raises:
        OptqaError: ``--quantize int8`` where it cannot run (see ``resolve_quantize``).
    """
    choice = quantize or "auto"
    resolved = resolve_quantize(choice, precision, models[0].device)
    packed: dict = {}
    cast_copies = models[0].runtime.cast_copies
    started = time.perf_counter()
    for model in models:
        model.runtime.cast_copies = cast_copies
        if resolved == "int8":
            model.runtime.to_int8(packed)
        else:
            model.runtime.autocast_dtype = autocast_dtype(precision, model.device)
    if resolved == "int8":
        log.info("quantize %s: int8 backbone shared by %d delta(s) (%d packed Linear layers, %.2f s); CPU: %s",
                 choice, len(models), len(packed), time.perf_counter() - started, describe_cpu())
    else:
        log.info("quantize %s: none", choice)
    return resolved


@contextlib.contextmanager
def int8_while_scoring(model, quantize: str):
    """``model`` (a PromptForGeneration) answers on an int8 backbone inside the block when ``quantize`` is
    ``int8``, and trains on its own precision after it (LoRA stays unmerged: its update is added in fp32)."""
    if quantize != "int8":
        yield
        return
    autocast = model.runtime.autocast_dtype
    model.runtime.to_int8()
    try:
        yield
    finally:
        model.runtime.to_float(autocast)
