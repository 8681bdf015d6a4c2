"""Where and how computation runs: seeding, CPU threads, precision, and the accelerate process group."""
from __future__ import annotations

import logging
import os
import platform
import random
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's CPU threads and return how many: --num_threads wins, then OMP_NUM_THREADS.

    Otherwise one per physical core (torch's default), but never more than the CPUs this process may
    actually use (affinity mask, container CPU quota: torch counts the host's cores, and a container
    limited to 2 of 64 cores would otherwise run 32 threads on 2 CPUs), shared between the processes of a
    multi-process run on one machine.
    """
    if num_threads:
        threads = num_threads
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        threads = max(1, min(_torch_default_threads(), usable_cpus()) // max(local_processes, 1))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    log.debug("torch uses %d CPU threads", threads)
    return threads


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
    import math

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


def cpu_has_native_bf16() -> bool:
    """Whether torch computes bf16 natively here: the CPU has AVX512-BF16 or AMX (Arm: BF16) *and* torch is
    allowed to use them. ``ATEN_CPU_CAPABILITY=avx2`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` make torch run as on an
    AVX2-only laptop (benchmarks/bench_int8.py uses that): bf16 then runs emulated, so it is not native."""
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


def make_accelerator(config):
    """One process or many (``accelerate launch`` / ``torchrun``): the same code path.

    ``--batch_size`` is the global batch, split across processes (``split_batches``), so a run takes the
    same optimiser steps and learning-rate schedule whatever the number of processes. Gradient accumulation
    is done by the training loop (see ``trainer._optimiser_step``), so accelerate's stays at 1.
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState

    use_cpu = config.cpu or not torch.cuda.is_available()
    dtype = autocast_dtype(config.precision, torch.device("cpu" if use_cpu else "cuda"))
    # fp16 on a CPU was refused by options.check_run before this point
    # on CUDA accelerate owns autocast and, for fp16, the GradScaler; on a CPU optqa's own bf16 autocast runs
    # (model.autocast_dtype), which also covers generation, outside the prepared forward
    mixed = "no" if use_cpu or dtype is None else ("bf16" if dtype == torch.bfloat16 else "fp16")
    # accelerate fixes the precision once per process; a second run in the same process (a notebook, the
    # tests) may ask for another. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    plugin = fsdp_plugin(config)
    launcher_flag = os.environ.get("ACCELERATE_USE_FSDP")
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=mixed, fsdp_plugin=plugin,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    # given a plugin, accelerate sets ACCELERATE_USE_FSDP=true for the whole process (and its children), which
    # would turn the next run in this process, or a run it starts, into an FSDP run: only a launcher may set it
    if launcher_flag is None:
        os.environ.pop("ACCELERATE_USE_FSDP", None)
    _settle_sharding(accelerator, plugin)
    if not accelerator.is_main_process:
        # the other processes compute but stay silent: one log, one progress bar, one summary per run
        logging.getLogger().setLevel(logging.WARNING)
        sys.stdout = open(os.devnull, "w")
    return accelerator


def fsdp_plugin(config):
    """FSDP2 as accelerate applies it, for --fsdp: one shard group per decoder layer (the backbone's
    ``_no_split_modules``, which PromptForGeneration passes on), the embeddings, delta prompts and head in the
    root group. Under ``accelerate launch --use_fsdp`` the launcher's FSDP flags (in the environment) apply."""
    from accelerate import FullyShardedDataParallelPlugin

    from .errors import OptqaError

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if os.environ.get("FSDP_VERSION", "1") != "2":
            # FSDP1's flat parameters cannot mix a layer's frozen weights with its delta (short of
            # use_orig_params), and on a CPU accelerate cannot even build its plugin
            raise OptqaError("optqa shards with FSDP2: launch with accelerate launch --use_fsdp --fsdp_version 2, "
                             "or with torchrun and optqa's --fsdp")
        # without a wrap policy the whole model is one shard group, gathered whole for every forward pass
        wrap = {} if os.environ.get("FSDP_AUTO_WRAP_POLICY") else {"auto_wrap_policy": "transformer_based_wrap"}
        return FullyShardedDataParallelPlugin(**wrap)
    if not config.fsdp:
        return None
    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          reshard_after_forward=True, cpu_ram_efficient_loading=False)


def _settle_sharding(accelerator, plugin) -> None:
    """FSDP from --fsdp or from ``accelerate launch --use_fsdp``, which needs several processes."""
    from accelerate.utils import DistributedType

    if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate (1.15) enables FSDP only on accelerators, though its FSDP2 code and torch's fully_shard
        # under it run on CPUs over gloo as they are: the same sharded path then runs (and is tested) here
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    if accelerator.distributed_type == DistributedType.FSDP:
        # OPT's decoder layer returns a view of a fresh tensor, and nothing changes it in place; the 2-process
        # test checks that sharded gradients equal one process's
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPOPTDecoderLayer\) returned a view")
    elif plugin is not None:
        log.warning("--fsdp: a single process has nothing to shard with; training unsharded "
                    "(start several processes with torchrun or accelerate launch)")


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
