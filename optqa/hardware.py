"""What this machine and process can compute with: CPU threads, CPU flags, autocast precision, sharding.

Pure introspection of torch and the operating system (no process group, no accelerate), so the library core
(model, quantize) and the entry points can ask without starting anything.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)


# Below this hidden size a matmul is too little work to split: every parallel region costs OpenMP a wake-up and a
# barrier of its threads, which on a core another process holds is a wait for that process's time slice.
# benchmarks/threads.py on 2 cores: hidden 64, 256 and 512 never gained from 2 threads, not even in their fastest
# repeats, and ran 4-14x slower (medians) beside other work; hidden 768 (OPT-125m) gained 1.5x (training) and 2.8x
# (answering) in the moments both cores were free.
SMALL_HIDDEN_SIZE = 768
# the 1-minute load average's time constant (Linux's, and the BSDs' / macOS's), seconds
LOAD_WINDOW_S = 60.0
# wall clock of the process start, taking the imports before this module as CPU-bound (they are: torch's import)
_STARTED = time.monotonic() - time.process_time()
_announced = False


def configure_threads(num_threads: int | None = None, hidden_size: int | None = None) -> int:
    """Set torch's CPU threads and return how many (the rule is ``choose_threads``).

    Called once at start (work unknown) and again once the backbone is loaded, with its ``hidden_size``. The
    first decision that knows the work, or an override, is logged at info level: ``torch uses N CPU threads: why``.

    Args:
        num_threads: ``--num_threads``; None or 0 leaves the choice to OMP_NUM_THREADS, then to the rule.
        hidden_size: the backbone's ``config.hidden_size``, once loaded; None before.
    Returns:
        The thread count torch now computes with.
    """
    global _announced
    threads, reason = choose_threads(num_threads, hidden_size)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    final = hidden_size is not None or reason in ("--num_threads", "OMP_NUM_THREADS")
    log.log(logging.INFO if final and not _announced else logging.DEBUG, "torch uses %d CPU thread%s: %s",
            threads, "" if threads == 1 else "s", reason)
    _announced = _announced or final
    return threads


def choose_threads(num_threads: int | None = None, hidden_size: int | None = None) -> tuple[int, str]:
    """How many CPU threads torch should use, and why: ``--num_threads`` wins, then OMP_NUM_THREADS, then the rule.

    The rule: 1 for a backbone under ``SMALL_HIDDEN_SIZE`` (a thread per core only adds waiting); otherwise the
    cores torch would use (one per physical core), never more than the CPUs this process may use (affinity mask,
    container quota), shared between the processes of a multi-process run on one machine (LOCAL_WORLD_SIZE), and
    never more than the CPUs other work leaves free (``busy_cpus``), rounded, at least 1. Threads on a core that
    another process holds wait for it, so erring low costs at most the spare cores' share while erring high cost
    2-14x on a loaded 2-core machine (benchmarks/threads.py).

    Args:
        num_threads: ``--num_threads`` (None or 0: not given).
        hidden_size: the backbone's hidden size; None while unknown (before it is loaded).
    Returns:
        ``(threads, reason)``: at least 1; the reason is a short phrase for the log.
    """
    default = _torch_default_threads()  # read before any path below sets a count, so a later call still sees it
    if num_threads:
        return num_threads, "--num_threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    if hidden_size is not None and hidden_size < SMALL_HIDDEN_SIZE:
        return 1, f"hidden size {hidden_size} < {SMALL_HIDDEN_SIZE}, too little work per matmul to split"
    processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    usable = usable_cpus()
    cores = max(1, min(default, usable) // processes)
    busy = busy_cpus()
    free = max(1, round((os.cpu_count() or 1) - busy))
    threads = min(cores, free)
    reason = f"{usable} usable CPUs, {busy:.1f} busy with other work (1-minute load average)"
    return threads, reason + (f", shared by {processes} processes" if processes > 1 else "")


def busy_cpus() -> float:
    """CPUs' worth of other processes' work: the 1-minute load average less this process's own share of it.

    0 where the operating system has no load average (Windows). The load average counts the whole machine (the
    host's, inside a container) and follows work that began seconds ago only partly (it averages a minute).
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    return max(0.0, load - own_load())


def own_load() -> float:
    """This process's share of the 1-minute load average: its mean busy threads (CPU seconds / wall seconds) over
    its life, weighted as the load average weighs a process that started ``wall`` seconds ago."""
    wall = max(time.monotonic() - _STARTED, 1e-3)
    return time.process_time() / wall * (1 - math.exp(-wall / LOAD_WINDOW_S))


@lru_cache(maxsize=1)
def _torch_default_threads() -> int:
    # read once, before any set_num_threads, so a later call can still fall back to the default
    return torch.get_num_threads()


def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_cpu_quota() -> int | None:
    try:
        v2 = Path("/sys/fs/cgroup/cpu.max")
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else math.ceil(int(quota) / int(period))
        v1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        if v1.is_file():
            quota = int(v1.read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            return None if quota <= 0 else math.ceil(quota / period)
    except (OSError, ValueError):
        return None
    return None


@lru_cache(maxsize=1)
def cpu_flags() -> dict[str, bool]:
    """What the CPU can do, from its flags: avx2, avx512f, avx512_bf16, amx (bf16 tiles), vnni (int8 dot).

    Read with ``torch.cpu.get_capabilities()`` (cpuinfo, on Linux, Windows and macOS alike; torch >= 2.8),
    else from ``/proc/cpuinfo``. These are the hardware's flags: ``ATEN_CPU_CAPABILITY`` cannot hide them
    (see ``cpu_has_native_bf16``).
    """
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        c = dict(caps())
        return {"avx2": bool(c.get("avx2")), "avx512f": bool(c.get("avx512_f")),
                "avx512_bf16": bool(c.get("avx512_bf16")), "amx": bool(c.get("amx_bf16")),
                "vnni": bool(c.get("avx512_vnni") or c.get("avx_vnni")), "arm_bf16": bool(c.get("bf16"))}
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text(errors="ignore").split()) if cpuinfo.is_file() else set()
    return {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx": "amx_bf16" in flags, "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}),
            "arm_bf16": "bf16" in flags and platform.machine().lower() in ("arm64", "aarch64")}


# The variables that cap the instruction set of each library torch computes with on x86. ATen's own kernels
# (elementwise, bf16 autocast) follow ATEN_CPU_CAPABILITY, but fp32 matmuls run in MKL, int8 ones in fbgemm and
# bf16 ones in oneDNN, each of which picks its own instructions: emulating an AVX2-only laptop on a newer CPU
# takes all four (fbgemm alone keeps its AVX512-VNNI int8 kernels otherwise, 1.7x faster at 32 rows here).
KERNEL_ISA_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
                   "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def kernel_isa_caps() -> dict[str, str]:
    """The instruction-set caps set in this process's environment, e.g. ``{"FBGEMM_ENABLE_INSTRUCTIONS":
    "AVX2"}``: empty when every library uses the best instructions the CPU has (see ``KERNEL_ISA_CAPS``)."""
    return {name: os.environ[name] for name in KERNEL_ISA_CAPS if os.environ.get(name, "").strip()}


def describe_kernels() -> str:
    """One line: the level ATen's kernels run at and the caps set on the libraries, e.g. ``torch kernels AVX2
    (capped: ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, FBGEMM_ENABLE_INSTRUCTIONS=AVX2,
    MKL_ENABLE_INSTRUCTIONS=AVX2)``, or just ``torch kernels AVX512`` with no cap. A partial cap ends with
    ``; not capped: ...`` naming the rest, since those libraries still run the CPU's newest kernels."""
    text = f"torch kernels {torch.backends.cpu.get_cpu_capability()}"
    caps = kernel_isa_caps()
    if not caps:
        return text
    text += " (capped: " + ", ".join(f"{name}={value}" for name, value in caps.items()) + ")"
    missing = [name for name in KERNEL_ISA_CAPS if name not in caps]
    return text + (f"; not capped: {', '.join(missing)}" if missing else "")


def cpu_has_native_bf16() -> bool:
    """Whether torch computes bf16 natively here: the CPU has AVX512-BF16 or AMX (Arm: BF16) *and* torch is
    allowed to use them: ``ATEN_CPU_CAPABILITY=avx2`` or a ``ONEDNN_MAX_CPU_ISA`` below bf16 (two of the
    ``KERNEL_ISA_CAPS`` that ``--emulate avx2`` sets in the benchmarks) make bf16 run emulated, so not native."""
    flags = cpu_flags()
    if platform.machine().lower() in ("arm64", "aarch64"):
        return flags["arm_bf16"]
    if not (flags["avx512_bf16"] or flags["amx"]):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    onednn_capped = bool(isa) and isa not in ("ALL", "DEFAULT") and not any(
        key in isa for key in ("BF16", "AMX", "FP16", "AVX10"))
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512") and not onednn_capped


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --precision on this device (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def is_sharded(module) -> bool:
    """Whether FSDP2 has sharded this module's parameters across processes."""
    # not imported means nothing was sharded, and answering then skips an import of half a second
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def parameter_counts(module) -> tuple[int, int]:
    """(parameters held by this process, parameters of the whole model): they differ once FSDP has sharded it."""
    held = total = 0
    for param in module.parameters():
        total += param.numel()
        held += param.to_local().numel() if hasattr(param, "to_local") else param.numel()
    return held, total
