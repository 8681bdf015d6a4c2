"""An int8 frozen backbone for answering on CPUs without native bf16 (``--quantize none|int8|auto``).

Each frozen ``nn.Linear`` of the backbone (and the output head, see ``QUANTIZE_HEAD``) computes with int8
weights (one scale per output row) and int8 activations quantised per call (dynamic quantisation), through
PyTorch's own quantised CPU kernels (fbgemm / x86 / oneDNN): decoding one question multiplies a single row
per matrix, where int8 reads a quarter of fp32's bytes (about 4x faster on AVX2, measured).
Why torch's kernels and not torchao: with torch 2.13 on CPU, torchao 0.18's
Int8DynamicActivationInt8WeightConfig ran slower than fp32 in eager mode (it is built for torch.compile and
GPUs) and its wheel carries native parts, while these kernels ship inside every x86 torch wheel, Windows
included, so int8 needs no extra package.

Each quantised Linear is replaced in its parent by an ``Int8Linear`` that holds the same fp32 parameters under the
same names (state dict, backbone fingerprint, the head's tie to the input embedding) and computes with the
packed int8 copy. A delta's adapter or BitFit bias wraps the Linear's parent or the Linear itself
(``optqa.deltas.DeltaWrapper``, whose ``base_layer`` is then what gets quantised) and keeps working; delta
parameters stay fp32, and ``dequantize`` puts the Linear back: plain fp32 answering, exactly.
Which model answers on int8, and when, is ``optqa.answering.AnsweringRuntime``'s to decide.
"""
from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from optqa.config import QUANTIZE_CHOICES
from optqa.errors import OptqaError
from optqa.hardware import cpu_flags, cpu_has_native_bf16, describe_kernels
from optqa.wrappers import FrozenLinearWrapper, replace, restore

log = logging.getLogger(__name__)

# engines with int8 kernels for x86 CPUs, best first (x86 picks fbgemm or oneDNN per shape)
INT8_ENGINES = ("x86", "fbgemm", "onednn")
# The tied output head (50272 x 768 on OPT-125m, a third of its weights) is the largest single matmul of a
# decoding step; benchmarks/bench_int8.py measures what quantising it adds (docs/performance.md, "int8 answering").
QUANTIZE_HEAD = True
_EPS = torch.finfo(torch.float32).eps  # the smallest scale torch's observers give a row (an all-zero row gets it)
_BLOCK_WEIGHTS = 128 * 1024  # weights quantised at a time: 512 kB of fp32, well inside a 1-2 MB L2 (fastest measured)


def _supported_engines() -> list[str]:
    """The quantised-kernel engines this torch build has (one place, so tests can take them away); none where
    its dynamic int8 Linear is gone (torch marks torch.ao.quantization as moving to torchao)."""
    try:
        import torch.ao.nn.quantized.dynamic  # noqa: F401
    except ImportError:
        return []
    return list(torch.backends.quantized.supported_engines)


def int8_engine() -> str | None:
    """The engine int8 answering uses here, or None where this torch build has no x86 int8 kernels."""
    engines = _supported_engines()
    return next((engine for engine in INT8_ENGINES if engine in engines), None)


def describe_cpu() -> str:
    """One line for logs and benchmark tables, e.g. ``avx2 yes, avx512f no, avx512_bf16 no, amx no, vnni no``."""
    flags = cpu_flags()
    text = ", ".join(f"{name} {'yes' if flags[name] else 'no'}"
                     for name in ("avx2", "avx512f", "avx512_bf16", "amx", "vnni"))
    return f"{text}; {describe_kernels()}"


def resolve_quantize(choice: str, precision: str, device: torch.device, sharded: bool = False) -> str:
    """``none`` or ``int8``: what ``--quantize`` means on this machine.

    Args:
        choice: ``none``, ``int8`` or ``auto`` (int8 where the CPU has no native bf16 and the kernels exist).
        precision: the ``--precision`` answering runs with; ``auto`` picks int8 only under ``auto``.
        device: where the model is.
        sharded: whether FSDP shards the backbone (its weights exist only in pieces, nothing to quantise).
    Returns:
        ``"none"`` or ``"int8"``.
    Raises:
        OptqaError: ``int8`` asked for where it cannot run (no int8 kernels, a GPU, a sharded backbone,
            an explicit bf16/fp16 precision).
    """
    from optqa.options import QUANTIZE_WITH_FSDP, QUANTIZE_WITH_PRECISION

    if choice not in QUANTIZE_CHOICES:
        raise OptqaError(f"--quantize {choice!r}: choose from {', '.join(QUANTIZE_CHOICES)}")
    if choice == "none":
        return "none"
    engine = int8_engine()
    if choice == "auto":
        # an explicit --precision (fp32 included) is the user's word on how to compute: auto keeps it
        chosen = (device.type == "cpu" and not sharded and engine is not None and precision == "auto"
                  and not cpu_has_native_bf16())
        return "int8" if chosen else "none"
    if engine is None:
        raise OptqaError(f"--quantize int8: this PyTorch build has no int8 CPU kernels (quantized engines: "
                         f"{', '.join(_supported_engines()) or 'none'}; needs one of {', '.join(INT8_ENGINES)}); "
                         "use --quantize none")
    if device.type != "cpu":
        raise OptqaError(f"--quantize int8 runs on the CPU, the model is on {device.type}; add --cpu or use "
                         "--quantize none")
    if sharded:
        raise OptqaError(QUANTIZE_WITH_FSDP)
    if precision in ("bf16", "fp16"):
        raise OptqaError(QUANTIZE_WITH_PRECISION)
    return "int8"


def _quantize_rows(weight: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and fp32 scales of ``weight``, one symmetric scale per row, ``rows`` rows at a time.

    The arithmetic of torch's per-channel quantiser on x86 (``quantize_val``: ``nearbyint(x * (1.0f / scale))``,
    clamped to [-128, 127]) in whole-tensor ops on blocks that stay in the L2 cache: the weight is read from
    memory once, where ``amin``, ``amax`` and ``quantize_per_channel`` read it three times, and
    ``quantize_per_channel`` is a scalar loop on x86 (2.5 ns per weight, measured). Tested bit for bit against it.
    """
    out = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0])
    scaled = torch.empty(min(rows, weight.shape[0]), weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        block = weight[start:start + rows]
        # the observer's symmetric scale: the larger magnitude over half the qint8 range (127.5), never below eps
        scale = torch.maximum(block.amin(dim=1).neg_().clamp_(min=0), block.amax(dim=1).clamp_(min=0))
        scale = scale.div_(127.5).clamp_(min=_EPS)
        scales[start:start + len(block)] = scale
        values = torch.mul(block, torch.reciprocal(scale).unsqueeze(1), out=scaled[:len(block)])
        out[start:start + len(block)] = values.round_().clamp_(-128, 127)  # round_: half to even, as nearbyint
    return out, scales


def pack_int8(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """One Linear's weight as the engine's packed int8 matrix: one symmetric scale per output row.

    Bit for bit what ``torch.ao.nn.quantized.dynamic.Linear.from_float`` packs under
    ``per_channel_dynamic_qconfig`` (tested layer by layer), at less than half its cost: its
    ``PerChannelMinMaxObserver`` and ``quantize_per_channel`` are one pass over L2-sized blocks here
    (``_quantize_rows``: OPT-125m packs in 0.78-0.82 s instead of 0.94-1.00 s on one emulated AVX2 core, and in
    0.45-0.46 s instead of 0.48-0.49 s on two), and from_float packs an all-zero weight of the full shape in the
    module's constructor before packing the real one (a third of a second for OPT-125m's output head alone).

    Args:
        weight: the fp32 weight, (out_features, in_features).
        bias: the fp32 bias or None (kept in fp32 inside the packed matrix).
    Returns:
        The packed weight for ``torch.ops.quantized.linear_dynamic`` on the current quantized engine.
    """
    weight = weight.detach().float()
    values, scales = _quantize_rows(weight, max(1, _BLOCK_WEIGHTS // weight.shape[1]))
    # a qint8 tensor made from values already quantised (torch's own constructor for that, as torchao uses it)
    qweight = torch._make_per_channel_quantized_tensor(values, scales.double(),
                                                       torch.zeros(len(scales), dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())


def _pack_all(tensors: list[tuple[torch.Tensor, torch.Tensor | None]], workers: int) -> list[torch.ScriptObject]:
    """``pack_int8`` for every (weight, bias), the largest first, on ``workers`` threads: the quantising and
    packing ops release the GIL, and the largest first keeps the threads busy to the end (OPT-125m's output
    head alone is a third of the work)."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i][0].numel())
    packed: list = [None] * len(tensors)
    with warnings.catch_warnings():
        # torch marks its quantized tensors as moving to torchao; the kernels are still torch's (see above)
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated")
        if workers <= 1 or len(tensors) <= 1:
            for i in order:
                packed[i] = pack_int8(*tensors[i])
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="optqa-int8-pack") as pool:
                for i, result in zip(order, pool.map(lambda i: pack_int8(*tensors[i]), order)):
                    packed[i] = result
    return packed


def frozen_linears(model: nn.Module, head: bool = QUANTIZE_HEAD) -> list[tuple[str, nn.Linear]]:
    """The backbone's frozen ``nn.Linear`` layers: what int8 replaces. A delta's own layers (adapter, LoRA,
    prefix projections: ``is_delta_parameter``) and anything that trains are left out; with ``head=False``
    so is the output head."""
    from optqa.deltas import is_delta_parameter

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = []
    for name, module in model.named_modules():
        # type(), not isinstance: a subclass (PEFT's layers) may compute more than the weight's matmul
        if type(module) is not nn.Linear or is_delta_parameter(f"{name}.weight") or module.weight.requires_grad:
            continue
        if module is output and not head:
            continue
        chosen.append((name, module))
    return chosen


class Int8Linear(FrozenLinearWrapper):
    """A frozen Linear computing with int8 weights (one scale per output row) and int8 activations quantised
    per call, through torch's dynamic int8 kernel; in its parent under the Linear's name, with its fp32
    parameters (see ``optqa.wrappers``).

    Args:
        base_layer: the Linear.
        packed: its weight and bias as ``pack_int8`` packs them (shared by every model on the same weights).
    """

    def __init__(self, base_layer: nn.Linear, packed: torch.ScriptObject):
        super().__init__(base_layer)
        self.packed = packed  # a plain attribute, not a tensor: never in the state dict

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., in_features)`` -> ``(..., out_features)`` in ``hidden``'s dtype."""
        # reduce_range=True: what torch's dynamic int8 Linear (version 4) passes, so answers are the ones it
        # gives. Positional, and no .to() when the dtype already matches: this runs 73 times per token, and the
        # keyword and the no-op .to() cost ~5 us each time (measured: 0.4 ms of a 22 ms int8 token on an AVX2 core)
        out = torch.ops.quantized.linear_dynamic(hidden, self.packed, True)
        return out if out.dtype == hidden.dtype else out.to(hidden.dtype)


def quantize_int8(model: nn.Module, head: bool = QUANTIZE_HEAD, shared: dict | None = None,
                  workers: int | None = None) -> dict:
    """Put an ``Int8Linear`` in place of every frozen Linear of ``model`` (see the module docstring).

    Every copy is packed before any Linear is replaced, so a forward pass never mixes fp32 and int8 layers
    and the answers do not depend on ``workers`` (tested).

    Args:
        model: the network that runs (``PromptForGeneration.plm``); LoRA should be merged first, or its
            fp32 update is added to the int8 base layer's output.
        head: also quantise the output head.
        shared: packed layers by the weight tensors they were packed from, reused across calls: deltas served on
            one backbone (``build.load_shared``'s copies share its tensors) share one int8 copy. Only for
            weights that no merge changes.
        workers: threads that pack (default: torch's thread count, which ``--num_threads`` sets; each packs
            whole layers, so they never wait on each other).
    Returns:
        ``{"layers": n, "parameters": weights quantised, "seconds": time taken, "engine": engine}``.
    Raises:
        OptqaError: no int8 kernels in this torch build.
    """
    engine = int8_engine()
    if engine is None:
        raise OptqaError("this PyTorch build has no int8 CPU kernels")
    if torch.backends.quantized.engine not in INT8_ENGINES:
        torch.backends.quantized.engine = engine  # packed weights are laid out for the engine that runs them
    started = time.perf_counter()
    shared = {} if shared is None else shared
    layers = frozen_linears(model, head)  # an Int8Linear is not an nn.Linear: quantising twice changes nothing
    keys = [(module.weight.data_ptr(), None if module.bias is None else module.bias.data_ptr(),
             tuple(module.weight.shape)) for _, module in layers]
    todo = {key: (module.weight, module.bias) for key, (_, module) in zip(keys, layers) if key not in shared}
    with torch.no_grad():
        shared.update(zip(todo, _pack_all(list(todo.values()), workers or torch.get_num_threads())))
    for key, (name, module) in zip(keys, layers):
        replace(model, name, Int8Linear(module, shared[key]))
    return {"layers": len(layers), "parameters": sum(module.weight.numel() for _, module in layers),
            "seconds": time.perf_counter() - started, "engine": torch.backends.quantized.engine}


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model``'s frozen Linear layers run on int8 now."""
    return any(isinstance(module, Int8Linear) for module in model.modules())


def dequantize(model: nn.Module) -> None:
    """Undo ``quantize_int8``: every Linear is back in its place, computing with its fp32 weight."""
    restore(model, Int8Linear)
