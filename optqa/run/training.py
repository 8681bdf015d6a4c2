"""Training a delta, as a recipe that reads top to bottom (after torchtune's recipes and litgpt's finetune scripts).

``python -m optqa --mode train`` is ``TrainingRecipe(config).run()``:

1. ``setup_runtime``: refuse bad option pairs and length budgets, start the accelerate process group, seed.
2. ``setup_data``: fetch ARC-DA if there is none, read and validate every split (before the slow backbone load).
3. ``setup_model``: backbone + delta + template (``build_model``), precision, tokenised splits.
4. ``setup_optimizer``: length-grouped batches sharded over processes, delta-only AdamW, linear schedule.
5. ``setup_run_folder``: a new run folder, or the interrupted run's state and folder (``--resume``).
6. ``train``: per epoch, ``train_epoch`` (optimiser steps, resume state every ``--save_steps``) then
   ``evaluate_and_keep_best`` (dev F1/EM; the best epoch's delta kept in ``--raw_delta_save_path``).
7. ``finish``: test scores of the best delta, the final checkpoint, the learning-curve plot: a ``TrainSummary``.

The loss is the exact mean over answer tokens of each global batch, whatever the number of processes or
accumulation steps (``_optimiser_step``); a resumed run ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from optqa.answering import int8_while_scoring
from optqa.build import build_model, template_text
from optqa.checkpoints import format as ckpt
from optqa.config import RunConfig
from optqa.data import IGNORE_INDEX, LengthGroupedBatchSampler, collate_for_training, load_split, split_files
from optqa.errors import OptqaError
from optqa.hardware import autocast_dtype, configure_threads, is_sharded, parameter_counts
from optqa.quantize import resolve_quantize
from optqa.run import trackers
from optqa.run.evaluation import evaluate
from optqa.run.folder import METRICS_NAME, STEPS_NAME, RunFolder, plot_learning_curve
from optqa.run.runtime import make_accelerator, quiet_fsdp_views

log = logging.getLogger(__name__)


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


class RunNotSaved(OptqaError):
    """A file of the run could not be written (a full disk, a folder gone read-only): the run stops here, and
    ``--resume`` continues it from its last complete resume state once the file can be written. The command
    line adds the exact command (``optqa.cli``); the message says what was not written and what is intact."""

    resumable = True


@dataclass
class TrainSummary:
    """What a training run reports. Scores are SQuAD token F1 / exact match in percent."""
    run_dir: str  # the run folder: config, metrics, per-step losses, predictions, plot
    delta_save_path: str  # the final (best-dev-epoch) checkpoint folder
    best_epoch: int  # 1-based
    dev_f1: float  # of the best epoch
    dev_em: float
    test_f1: float  # of the best epoch's delta
    test_em: float
    wall_time_s: float
    checkpoint_bytes: int | None  # size of the saved weights file (None on processes other than the first)
    truncated: dict[str, int]  # per split, examples whose question was cut to fit --max_seq_l
    plot: str | None  # learning-curve PNG, where matplotlib could draw it
    main_process: bool = True  # False on the other processes of a multi-process run, which print nothing


def ensure_training_data(config: RunConfig) -> None:
    """ARC-DA is fetched only when no split file exists and none was named.

    A folder holding some of the splits is the user's own data with a file missing: reading it then reports the
    missing file, where a download would have replaced the files that are there.
    """
    files = split_files(config)
    if any(getattr(config, f"{s}_file") for s in files) or any(p.is_file() for p in files.values()):
        return
    from optqa.download import ensure_data

    log.info("%s has no ARC-DA files: downloading", config.data_path)
    ensure_data(Path(config.data_path), url=config.data_url, allow_checksum_mismatch=config.allow_checksum_mismatch)


def train(config: RunConfig, on_step: Callable[[int], None] | None = None) -> TrainSummary:
    """Train the delta ``config`` describes: ``TrainingRecipe(config, on_step).run()``."""
    return TrainingRecipe(config, on_step).run()


class TrainingRecipe:
    """One training run, step by step (see the module docstring for the order).

    Args:
        config: the run's settings.
        on_step: called with the global step after each optimiser step (and after a resume state it triggered
            was written); raising ``KeyboardInterrupt`` there stops the run as Ctrl-C would, at an exact step.
    Raises:
        OptqaError: a refused combination of options, a length budget over the backbone's positions, bad data,
            a bad backbone or checkpoint folder: all before the backbone is loaded where they can be.
    """

    def __init__(self, config: RunConfig, on_step: Callable[[int], None] | None = None):
        self.config = config
        self.on_step = on_step or (lambda step: None)

    def run(self) -> TrainSummary:
        """Set up, train, finish: the whole run; see the module docstring for the steps.

        Returns:
            The run's ``TrainSummary``.
        """
        self.started = time.perf_counter()
        self.setup_runtime()
        self.setup_data()
        self.setup_model()
        self.setup_optimizer()
        self.setup_run_folder()
        with quiet_fsdp_views():
            self.train()
            summary = self.finish()
        # Only after a run that ended well: after an error another process may still wait in a collective, which
        # ending the process group would wait for.
        self.end_process_group()
        return summary

    def end_process_group(self) -> None:
        """End the process group this run started, while the interpreter is whole, its gloo worker threads idle.

        Left to interpreter shutdown, a worker still releasing its last collective's work could touch Python as
        it was torn down and abort the process now and then under load ("terminate called without an active
        exception", exit -6; pytorch#65513). And the order matters: DDP's ``Reducer`` holds the process group
        through a C++ pointer whose release keeps the GIL, while a worker releasing a finished work (tensors
        Python owns) needs the GIL, so a Reducer freed after ``destroy_process_group`` could join the workers
        holding it and deadlock (seen under load: the main thread in ``~ProcessGroupGloo`` under
        ``~Reducer``, the worker in ``~AsyncBarrierWork`` waiting for the GIL). So the prepared model (and
        accelerate's own references to it) go first; the group's last reference is then Python's, whose release
        lets go of the GIL while the workers are joined.
        """
        self.prepared = self.optimizer = self.scheduler = None
        self.accelerator.free_memory()  # accelerate's lists of prepared objects, then the garbage collector
        self.accelerator.end_training()

    # ------------------------------------------------------------------------------------------------ set-up

    def setup_runtime(self) -> None:
        """Refuse bad option pairs and a length budget over the backbone's positions (from its config, before its
        weights load), start the accelerate process group, set the threads and seed every RNG (accelerate's
        ``set_seed``: python, numpy, torch).
        """
        from accelerate.utils import set_seed

        from optqa.options import check_length_budget, check_run
        from optqa.plm import backbone_max_positions

        config = self.config
        check_run(config)
        trackers.check_trackers(config.report_to)
        check_length_budget(config, backbone_max_positions(config.plm_path), config.plm_path)
        self.accelerator = make_accelerator(config)
        self.main = self.accelerator.is_main_process
        configure_threads(config.num_threads)
        set_seed(config.seed)

    def setup_data(self) -> None:
        """Fetch ARC-DA where no split exists (first process only), then read and validate every split: a bad row
        stops the run here, naming its file and line, before the backbone loads.
        """
        if self.main:
            ensure_training_data(self.config)
        self.accelerator.wait_for_everyone()
        self.examples = {split: load_split(self.config, split) for split in ("train", "dev", "test")}
        ckpt.ensure_replaceable(self.config.delta_save_path)

    def setup_model(self) -> None:
        """The backbone with the delta attached and the template (``build_model``), its precision, gradient
        checkpointing where asked, and the three splits tokenised.
        """
        config = self.config
        self.template_text = template_text(config)  # read once: the model, the manifest and --resume use this text
        self.model, self.backbone = build_model(config, template=self.template_text, source=config.template)
        configure_threads(config.num_threads, hidden_size=self.model.backbone.config.hidden_size)
        self.model.autocast_dtype = autocast_dtype(config.precision, self.accelerator.device)
        if config.gradient_checkpointing:
            # non-reentrant: works with a frozen embedding (no input needs a gradient) and under DDP
            backbone = self.model.backbone
            if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
                backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        wrapper = self.model.wrapper
        self.train_set = wrapper.encode_all(self.examples["train"], targets=config.train_targets,
                                            desc="tokenising train")
        self.dev_set = wrapper.encode_all(self.examples["dev"], desc="tokenising dev")
        self.test_set = wrapper.encode_all(self.examples["test"], desc="tokenising test")

    def setup_optimizer(self) -> None:
        """Length-grouped batches, each process taking its rows of every global batch; AdamW over the delta's
        parameters with a linear warm-up/decay schedule; the model prepared by accelerate (DDP or FSDP2).
        """
        from transformers import get_linear_schedule_with_warmup

        config, model, accelerator = self.config, self.model, self.accelerator
        self.sampler = LengthGroupedBatchSampler([len(e) for e in self.train_set], config.batch_size,
                                                 seed=config.seed, group_by_length=config.group_by_length)
        # its own generator: starting an epoch's iterator then draws no number from the global RNG, so dropout
        # sees the same random stream whether an epoch starts fresh or resumes mid-way (--resume)
        self.loader = torch.utils.data.DataLoader(
            _Weighted(self.train_set),
            batch_sampler=ProcessShard(self.sampler, accelerator.process_index, accelerator.num_processes),
            collate_fn=partial(_collate_weighted, pad_id=model.tokenizer.pad_token_id),
            generator=torch.Generator().manual_seed(config.seed))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                      weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(len(self.loader) / config.gradient_accumulation_steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps,
                                                    steps_per_epoch * config.train_epochs)
        # the loader is not prepared: ProcessShard already gives this process its part of each global batch
        self.prepared, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        # FSDP replaces each parameter by its shard: clip the ones the optimiser now holds
        self.params = [p for p in model.parameters() if p.requires_grad]
        if is_sharded(model):
            held, total = parameter_counts(model)
            log.info("FSDP: each of %d processes holds its shard of the backbone, here %s of %s parameters",
                     accelerator.num_processes, f"{held:,}", f"{total:,}")
        # the scores this run reports: on the training precision, int8 only when asked for by name (auto: none)
        self.scoring = resolve_quantize("int8" if config.quantize == "int8" else "none", config.precision,
                                        accelerator.device, sharded=is_sharded(model))

    def setup_run_folder(self) -> None:
        """A fresh run folder, or with ``--resume`` the interrupted run's state, weights, optimiser, RNGs and folder
        (its logs trimmed to the saved step).
        """
        config = self.config
        self.raw_root = Path(config.raw_delta_save_path)
        self.resume_dir = self.raw_root / ckpt.RESUME_DIR_NAME
        self.state = TrainState()
        if config.resume:
            self.state = _load_resume(self.resume_dir, config, self.template_text, self.model, self.optimizer,
                                      self.scheduler, self.backbone, self.accelerator)
        state = self.state
        # the optimiser step of the last complete resume state on disk (None: none yet), for RunNotSaved
        self.saved_step = state.global_step if config.resume else None
        with self.writing("the run folder", Path(state.run_dir or config.output_dir)):
            if state.run_dir:
                self.run_folder = RunFolder(Path(state.run_dir), self.main)
                self.run_folder.trim_logs(state.global_step, len(state.history))
            else:
                self.run_folder = RunFolder.create(config.output_dir, "train", self.main)
            state.run_dir = str(self.run_folder.path.resolve())
            self.run_folder.write_config(config)
        if config.report_to:
            trackers.start(self.accelerator, self.run_folder.path, config.to_dict())
        self.manifest_base = dict(delta_config=self.model.delta.config.to_dict(), template_text=self.template_text,
                                  backbone=self.backbone, hyperparameters=config.to_dict(),
                                  trainable_parameters=self.model.num_trainable_parameters())
        self.best_state = None
        if state.best_epoch >= 0:
            _, _, self.best_state = ckpt.read_checkpoint(self.raw_root / ckpt.BEST_DIR_NAME)

    # ----------------------------------------------------------------------------------------------- training

    def train(self) -> None:
        """Every epoch left: its optimiser steps, then dev scores; stops early at ``--max_steps``."""
        for epoch in range(self.state.epoch, self.config.train_epochs):
            stopped = self.train_epoch(epoch)
            if stopped and self.state.batches_done < len(self.loader):
                self.save_resume_state()
                log.info("stopped after %d optimiser steps (--max_steps)", self.state.global_step)
                return
            self.evaluate_and_keep_best(epoch)
            self.state.epoch, self.state.batches_done, self.state.epoch_losses = epoch + 1, 0, []
            self.save_resume_state()
            if stopped:
                return

    def train_epoch(self, epoch: int) -> bool:
        """The optimiser steps of one epoch (from where a resumed run left it); True if ``--max_steps`` stopped it."""
        config, state, accelerator = self.config, self.state, self.accelerator
        state.epoch = epoch
        self.sampler.set_epoch(epoch)
        self.prepared.train()
        batches = accelerator.skip_first_batches(self.loader, state.batches_done) if state.batches_done else self.loader
        progress = tqdm(batches, desc=f"epoch {epoch + 1}/{config.train_epochs}", disable=not self.main,
                        initial=state.batches_done, total=len(self.loader))
        # the epoch's losses so far live in the resume state, so a resumed epoch reports the same mean loss
        losses, step_rows, stopped = state.epoch_losses, [], False
        for window in _windows(progress, config.gradient_accumulation_steps):
            value = _optimiser_step(window, self.prepared, accelerator, self.optimizer, self.scheduler, self.params,
                                    config)
            state.batches_done += len(window)
            state.global_step += 1
            losses.append(value)
            step_rows.append({"step": state.global_step, "epoch": epoch + 1, "loss": round(value, 6)})
            progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if config.save_steps and state.global_step % config.save_steps == 0:
                self.append_log(STEPS_NAME, step_rows)
                step_rows = []
                self.save_resume_state()
            self.on_step(state.global_step)
            if config.max_steps and state.global_step >= config.max_steps:
                stopped = True
                break
        progress.close()
        self.append_log(STEPS_NAME, step_rows)
        return stopped

    def evaluate_and_keep_best(self, epoch: int) -> None:
        """Dev F1/EM of this epoch's delta; the best epoch so far (ties: the later) is kept in memory and on disk."""
        state = self.state
        self.prepared.eval()
        with int8_while_scoring(self.model, self.scoring):
            dev_metrics, dev_rows = evaluate(self.model, self.dev_set, self.config.eval_batch_size,
                                             f"dev epoch {epoch + 1}", self.accelerator)
        losses = state.epoch_losses
        row = {"epoch": epoch + 1, "train_loss": round(sum(losses) / len(losses), 6) if losses else None,
               "dev_f1": dev_metrics["f1"], "dev_em": dev_metrics["em"], "step": state.global_step}
        state.history.append(row)
        self.append_log(METRICS_NAME, [row])
        log.info("epoch %d: train loss %s, dev F1 %.2f, EM %.2f", epoch + 1, row["train_loss"], row["dev_f1"],
                 row["dev_em"])
        # ties go to the later epoch: with equal dev F1 the more trained delta is the better bet
        if dev_metrics["f1"] >= state.best_dev.get("f1", -1.0):
            state.best_epoch, state.best_dev = epoch + 1, dev_metrics
            self.best_state = {k: v.clone() for k, v in self.model.delta_state_dict().items()}
            best = self.raw_root / ckpt.BEST_DIR_NAME
            with self.writing("the dev predictions", self.run_folder.path):
                self.run_folder.write_predictions("dev", dev_rows)
            if self.main:
                with self.writing("the best epoch's delta", best):
                    ckpt.save_checkpoint(best, self.best_state, ckpt.build_manifest(
                        **self.manifest_base, metrics={"best_epoch": state.best_epoch, "dev": dev_metrics}))

    def save_resume_state(self) -> None:
        """The delta, AdamW, the schedule, every process's RNG and the position, for ``--resume``."""
        # gathering the delta, the optimiser state and the RNGs takes every process; then one writes
        delta = self.model.delta_state_dict()
        optimiser_state = _whole_optimizer_state(self.model, self.optimizer)
        rngs = _every_process_rng_state()
        if not self.main:
            return
        extra = partial(_write_training_state, state=self.state, optimizer_state=optimiser_state,
                        scheduler=self.scheduler, rngs=rngs)
        manifest = ckpt.build_manifest(**self.manifest_base, metrics={"history": self.state.history})
        # written beside and renamed into place (save_checkpoint): a failed write leaves the last state whole
        with self.writing("the resume state", self.resume_dir):
            ckpt.save_checkpoint(self.resume_dir, delta, manifest, extra)
        self.saved_step = self.state.global_step

    def append_log(self, name: str, rows: list[dict]) -> None:
        """Append rows to a jsonl log of the run folder; a failed write is a ``RunNotSaved``."""
        with self.writing(f"the log {name}", self.run_folder.path):
            self.run_folder.append(name, rows)
        if self.config.report_to:
            trackers.log_rows(self.accelerator, name, rows, self.state.global_step)

    @contextlib.contextmanager
    def writing(self, what: str, path: Path):
        """Within the block, a write the file system refused (``ckpt.write_failure``: a full disk, a quota, no
        permission; a checkpoint save's ``WriteRefused``) is a ``RunNotSaved`` naming ``what`` and ``path``, the
        reason, and the last complete resume state; any other error passes through."""
        try:
            yield
        except Exception as exc:
            reason = exc.reason if isinstance(exc, ckpt.WriteRefused) else ckpt.write_failure(exc)
            if reason is None:
                raise
            if self.saved_step is None:
                kept = "no resume state was saved yet"
            else:
                kept = (f"the last complete resume state (optimiser step {self.saved_step}) in {self.resume_dir} "
                        "is intact")
            if isinstance(exc, ckpt.WriteRefused) and exc.kept and Path(path) != self.resume_dir:
                kept = f"{exc.kept} is intact; {kept}"  # the final checkpoint it was to replace, say
            raise RunNotSaved(f"could not write {what} ({path}): {reason}; {kept}") from exc

    # ------------------------------------------------------------------------------------------------- finish

    def finish(self) -> TrainSummary:
        """Test scores of the best epoch's delta, the final checkpoint and the plot."""
        config, state = self.config, self.state
        if self.best_state is None:
            raise OptqaError("training stopped before the first epoch ended: no delta to save (see --max_steps)")
        self.model.load_delta_state_dict(self.best_state, "best epoch")
        self.prepared.eval()
        with int8_while_scoring(self.model, self.scoring):
            test_metrics, test_rows = evaluate(self.model, self.test_set, config.eval_batch_size, "test",
                                               self.accelerator)
        with self.writing("the test predictions", self.run_folder.path):
            self.run_folder.write_predictions("test", test_rows)
        truncated = {name: sum(e.truncated for e in encoded)
                     for name, encoded in (("train", self.train_set), ("dev", self.dev_set), ("test", self.test_set))}
        self.append_log(METRICS_NAME, [{
            "split": "test", "best_epoch": state.best_epoch, "test_f1": test_metrics["f1"],
            "test_em": test_metrics["em"], "dev_f1": state.best_dev["f1"], "dev_em": state.best_dev["em"],
            "truncated": truncated, "quantize": self.scoring}])
        metrics = {"best_epoch": state.best_epoch, "dev": state.best_dev, "test": test_metrics,
                   "history": state.history}
        final = Path(config.delta_save_path)
        plot = None
        if self.main:
            with self.writing("the final checkpoint", final):
                ckpt.save_checkpoint(final, self.best_state,
                                     ckpt.build_manifest(**self.manifest_base, metrics=metrics))
            with self.writing("the learning-curve plot", self.run_folder.path):
                plot = plot_learning_curve(self.run_folder.path)
        self.accelerator.wait_for_everyone()
        return TrainSummary(
            run_dir=str(self.run_folder.path), delta_save_path=str(final), best_epoch=state.best_epoch,
            dev_f1=state.best_dev["f1"], dev_em=state.best_dev["em"], test_f1=test_metrics["f1"],
            test_em=test_metrics["em"], wall_time_s=round(time.perf_counter() - self.started, 1),
            checkpoint_bytes=(final / ckpt.WEIGHTS_NAME).stat().st_size if self.main else None,
            truncated=truncated, plot=str(plot) if plot else None, main_process=self.main)


# ---------------------------------------------------------------------------------------- the pieces it uses

def _first_line(exc: BaseException) -> str:
    """An exception's message cut to one line (torch's run to paragraphs); its type name if it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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


# what _write_training_state writes: key -> type; a file that lacks one or holds another is refused
_TRAINING_STATE_KEYS = {"train_state": dict, "optimizer": dict, "scheduler": dict, "process_rngs": list,
                        "python_rng": list, "python_rng_pos": (type(None), float)}


def _read_training_state(path: Path) -> dict:
    """The resume state ``_write_training_state`` wrote, read with ``weights_only=True``: tensors, lists, dicts
    and numbers only, so a file carrying code (pickled callables) is refused, never run; so is a damaged one
    or one of another shape. The file was hash-checked with its folder; this holds for a forged manifest too.

    Raises:
        OptqaError: ``--resume: <path> ... refused``, with the reason, in one line.
    """
    try:
        blob = ckpt.load_pickled_tensors(path)
    except OptqaError as exc:
        raise OptqaError(f"--resume: {exc}") from None
    wrong = ([k for k, kind in _TRAINING_STATE_KEYS.items() if not isinstance(blob.get(k), kind)]
             if isinstance(blob, dict) else ["the whole file (not a dict)"])
    if not wrong and set(blob["train_state"]) != {f.name for f in fields(TrainState)}:
        wrong = ["train_state"]
    if wrong:
        raise OptqaError(f"--resume: {path} is not a resume state of this optqa ({wrong[0]} is missing or of "
                         "another type): refused")
    return blob


def _restore_rngs(blob: dict, accelerator) -> None:
    """This process's torch (and CUDA) RNG state and Python's, as the interrupted run left them."""
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


def _load_resume(resume_dir: Path, config: RunConfig, text: str, model, optimizer, scheduler, backbone: dict,
                 accelerator) -> TrainState:
    if not (ckpt.resolve_folder(resume_dir) / ckpt.MANIFEST_NAME).is_file():
        raise OptqaError(f"--resume: no interrupted run to continue in {resume_dir} (check --raw_delta_save_path)")
    folder, manifest, delta = ckpt.read_checkpoint(resume_dir)
    if ckpt.RESUME_STATE_NAME not in manifest["files"]:
        raise OptqaError(f"--resume: {folder} holds no {ckpt.RESUME_STATE_NAME}; it is not a resume state")
    saved = manifest["hyperparameters"]
    changed = [k for k in config.resume_settings() if saved.get(k) != getattr(config, k)]
    if changed:
        k = changed[0]
        raise OptqaError(f"--resume: {k} was {saved.get(k)!r} in the interrupted run, now {getattr(config, k)!r}; "
                         "resume with the same settings")
    if manifest["template"] != text:
        raise OptqaError(f"--resume: the text of template {config.template} changed since the interrupted run; "
                         "resume with the same template")
    ckpt.check_backbone(manifest, backbone, ignore_mismatch=config.ignore_backbone_mismatch)
    blob = _read_training_state(folder / ckpt.RESUME_STATE_NAME)
    model.load_delta_state_dict(delta, str(folder))
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    try:
        set_optimizer_state_dict(model, optimizer.optimizer, blob["optimizer"], options=_state_dict_options())
        scheduler.load_state_dict(blob["scheduler"])
        _restore_rngs(blob, accelerator)
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as exc:
        raise OptqaError(f"--resume: {folder / ckpt.RESUME_STATE_NAME} does not fit this run "
                         f"({type(exc).__name__}: {_first_line(exc)}); refused") from None
    state = TrainState(**blob["train_state"])
    if state.epoch >= config.train_epochs:
        log.info("--resume: the run in %s already finished its %d epochs; scoring and saving its best delta",
                 resume_dir, config.train_epochs)
    else:
        log.info("resuming at epoch %d, batch %d (optimiser step %d)", state.epoch + 1, state.batches_done,
                 state.global_step)
    return state
