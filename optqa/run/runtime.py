"""The accelerate process group a run computes in: one process or many (DDP, FSDP2), on CPUs or GPUs.

Building it has no side effects on the process beyond accelerate's own: logging, stdout and warning filters
belong to the entry point (``optqa.cli``) and to the recipe's scoped ``quiet_fsdp_views``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch

from optqa.errors import OptqaError
from optqa.hardware import autocast_dtype

log = logging.getLogger(__name__)


def make_accelerator(config):
    """One process or many (``accelerate launch`` / ``torchrun``): the same code path.

    ``--batch_size`` is the global batch, split across processes (``split_batches``), so a run takes the
    same optimiser steps and learning-rate schedule whatever the number of processes. Gradient accumulation
    is done by the training loop (see ``optqa.run.training._optimiser_step``), so accelerate's stays at 1.
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration

    use_cpu = config.cpu or not torch.cuda.is_available()
    dtype = autocast_dtype(config.precision, torch.device("cpu" if use_cpu else "cuda"))
    # fp16 on a CPU was refused by options.check_run before this point
    # on CUDA accelerate owns autocast and, for fp16, the GradScaler; on a CPU optqa's own bf16 autocast runs
    # (model.autocast_dtype), which also covers generation, outside the prepared forward
    mixed = "no" if use_cpu or dtype is None else ("bf16" if dtype == torch.bfloat16 else "fp16")
    # accelerate fixes the precision once per process: a later run in the same process (a notebook) that asks
    # for another gets accelerate's own error telling it to restart; on a CPU it is always "no"
    plugin = fsdp_plugin(config)
    launcher_flag = os.environ.get("ACCELERATE_USE_FSDP")
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=mixed, fsdp_plugin=plugin,
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              log_with=config.report_to or None,
                              # trackers with files (tensorboard) need a folder now; the run folder, made later,
                              # replaces it before they start (optqa.run.trackers.start)
                              project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=config.output_dir))
    # given a plugin, accelerate sets ACCELERATE_USE_FSDP=true for the whole process (and its children), which
    # would turn the next run in this process, or a run it starts, into an FSDP run: only a launcher may set it
    if launcher_flag is None:
        os.environ.pop("ACCELERATE_USE_FSDP", None)
    _settle_sharding(accelerator, plugin)
    return accelerator


def fsdp_plugin(config):
    """FSDP2 as accelerate applies it, for --fsdp: one shard group per decoder layer (the backbone's
    ``_no_split_modules``, which PromptForGeneration passes on), the embeddings, delta prompts and head in the
    root group. Under ``accelerate launch --use_fsdp`` the launcher's FSDP flags (in the environment) apply."""
    from accelerate import FullyShardedDataParallelPlugin

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
    if accelerator.distributed_type != DistributedType.FSDP and plugin is not None:
        log.warning("--fsdp: a single process has nothing to shard with; training unsharded "
                    "(start several processes with torchrun or accelerate launch)")


@contextlib.contextmanager
def quiet_fsdp_views():
    """Within this block only: silence FSDP2's warning that OPT's decoder layer returns a view. The layer returns a
    view of a fresh tensor that nothing changes in place; the 2-process test checks that sharded gradients equal
    one process's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPOPTDecoderLayer\) returned a view")
        yield
