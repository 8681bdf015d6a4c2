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


def agreement_name(split: str) -> str:
    """The per-question agreement chart of ``split`` in a run folder (``--compare_file``)."""
    return f"compare_{split}.png"


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


def _best_epoch(dev: list[tuple[int, float]]) -> tuple[int, float]:
    """The epoch whose dev F1 is highest (the earliest of a tie: the one training kept)."""
    return max(dev, key=lambda item: (item[1], -item[0]))


def smoothing_window(steps: int) -> int:
    """How many steps the smoothed loss averages: a tenth of the run, at least 1 (no smoothing) and at most 50."""
    return min(50, max(1, steps // 10))


def running_mean(values: list[float], window: int) -> list[float]:
    """The trailing mean over the last ``window`` values (fewer at the start), one per value."""
    sums, out = 0.0, []
    for i, value in enumerate(values):
        sums += value - (values[i - window] if i >= window else 0.0)
        out.append(sums / min(i + 1, window))
    return out


def _integer_axis(axis, first: int, last: int, pad: float = 0.5) -> None:
    """``first``..``last`` with half a unit either side and integer ticks only (every one while few fit)."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    pad = max(pad, (last - first) * 0.02)
    (axis.axes.set_xlim if axis is axis.axes.xaxis else axis.axes.set_ylim)(first - pad, last + pad)
    axis.set_major_locator(FixedLocator(range(first, last + 1)) if last - first <= 12
                           else MaxNLocator(integer=True))


def learning_curve_figure(run_dir: str | Path):
    """The learning-curve figure of a run folder, or None when there is nothing to draw.

    Top: the train loss of every optimiser step (thin) and its trailing running mean over
    ``smoothing_window(steps)`` steps (thick; only where that window is above 1), y from 0 to 5% above the
    highest loss; a dashed line at the last step of the best dev epoch. Bottom: dev F1 per epoch, the best epoch
    starred and named, y from 0 to a little above the best F1 (F1 is a percentage: a fixed floor keeps small
    differences honest). Both x axes cover the data with a small margin and have integer ticks.
    """
    # imported here, not at the top: the question loop never draws, and matplotlib takes a while to import
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    losses, dev = learning_curve_data(run_dir)
    if not losses and not dev:
        return None
    best = _best_epoch(dev) if dev else None
    best_step = {row["epoch"]: row.get("step") for row in _read_jsonl(Path(run_dir) / METRICS_NAME)
                 if "epoch" in row}.get(best[0]) if best else None
    # Figure + the Agg canvas directly: no pyplot, so no display and no global backend switch.
    figure = Figure(figsize=(7, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, dev_ax = figure.subplots(2, 1)
    if losses:
        steps, values = [s for s, _ in losses], [v for _, v in losses]
        window = smoothing_window(len(values))
        loss_ax.plot(steps, values, color="tab:blue", linewidth=0.8, alpha=0.45 if window > 1 else 1.0,
                     label="loss per step")
        if window > 1:
            loss_ax.plot(steps, running_mean(values, window), color="tab:blue", linewidth=2,
                         label=f"running mean of {window} steps")
        if best_step is not None:
            loss_ax.axvline(best_step, color="tab:orange", linestyle="--", linewidth=1,
                            label=f"best epoch {best[0]} (step {best_step})")
        _integer_axis(loss_ax.xaxis, steps[0], steps[-1])
        # a cross-entropy is never below 0: from 0, a flat or one-step curve is not blown up into its noise
        loss_ax.set_ylim(0, max(max(values), 1e-3) * 1.05)
        loss_ax.legend(loc="upper right", fontsize="small")
    loss_ax.set(title="train loss per optimiser step", xlabel="step", ylabel="loss")
    loss_ax.grid(alpha=0.3)
    if dev:
        epochs, scores = [e for e, _ in dev], [f for _, f in dev]
        dev_ax.plot(epochs, scores, color="tab:orange", marker="o", label="dev F1")
        dev_ax.plot([best[0]], [best[1]], linestyle="none", marker="*", markersize=14, color="tab:red",
                    label=f"best epoch {best[0]}: F1 {best[1]:.2f}")
        _integer_axis(dev_ax.xaxis, epochs[0], epochs[-1])
        top = min(100.0, best[1] + max(5.0, best[1] * 0.1))
        dev_ax.set_ylim(-top * 0.02, top)
        dev_ax.legend(loc="lower right", fontsize="small")
    dev_ax.set(title="dev F1 per epoch", xlabel="epoch", ylabel="F1 (%)")
    dev_ax.grid(alpha=0.3)
    return figure


def plot_learning_curve(run_dir: str | Path) -> Path | None:
    """Draw ``learning_curve_figure`` to ``<run_dir>/learning_curve.png``.

    Returns the file, or None when there is nothing to draw.
    """
    figure = learning_curve_figure(run_dir)
    if figure is None:
        return None
    path = Path(run_dir) / PLOT_NAME
    figure.savefig(path, format="png")
    return path


def agreement_figure(counts: dict[str, int], name_a: str, name_b: str, right_f1: float):
    """A bar per case of ``optqa.run.predictions.agreement`` (both right, only A, only B, both wrong), each with
    its count and share of the questions.

    Args:
        counts: ``agreement``'s counts (keys of ``AGREEMENT``).
        name_a, name_b: what A and B are (a checkpoint, a predictions file), for the title.
        right_f1: the per-question F1 (percent) above which an answer counts as right.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    from optqa.run.predictions import AGREEMENT

    names, values = [AGREEMENT[key] for key in counts], list(counts.values())
    total = max(sum(values), 1)
    bars = ax.barh(names, values, color=["tab:green", "tab:blue", "tab:orange", "tab:gray"][:len(names)])
    ax.bar_label(bars, labels=[f"{v} ({100 * v / total:.0f}%)" for v in values], padding=3)
    ax.invert_yaxis()  # first case on top
    ax.set_xlim(0, max(values + [1]) * 1.25)  # room for the labels right of the longest bar
    ax.set(title=f"per question, right = F1 > {right_f1:g}%\nA {name_a}\nB {name_b}", xlabel="questions")
    ax.title.set_fontsize("small")
    return figure


def plot_agreement(path: str | Path, counts: dict[str, int], name_a: str, name_b: str, right_f1: float) -> Path:
    """Draw ``agreement_figure`` (same arguments) to ``path`` (a PNG); returns the path."""
    agreement_figure(counts, name_a, name_b, right_f1).savefig(path, format="png")
    return Path(path)


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
