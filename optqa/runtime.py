"""Where and how computation runs: seeding, CPU threads, precision, and the accelerate process group."""
from __future__ import annotations

import logging
import os
import platform
import random
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def configure_threads(num_threads: int | None) -> None:
    """--num_threads wins; else OMP_NUM_THREADS if set; else torch's default (one per physical core)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively; elsewhere bf16 on a CPU is emulated and slower."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = cpuinfo.read_text(errors="ignore")
        return "avx512_bf16" in flags or "amx_bf16" in flags
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return "AMX" in capability or (platform.machine().lower() in ("arm64", "aarch64") and "SVE" in capability)


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
    """One process or many (``accelerate launch`` / ``torchrun``): the same code path."""
    from accelerate import Accelerator

    use_cpu = config.cpu or not torch.cuda.is_available()
    return Accelerator(cpu=use_cpu, gradient_accumulation_steps=config.gradient_accumulation_steps)
