"""The run folder and what a person reads from it.

Each run writes a new folder below ``--output_dir``: the resolved config, metrics per epoch, the loss per
optimiser step, predictions per split, comparisons, and the learning-curve plot drawn from those files.
"""
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
    """The predictions file of ``split`` in a run folder."""
    return f"predictions_{split}.jsonl"


def compare_name(split: str) -> str:
    """The question-by-question comparison file of ``split`` in a run folder."""
    return f"compare_{split}.jsonl"


class RunFolder:
    """One run's folder below ``--output_dir``; only the main process of a multi-process run writes (``enabled``)."""
    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled  # only the main process writes
        if enabled:
            self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, output_dir: str | Path, mode: str, enabled: bool = True) -> "RunFolder":
        """A new folder ``<output_dir>/<mode>-<YYYYmmdd-HHMMSS>[-N]`` (N keeps two runs in one second apart)."""
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path, n = Path(output_dir) / f"{mode}-{stamp}", 1
        while path.exists():
            n += 1
            path = Path(output_dir) / f"{mode}-{stamp}-{n}"
        return cls(path, enabled)

    def write_config(self, config) -> None:
        """``config.json``: the run's resolved ``RunConfig``."""
        if self.enabled:
            (self.path / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")

    def append(self, name: str, rows: list[dict]) -> None:
        """Append ``rows`` to the jsonl file ``name`` (metrics, per-step losses)."""
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
        """``predictions_<split>.jsonl``: one row per question (see ``optqa.run.predictions.prediction_rows``)."""
        return self.write_rows(predictions_name(split), rows)

    def trim_logs(self, global_step: int, epochs_done: int) -> None:
        """Drop log rows written after a resume state was saved (and a line cut short by a kill): the resumed
        run writes them again.

        Args:
            global_step: the optimiser step the resume state holds; later step rows go.
            epochs_done: epochs finished in the resume state; later epoch rows go.
        """
        if not self.enabled:
            return
        kept = {STEPS_NAME: lambda row: row.get("step", 0) <= global_step,
                METRICS_NAME: lambda row: "epoch" in row and row["epoch"] <= epochs_done}
        for name, keep in kept.items():
            path = self.path / name
            if path.is_file():
                rows = [row for row in _read_jsonl(path, skip_broken=True) if isinstance(row, dict) and keep(row)]
                path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _read_jsonl(path: Path, skip_broken: bool = False) -> list:
    """The rows of a jsonl file ([] when it is missing); ``skip_broken`` drops lines that do not parse (a line
    cut short when a run was killed)."""
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in filter(str.strip, handle):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if not skip_broken:
                    raise
    return rows


def learning_curve_data(run_dir: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (epoch, dev F1) from a run folder's jsonl files."""
    run_dir = Path(run_dir)
    # a resumed run may rewrite a step logged before the interruption; the later value wins
    losses = {row["step"]: row["loss"] for row in _read_jsonl(run_dir / STEPS_NAME) if row.get("loss") is not None}
    dev = {row["epoch"]: row["dev_f1"] for row in _read_jsonl(run_dir / METRICS_NAME)
           if "epoch" in row and row.get("dev_f1") is not None}
    return sorted(losses.items()), sorted(dev.items())


def plot_learning_curve(run_dir: str | Path) -> Path | None:
    """Draw train loss per step and dev F1 per epoch to ``<run_dir>/learning_curve.png``.

    Returns the file, or None when there is nothing to draw.
    """
    # imported here, not at the top: the question loop never draws, and matplotlib takes a while to import
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    losses, dev = learning_curve_data(run_dir)
    if not losses and not dev:
        return None
    # Figure + the Agg canvas directly: no pyplot, so no display and no global backend switch.
    figure = Figure(figsize=(7, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, dev_ax = figure.subplots(2, 1)
    if losses:
        loss_ax.plot([s for s, _ in losses], [v for _, v in losses], color="tab:blue", linewidth=1)
    loss_ax.set(title="train loss per optimiser step", xlabel="step", ylabel="loss")
    loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.grid(alpha=0.3)
    if dev:
        dev_ax.plot([e for e, _ in dev], [f for _, f in dev], color="tab:orange", marker="o")
        best_epoch, best_f1 = max(dev, key=lambda item: (item[1], item[0]))
        dev_ax.annotate(f"best {best_f1:.2f}", (best_epoch, best_f1), textcoords="offset points", xytext=(4, 6))
        # F1 is a percentage: a fixed floor keeps a flat 0 line from filling the panel with tiny ticks
        dev_ax.set_ylim(-2, min(102, max(f for _, f in dev) + 10))
        dev_ax.margins(x=0.15)
    dev_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    dev_ax.set(title="dev F1 per epoch", xlabel="epoch", ylabel="F1 (%)")
    dev_ax.grid(alpha=0.3)
    path = Path(run_dir) / PLOT_NAME
    figure.savefig(path, format="png")
    return path


def comparison_table(name_a: str, name_b: str, metrics_a: dict, metrics_b: dict, counts: dict,
                     changed: list[dict], examples: int = 3) -> str:
    """A few lines: both files' scores, how many questions B got better/worse/same, the largest changes."""
    width = max(len(name_a), len(name_b), 4) + 4
    lines = [f"{'':{width}} {'F1':>7} {'EM':>7}",
             f"{'A ' + name_a:{width}} {metrics_a['f1']:7.2f} {metrics_a['em']:7.2f}",
             f"{'B ' + name_b:{width}} {metrics_b['f1']:7.2f} {metrics_b['em']:7.2f}",
             f"B vs A, question by question: {counts['better']} better, {counts['worse']} worse, "
             f"{counts['same']} same ({len(changed)} with a different prediction)"]
    for change in ("better", "worse"):
        rows = sorted((r for r in changed if r["change"] == change), key=lambda r: -abs(r["f1_change"]))
        for r in rows[:examples]:
            question = r["question"] if len(r["question"]) <= 50 else r["question"][:47] + "..."
            lines.append(f"  {change:6} F1 {r['f1_a']:6.2f} -> {r['f1_b']:6.2f}  {question}  "
                         f"[{r['prediction_a']!r} -> {r['prediction_b']!r}]")
    return "\n".join(lines)
