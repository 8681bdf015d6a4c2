"""The training loop: delta-only AdamW, dev F1/EM per epoch, best epoch kept, test scored, resumable."""
from __future__ import annotations

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
from .data import LengthGroupedBatchSampler, collate_for_training, load_split, split_files
from .errors import OptqaError
from .evaluation import evaluate
from .results import METRICS_NAME, STEPS_NAME, RunFolder
from .runtime import autocast_dtype, configure_threads, make_accelerator, seed_everything

log = logging.getLogger(__name__)

# Hyperparameters a resumed run must share with the run it continues.
RESUME_MUST_MATCH = ("delta_type", "modified_modules", "bottleneck_dim", "lora_r", "lora_alpha", "soft_token_num",
                     "prefix_token_num", "batch_size", "max_seq_l", "lr", "weight_decay", "train_epochs",
                     "warmup_steps", "gradient_accumulation_steps", "train_targets", "group_by_length", "seed",
                     "plm_path", "template")


@dataclass
class TrainState:
    """What --resume needs besides the weights and the optimiser."""
    epoch: int = 0  # epoch in progress
    batches_done: int = 0  # batches of that epoch already consumed
    global_step: int = 0  # optimiser steps so far
    best_epoch: int = -1
    best_dev: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # one metrics row per finished epoch
    run_dir: str = ""


def ensure_training_data(config: RunConfig) -> None:
    """ARC-DA is fetched when --data_path is missing and no per-split files were named."""
    files = split_files(config)
    if any(getattr(config, f"{s}_file") for s in files) or all(p.is_file() for p in files.values()):
        return
    from .download import ensure_data

    log.info("%s has no ARC-DA files: downloading", config.data_path)
    ensure_data(Path(config.data_path), url=config.data_url, allow_checksum_mismatch=config.allow_checksum_mismatch)


def train(config: RunConfig) -> dict:
    started = time.perf_counter()
    accelerator = make_accelerator(config)
    main = accelerator.is_main_process
    configure_threads(config.num_threads)
    seed_everything(config.seed)
    if main:
        ensure_training_data(config)
    accelerator.wait_for_everyone()
    # read (and validate) every split before the slow backbone load
    examples = {split: load_split(config, split) for split in ("train", "dev", "test")}

    model, backbone = build_model(config)
    model.autocast_dtype = autocast_dtype(config.precision, accelerator.device)
    if config.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapper = model.wrapper
    train_set = wrapper.encode_all(examples["train"], targets=config.train_targets, desc="tokenising train")
    dev_set = wrapper.encode_all(examples["dev"], desc="tokenising dev")
    test_set = wrapper.encode_all(examples["test"], desc="tokenising test")

    sampler = LengthGroupedBatchSampler([len(e) for e in train_set], config.batch_size, seed=config.seed,
                                        group_by_length=config.group_by_length)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler,
                                         collate_fn=partial(collate_for_training, pad_id=model.tokenizer.pad_token_id))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, steps_per_epoch * config.train_epochs)
    prepared, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    raw_root = Path(config.raw_delta_save_path)
    resume_dir = raw_root / ckpt.RESUME_DIR_NAME
    state = TrainState()
    if config.resume:
        state = _load_resume(resume_dir, config, model, optimizer, scheduler)
    run = RunFolder(Path(state.run_dir), main) if state.run_dir else RunFolder.create(config.output_dir, "train", main)
    state.run_dir = str(run.path)
    run.write_config(config)
    manifest_base = dict(delta_config=model.delta.config.to_dict(), template_text=template_text(config),
                         backbone=backbone, hyperparameters=config.to_dict(),
                         trainable_parameters=model.num_trainable_parameters())

    def save_resume() -> None:
        if not main:
            return
        extra = partial(_write_training_state, state=state, optimizer=optimizer, scheduler=scheduler)
        ckpt.save_checkpoint(resume_dir, model.delta_state_dict(),
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
        losses, step_rows = [], []
        for batch in progress:
            with accelerator.accumulate(prepared):
                loss = prepared(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.batches_done += 1
            value = accelerator.reduce(loss.detach(), "mean").item()
            losses.append(value)
            if accelerator.sync_gradients:
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
        dev_metrics, dev_rows = evaluate(model, dev_set, config.eval_batch_size, f"dev epoch {epoch + 1}", accelerator)
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
        state.epoch, state.batches_done = epoch + 1, 0
        save_resume()
        if stop:
            break

    if best_state is None:
        raise OptqaError("training stopped before the first epoch ended: no delta to save (see --max_steps)")
    model.load_delta_state_dict(best_state, "best epoch")
    prepared.eval()
    test_metrics, test_rows = evaluate(model, test_set, config.eval_batch_size, "test", accelerator)
    run.write_predictions("test", test_rows)
    run.append(METRICS_NAME, [{"split": "test", "best_epoch": state.best_epoch, "test_f1": test_metrics["f1"],
                               "test_em": test_metrics["em"]}])
    metrics = {"best_epoch": state.best_epoch, "dev": state.best_dev, "test": test_metrics,
               "history": state.history}
    final = Path(config.delta_save_path)
    if main:
        ckpt.save_checkpoint(final, best_state, ckpt.build_manifest(**manifest_base, metrics=metrics))
    summary = {"run_dir": str(run.path), "delta_save_path": str(final), "best_epoch": state.best_epoch,
               "dev_f1": state.best_dev["f1"], "dev_em": state.best_dev["em"], "test_f1": test_metrics["f1"],
               "test_em": test_metrics["em"], "wall_time_s": round(time.perf_counter() - started, 1),
               "checkpoint_bytes": (final / ckpt.WEIGHTS_NAME).stat().st_size if main else None}
    accelerator.wait_for_everyone()
    return summary


def _write_training_state(folder: Path, state: TrainState, optimizer, scheduler) -> None:
    torch.save({"train_state": state.__dict__, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                "python_rng": list(random.getstate()[1]), "python_rng_pos": random.getstate()[2]},
               folder / ckpt.RESUME_STATE_NAME)


def _load_resume(resume_dir: Path, config: RunConfig, model, optimizer, scheduler) -> TrainState:
    if not (resume_dir / ckpt.MANIFEST_NAME).is_file() and not ckpt.resolve_folder(resume_dir).exists():
        raise OptqaError(f"--resume: no interrupted run in {resume_dir}")
    folder, manifest, delta = ckpt.read_checkpoint(resume_dir)
    saved = manifest["hyperparameters"]
    changed = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(config, k)]
    if changed:
        k = changed[0]
        raise OptqaError(f"--resume: {k} was {saved.get(k)!r} in the interrupted run, now {getattr(config, k)!r}; "
                         "resume with the same settings")
    # the state file was hash-checked with the folder; weights_only keeps it from running code regardless
    blob = torch.load(folder / ckpt.RESUME_STATE_NAME, map_location="cpu", weights_only=True)
    model.load_delta_state_dict(delta, str(folder))
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate((3, tuple(blob["python_rng"]), blob["python_rng_pos"]))
    state = TrainState(**blob["train_state"])
    log.info("resuming at epoch %d, batch %d (optimiser step %d)", state.epoch + 1, state.batches_done,
             state.global_step)
    return state
