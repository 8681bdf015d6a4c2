"""The training loop: delta-only AdamW, dev F1/EM per epoch, best epoch kept, test scored, resumable."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .build import build_model, template_text
from .config import RunConfig
from .data import IGNORE_INDEX, LengthGroupedBatchSampler, collate_for_training, load_split, split_files
from .errors import OptqaError
from .evaluation import evaluate
from .quantize import int8_while_scoring, resolve_quantize
from .reports import plot_learning_curve
from .results import METRICS_NAME, STEPS_NAME, RunFolder
from .runtime import autocast_dtype, configure_threads, is_sharded, make_accelerator, parameter_counts, seed_everything

log = logging.getLogger(__name__)

# Hyperparameters a resumed run must share with the run it continues.
RESUME_MUST_MATCH = ("delta_type", "modified_modules", "bottleneck_dim", "lora_r", "lora_alpha", "lora_dropout",
                     "soft_token_num", "soft_init_text", "prefix_token_num", "batch_size", "max_seq_l", "lr",
                     "weight_decay", "max_grad_norm", "train_epochs", "warmup_steps", "gradient_accumulation_steps",
                     "train_targets", "group_by_length", "seed", "plm_path", "template", "data_path", "train_file")


@dataclass
class TrainState:
    """What --resume needs besides the weights and the optimiser."""
    epoch: int = 0  # epoch in progress
    batches_done: int = 0  # batches of that epoch already consumed
    global_step: int = 0  # optimiser steps so far
    best_epoch: int = -1
    best_dev: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # one metrics row per finished epoch
    epoch_losses: list = field(default_factory=list)  # losses of the epoch in progress
    run_dir: str = ""


def ensure_training_data(config: RunConfig) -> None:
    """ARC-DA is fetched only when no split file exists and none was named.

    A folder holding some of the splits is the user's own data with a file missing: reading it then reports the
    missing file, where a download would have replaced the files that are there.
    """
    files = split_files(config)
    if any(getattr(config, f"{s}_file") for s in files) or any(p.is_file() for p in files.values()):
        return
    from .download import ensure_data

    log.info("%s has no ARC-DA files: downloading", config.data_path)
    ensure_data(Path(config.data_path), url=config.data_url, allow_checksum_mismatch=config.allow_checksum_mismatch)


def train(config: RunConfig) -> dict:
    """Train the delta ``config`` describes; returns the run's summary (scores, paths, wall time).

    Raises:
        OptqaError: a refused combination of options, a length budget over the backbone's positions, bad data,
            a bad backbone or checkpoint folder: all before the backbone is loaded where they can be.
    """
    from .options import check_length_budget, check_run
    from .plm import backbone_max_positions

    started = time.perf_counter()
    check_run(config)
    check_length_budget(config, backbone_max_positions(config.plm_path), config.plm_path)
    accelerator = make_accelerator(config)
    main = accelerator.is_main_process
    configure_threads(config.num_threads)
    seed_everything(config.seed)
    if main:
        ensure_training_data(config)
    accelerator.wait_for_everyone()
    # read (and validate) every split before the slow backbone load
    examples = {split: load_split(config, split) for split in ("train", "dev", "test")}
    ckpt.ensure_replaceable(config.delta_save_path)

    model, backbone = build_model(config)
    model.autocast_dtype = autocast_dtype(config.precision, accelerator.device)
    if config.gradient_checkpointing:
        # non-reentrant: works with a frozen embedding (no input needs a gradient) and under DDP
        if hasattr(model.backbone, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapper = model.wrapper
    train_set = wrapper.encode_all(examples["train"], targets=config.train_targets, desc="tokenising train")
    dev_set = wrapper.encode_all(examples["dev"], desc="tokenising dev")
    test_set = wrapper.encode_all(examples["test"], desc="tokenising test")

    sampler = LengthGroupedBatchSampler([len(e) for e in train_set], config.batch_size, seed=config.seed,
                                        group_by_length=config.group_by_length)
    # its own generator: starting an epoch's iterator then draws no number from the global RNG, so dropout
    # sees the same random stream whether an epoch starts fresh or resumes mid-way (--resume)
    loader = torch.utils.data.DataLoader(_Weighted(train_set),
                                         batch_sampler=ProcessShard(sampler, accelerator.process_index,
                                                                    accelerator.num_processes),
                                         collate_fn=partial(_collate_weighted, pad_id=model.tokenizer.pad_token_id),
                                         generator=torch.Generator().manual_seed(config.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, steps_per_epoch * config.train_epochs)
    # the loader is not prepared: ProcessShard already gives this process its part of each global batch
    prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # FSDP replaces each parameter by its shard: clip the ones the optimiser now holds
    params = [p for p in model.parameters() if p.requires_grad]
    if is_sharded(model):
        held, total = parameter_counts(model)
        log.info("FSDP: each of %d processes holds its shard of the backbone, here %s of %s parameters",
                 accelerator.num_processes, f"{held:,}", f"{total:,}")

    # the scores this run reports: on the training precision, int8 only when asked for by name (auto is none here)
    scoring = resolve_quantize("int8" if config.quantize == "int8" else "none", config.precision, accelerator.device,
                               sharded=is_sharded(model))

    raw_root = Path(config.raw_delta_save_path)
    resume_dir = raw_root / ckpt.RESUME_DIR_NAME
    state = TrainState()
    if config.resume:
        state = _load_resume(resume_dir, config, model, optimizer, scheduler, backbone, accelerator)
    run = RunFolder(Path(state.run_dir), main) if state.run_dir else RunFolder.create(config.output_dir, "train", main)
    if config.resume:
        _trim_run_logs(run, state)
    state.run_dir = str(run.path.resolve())
    run.write_config(config)
    manifest_base = dict(delta_config=model.delta.config.to_dict(), template_text=template_text(config),
                         backbone=backbone, hyperparameters=config.to_dict(),
                         trainable_parameters=model.num_trainable_parameters())

    def save_resume() -> None:
        # gathering the delta, the optimiser state and the RNGs takes every process; then one writes
        delta, optimiser_state = model.delta_state_dict(), _whole_optimizer_state(model, optimizer)
        rngs = _every_process_rng_state()
        if not main:
            return
        extra = partial(_write_training_state, state=state, optimizer_state=optimiser_state, scheduler=scheduler,
                        rngs=rngs)
        ckpt.save_checkpoint(resume_dir, delta,
                             ckpt.build_manifest(**manifest_base, metrics={"history": state.history}), extra)

    best_state = None
    if state.best_epoch >= 0:
        _, _, best_state = ckpt.read_checkpoint(raw_root / ckpt.BEST_DIR_NAME)
    stop = False
    for epoch in range(state.epoch, config.train_epochs):
        state.epoch = epoch
        sampler.set_epoch(epoch)
        prepared.train()
        batches = accelerator.skip_first_batches(loader, state.batches_done) if state.batches_done else loader
        progress = tqdm(batches, desc=f"epoch {epoch + 1}/{config.train_epochs}", disable=not main,
                        initial=state.batches_done, total=len(loader))
        # the epoch's losses so far live in the resume state, so a resumed epoch reports the same mean loss
        losses, step_rows = state.epoch_losses, []
        for window in _windows(progress, config.gradient_accumulation_steps):
            value = _optimiser_step(window, prepared, accelerator, optimizer, scheduler, params, config)
            state.batches_done += len(window)
            losses.append(value)
            state.global_step += 1
            step_rows.append({"step": state.global_step, "epoch": epoch + 1, "loss": round(value, 6)})
            progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if config.save_steps and state.global_step % config.save_steps == 0:
                run.append(STEPS_NAME, step_rows)
                step_rows = []
                save_resume()
            if config.max_steps and state.global_step >= config.max_steps:
                stop = True
                break
        progress.close()
        run.append(STEPS_NAME, step_rows)
        if stop and state.batches_done < len(loader):
            save_resume()
            log.info("stopped after %d optimiser steps (--max_steps)", state.global_step)
            break
        prepared.eval()
        with int8_while_scoring(model, scoring):
            dev_metrics, dev_rows = evaluate(model, dev_set, config.eval_batch_size, f"dev epoch {epoch + 1}",
                                             accelerator)
        row = {"epoch": epoch + 1, "train_loss": round(sum(losses) / max(len(losses), 1), 6) if losses else None,
               "dev_f1": dev_metrics["f1"], "dev_em": dev_metrics["em"], "step": state.global_step}
        state.history.append(row)
        run.append(METRICS_NAME, [row])
        log.info("epoch %d: train loss %s, dev F1 %.2f, EM %.2f", epoch + 1, row["train_loss"], row["dev_f1"],
                 row["dev_em"])
        # ties go to the later epoch: with equal dev F1 the more trained delta is the better bet
        if dev_metrics["f1"] >= state.best_dev.get("f1", -1.0):
            state.best_epoch, state.best_dev = epoch + 1, dev_metrics
            best_state = {k: v.clone() for k, v in model.delta_state_dict().items()}
            run.write_predictions("dev", dev_rows)
            if main:
                ckpt.save_checkpoint(raw_root / ckpt.BEST_DIR_NAME, best_state, ckpt.build_manifest(
                    **manifest_base, metrics={"best_epoch": state.best_epoch, "dev": dev_metrics}))
        state.epoch, state.batches_done, state.epoch_losses = epoch + 1, 0, []
        save_resume()
        if stop:
            break

    if best_state is None:
        raise OptqaError("training stopped before the first epoch ended: no delta to save (see --max_steps)")
    model.load_delta_state_dict(best_state, "best epoch")
    prepared.eval()
    with int8_while_scoring(model, scoring):
        test_metrics, test_rows = evaluate(model, test_set, config.eval_batch_size, "test", accelerator)
    run.write_predictions("test", test_rows)
    truncated = {name: sum(e.truncated for e in encoded)
                 for name, encoded in (("train", train_set), ("dev", dev_set), ("test", test_set))}
    run.append(METRICS_NAME, [{"split": "test", "best_epoch": state.best_epoch, "test_f1": test_metrics["f1"],
                               "test_em": test_metrics["em"], "dev_f1": state.best_dev["f1"],
                               "dev_em": state.best_dev["em"], "truncated": truncated, "quantize": scoring}])
    metrics = {"best_epoch": state.best_epoch, "dev": state.best_dev, "test": test_metrics,
               "history": state.history}
    final = Path(config.delta_save_path)
    if main:
        ckpt.save_checkpoint(final, best_state, ckpt.build_manifest(**manifest_base, metrics=metrics))
    plot = plot_learning_curve(run.path) if main else None
    summary = {"run_dir": str(run.path), "delta_save_path": str(final), "best_epoch": state.best_epoch,
               "dev_f1": state.best_dev["f1"], "dev_em": state.best_dev["em"], "test_f1": test_metrics["f1"],
               "test_em": test_metrics["em"], "wall_time_s": round(time.perf_counter() - started, 1),
               "checkpoint_bytes": (final / ckpt.WEIGHTS_NAME).stat().st_size if main else None,
               "truncated": truncated, "plot": str(plot) if plot else None}
    accelerator.wait_for_everyone()
    return summary


class _Weighted(torch.utils.data.Dataset):
    """Training examples looked up by ``(index, weight)``: weight 0 marks a stand-in row (see ProcessShard)."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key):
        index, weight = key
        return self.examples[index], weight


def _collate_weighted(items, pad_id: int) -> dict:
    batch = collate_for_training([example for example, _ in items], pad_id=pad_id)
    batch["weight"] = torch.tensor([weight for _, weight in items])
    return batch


class ProcessShard(torch.utils.data.Sampler):
    """This process's rows of every global batch: rows ``rank``, ``rank + world``, ... of it.

    accelerate's own sharding (BatchSamplerShard) either pads a short last batch with repeated examples,
    which changes the gradient, or leaves some process without a batch, which hangs DDP. Here every process
    gets one batch per global batch: when its share is empty (a last batch smaller than the number of
    processes) it runs one row of the batch with weight 0, which adds nothing to the loss or the gradient.
    """

    def __init__(self, batch_sampler, rank: int = 0, world: int = 1):
        self.batch_sampler = batch_sampler
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            mine = batch[self.rank::self.world]
            yield [(i, 1) for i in mine] if mine else [(batch[0], 0)]


def _windows(batches, size: int):
    """Groups of ``size`` consecutive batches (the last may be shorter): one optimiser step each."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _optimiser_step(window, prepared, accelerator, optimizer, scheduler, params, config) -> float:
    """One optimiser step over a window of batches (gradient accumulation); returns its mean token loss.

    The gradient is that of (sum of the losses of every answer token of the window, on every process) /
    (their number): exactly the single-process gradient on the same global batch, whatever the number of
    processes, the accumulation steps or how unevenly the answer tokens fall. Hence the window is read
    first (its token count is needed before the first backward) and accumulation is done here rather than
    by accelerate's ``accumulate``, which averages per-batch means.
    """
    from accelerate.utils import send_to_device

    window = [send_to_device(batch, accelerator.device) for batch in window]
    counts = [((batch["labels"] != IGNORE_INDEX).sum(dim=1) * batch.pop("weight")).sum() for batch in window]
    total = accelerator.reduce(torch.stack(counts).sum(), "sum").clamp(min=1)
    # DDP averages gradients over processes: the factor world / total turns that mean into the exact sum / total
    scale = accelerator.num_processes / total
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, (batch, count) in enumerate(zip(window, counts)):
        last = i == len(window) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(prepared):
            mean = prepared(batch)
            accelerator.backward(mean * (count * scale))
        loss_sum += mean.detach().float() * count
    if config.max_grad_norm:
        accelerator.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return (accelerator.reduce(loss_sum, "sum") / total).item()


def _state_dict_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def _whole_optimizer_state(model, optimizer) -> dict:
    """AdamW's state keyed by parameter name, whole tensors on the CPU: the same file whether it was written
    by one process, by DDP or by FSDP (whose moments are sharded like the parameters)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer.optimizer, options=_state_dict_options(cpu_offload=True))


def _every_process_rng_state() -> list[dict]:
    """Each process's torch (and CUDA) RNG state, by process index: their dropout masks differ, and each
    process continues its own stream on --resume."""
    from accelerate.utils import gather_object  # one process: the list as it is

    return gather_object([{"torch": torch.get_rng_state(),
                           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}])


def _write_training_state(folder: Path, state: TrainState, optimizer_state: dict, scheduler,
                          rngs: list[dict]) -> None:
    """The resume state beside the delta weights: optimiser, schedule, RNGs, position. Tensors, lists and
    numbers only, so --resume reads it with ``weights_only=True``."""
    version, python_state, gauss = random.getstate()
    torch.save({"train_state": dict(state.__dict__), "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(), "process_rngs": rngs,
                "python_rng": list(python_state), "python_rng_pos": gauss}, folder / ckpt.RESUME_STATE_NAME)


def _load_resume(resume_dir: Path, config: RunConfig, model, optimizer, scheduler, backbone: dict,
                 accelerator) -> TrainState:
    if not (ckpt.resolve_folder(resume_dir) / ckpt.MANIFEST_NAME).is_file():
        raise OptqaError(f"--resume: no interrupted run to continue in {resume_dir} (check --raw_delta_save_path)")
    folder, manifest, delta = ckpt.read_checkpoint(resume_dir)
    if ckpt.RESUME_STATE_NAME not in manifest["files"]:
        raise OptqaError(f"--resume: {folder} holds no {ckpt.RESUME_STATE_NAME}; it is not a resume state")
    saved = manifest["hyperparameters"]
    changed = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(config, k)]
    if changed:
        k = changed[0]
        raise OptqaError(f"--resume: {k} was {saved.get(k)!r} in the interrupted run, now {getattr(config, k)!r}; "
                         "resume with the same settings")
    if manifest["template"] != template_text(config):
        raise OptqaError(f"--resume: the text of template {config.template} changed since the interrupted run; "
                         "resume with the same template")
    ckpt.check_backbone(manifest, backbone, backbone["fingerprint"], config.ignore_backbone_mismatch)
    # the state file was hash-checked with the folder; weights_only keeps it from running code regardless
    blob = torch.load(folder / ckpt.RESUME_STATE_NAME, map_location="cpu", weights_only=True)
    model.load_delta_state_dict(delta, str(folder))
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer.optimizer, blob["optimizer"], options=_state_dict_options())
    scheduler.load_state_dict(blob["scheduler"])
    rngs = blob["process_rngs"]
    if len(rngs) != accelerator.num_processes:
        log.warning("--resume: the interrupted run had %d processes, this one %d: the global batches and the "
                    "maths are the same, but dropout draws other random numbers than an uninterrupted run",
                    len(rngs), accelerator.num_processes)
    rng = rngs[accelerator.process_index % len(rngs)]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate((3, tuple(blob["python_rng"]), blob["python_rng_pos"]))
    state = TrainState(**blob["train_state"])
    if state.epoch >= config.train_epochs:
        log.info("--resume: the run in %s already finished its %d epochs; scoring and saving its best delta",
                 resume_dir, config.train_epochs)
    else:
        log.info("resuming at epoch %d, batch %d (optimiser step %d)", state.epoch + 1, state.batches_done,
                 state.global_step)
    return state


def _trim_run_logs(run: RunFolder, state: TrainState) -> None:
    """Drop log rows written after the resume state was saved (and a line cut short by the kill): the
    resumed run writes them again."""
    if not run.enabled:
        return
    kept = {STEPS_NAME: lambda row: row.get("step", 0) <= state.global_step,
            METRICS_NAME: lambda row: "epoch" in row and row["epoch"] <= len(state.history)}
    for name, keep in kept.items():
        path = run.path / name
        if not path.is_file():
            continue
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and keep(row):
                rows.append(row)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
