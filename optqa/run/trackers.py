"""``--report_to``: the run's logs also go to experiment trackers, through accelerate's tracker API.

The run folder's jsonl logs stay the record; a tracker receives the same numbers as they are appended:
``train/loss`` per optimiser step (``train_loss.jsonl``), ``train/epoch_loss``, ``dev/f1``, ``dev/em`` per epoch and
``test/f1``, ``test/em``, ``dev/best_f1``, ``dev/best_em`` at the end (``metrics.jsonl``), each at its optimiser
step, and the run's settings as hyperparameters.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from optqa.errors import OptqaError
from optqa.run.folder import METRICS_NAME, STEPS_NAME

# the module each tracker needs (tensorboard: torch.utils.tensorboard's writer, or tensorboardX's)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
PROJECT = "optqa"
# which fields of a log row go to the trackers, under which names: per-step losses; per-epoch rows (they carry
# "epoch"); the final row (it carries "split"), whose dev scores are the best epoch's
TRACKED = {STEPS_NAME: {"loss": "train/loss"},
           "epoch": {"train_loss": "train/epoch_loss", "dev_f1": "dev/f1", "dev_em": "dev/em"},
           "split": {"test_f1": "test/f1", "test_em": "test/em", "dev_f1": "dev/best_f1", "dev_em": "dev/best_em"}}

def check_trackers(names: list[str] | None) -> None:
    """Refuse, before anything is loaded, a tracker whose package is not installed.

    Raises:
        OptqaError: ``--report_to NAME: ... is not installed (pip install ...)``.
    """
    for name in names or []:
        modules = TRACKER_MODULES[name]
        if not any(importlib.util.find_spec(module) for module in modules):
            raise OptqaError(f"--report_to {name}: the {' or '.join(modules)} package is not installed "
                             f"(pip install {modules[0]}); drop --report_to {name} or install it")


def start(accelerator, run_dir: Path, settings: dict[str, Any]) -> None:
    """Start accelerate's trackers for this run: tensorboard writes below ``run_dir/optqa/``; the settings are
    logged as hyperparameters (lists joined as text, trackers take only scalars)."""
    accelerator.project_configuration.project_dir = accelerator.project_configuration.logging_dir = str(run_dir)
    flat = {k: (" ".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in settings.items()}
    accelerator.init_trackers(PROJECT, config={k: v for k, v in flat.items() if v is not None})


def log_rows(accelerator, log_name: str, rows: list[dict], step: int) -> None:
    """Send the tracked numbers of rows just appended to ``log_name`` (a run folder jsonl) to the trackers, each
    at its row's optimiser step (``step`` for a row without one: the test scores)."""
    for row in rows:
        kind = log_name if log_name != METRICS_NAME else next((k for k in ("epoch", "split") if k in row), None)
        fields = TRACKED.get(kind, {})
        values = {name: row[key] for key, name in fields.items() if isinstance(row.get(key), (int, float))}
        if values:
            accelerator.log(values, step=row.get("step", step))
