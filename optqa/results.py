"""The run folder: resolved config, metrics per epoch, per-step loss, predictions per split, comparisons, plot."""
from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import jsonlines

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
STEPS_NAME = "train_loss.jsonl"
PLOT_NAME = "learning_curve.png"


def predictions_name(split: str) -> str:
    return f"predictions_{split}.jsonl"


def compare_name(split: str) -> str:
    return f"compare_{split}.jsonl"


class RunFolder:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled  # only the main process writes
        if enabled:
            self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, output_dir: str | Path, mode: str, enabled: bool = True) -> "RunFolder":
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path, n = Path(output_dir) / f"{mode}-{stamp}", 1
        while path.exists():
            n += 1
            path = Path(output_dir) / f"{mode}-{stamp}-{n}"
        return cls(path, enabled)

    def write_config(self, config) -> None:
        if self.enabled:
            (self.path / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")

    def append(self, name: str, rows: list[dict]) -> None:
        if self.enabled and rows:
            with jsonlines.open(self.path / name, mode="a") as writer:
                writer.write_all(rows)

    def write_rows(self, name: str, rows: list[dict]) -> Path:
        """(Re)write a whole jsonl file; an empty list still leaves an empty file, so its absence means no run."""
        path = self.path / name
        if self.enabled:
            with jsonlines.open(path, mode="w") as writer:
                writer.write_all(rows)
        return path

    def write_predictions(self, split: str, rows: list[dict]) -> Path:
        return self.write_rows(predictions_name(split), rows)
