"""``--report_to``: the numbers a run folder logs reach the experiment trackers too (tensorboard read back from
its event files), and a tracker that is not installed is refused before anything loads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, train_args, train_in_process


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series tensorboard wrote below ``folder``: name -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return series


def test_tensorboard_receives_the_run_folders_numbers(tiny_opt, memory_data, tmp_path, one_torch_thread):
    summary = train_in_process(tiny_opt, memory_data, tmp_path, "--report_to", "tensorboard", "--train_epochs", "2",
                               "--batch_size", "4", "--max_new_tokens", "4")
    run = Path(summary.run_dir)
    steps = [json.loads(line) for line in (run / "train_loss.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in metrics if "epoch" in row]
    test = next(row for row in metrics if row.get("split") == "test")
    scalars = _scalars(run / "optqa")
    f32 = lambda values: [(step, float(np.float32(v))) for step, v in values]  # noqa: E731 (tensorboard keeps float32)
    assert scalars["train/loss"] == f32([(row["step"], row["loss"]) for row in steps])
    assert scalars["dev/f1"] == f32([(row["step"], row["dev_f1"]) for row in epochs])
    assert scalars["train/epoch_loss"] == f32([(row["step"], row["train_loss"]) for row in epochs])
    assert scalars["test/f1"] == f32([(steps[-1]["step"], test["test_f1"])])
    assert scalars["test/em"] == f32([(steps[-1]["step"], test["test_em"])])
    assert scalars["dev/best_f1"] == f32([(steps[-1]["step"], test["dev_f1"])])
    assert sorted(scalars) == ["dev/best_em", "dev/best_f1", "dev/em", "dev/f1", "test/em", "test/f1",
                               "train/epoch_loss", "train/loss"]
    # the settings, as hyperparameters beside the events
    hparams = list((run / "optqa").rglob("hparams.yml"))
    assert len(hparams) == 1 and "report_to: tensorboard" in hparams[0].read_text()


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_refused_before_loading(tiny_opt, memory_data, tmp_path, tracker):
    import importlib.util

    if importlib.util.find_spec(tracker):
        pytest.skip(f"{tracker} is installed here")
    result = run_cli(*train_args(tiny_opt, memory_data, tmp_path, "--report_to", tracker))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --report_to {tracker}: the {tracker} package is not installed (pip install {tracker}); drop "
        f"--report_to {tracker} or install it")
    assert "loading backbone" not in result.stderr and not (tmp_path / "runs").exists()


def test_report_to_is_a_training_flag(tiny_opt, tmp_path):
    result = run_cli("--mode", "evaluate", "--report_to", "tensorboard", "--delta_save_path", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --report_to does not apply to --mode evaluate")
