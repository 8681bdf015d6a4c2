"""Results out: the run folder, the learning-curve plot, scoring and comparing predictions files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import MEMORY_SET, run_cli, train_args

from optqa.cli import main as cli_main
from optqa.data import InputExample
from optqa.errors import OptqaError
from optqa.run import folder as reports
from optqa.run.predictions import agreement, compare_rows, read_predictions, score_predictions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LONG = ("Which process moves water from the leaves of a plant into the air, and why does it happen faster "
        "on a hot, dry and windy day than on a cool, damp and still one?")
# other field names than ARC-DA's, some answers as a single string
FIELDS = ["--question_field", "q", "--answers_field", "golds", "--id_field", "qid"]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _custom_split(path: Path) -> Path:
    rows = [*MEMORY_SET, (LONG, ["transpiration"])]
    return _write_jsonl(path, [{"qid": f"c{i}", "q": q, "golds": a[0] if i % 2 else a}
                               for i, (q, a) in enumerate(rows)])


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """The command line in this process: file-only modes need no model, so no 5 s interpreter start."""
    capsys.readouterr()
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _only_run(parent: Path, mode: str) -> Path:
    runs = sorted(parent.glob(f"{mode}-*"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def trained(tiny_opt, tmp_path_factory):
    """Two epochs of LoRA on a custom jsonl (own field names), with a --max_seq_l that cuts questions."""
    root = tmp_path_factory.mktemp("custom-run")
    split_args = []
    for split in ("train", "dev", "test"):
        split_args += [f"--{split}_file", str(_custom_split(root / f"my_{split}.jsonl"))]
    done = run_cli(*train_args(tiny_opt, root / "no-data-path", root, *split_args, *FIELDS, "--delta_type", "lora",
                               "--lr", "2e-2", "--train_epochs", "2", "--batch_size", "5", "--max_seq_l", "16",
                               "--max_new_tokens", "4"))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "done": done, "run": _only_run(root / "runs", "train"), "split_args": split_args}


def test_training_run_folder_summary_and_plot(trained):
    run, out, err = trained["run"], trained["done"].stdout, trained["done"].stderr
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json", "learning_curve.png", "metrics.jsonl", "predictions_dev.jsonl", "predictions_test.jsonl",
        "train_loss.jsonl"]
    config = json.loads((run / "config.json").read_text())
    assert config["question_field"] == "q" and config["test_file"].endswith("my_test.jsonl")

    metrics = _read_jsonl(run / "metrics.jsonl")
    assert [m.get("epoch") for m in metrics] == [1, 2, None]
    final = metrics[-1]
    assert final["split"] == "test" and {"test_f1", "test_em", "dev_f1", "dev_em", "best_epoch"} <= set(final)
    assert final["dev_f1"] == metrics[final["best_epoch"] - 1]["dev_f1"]
    # 9 questions in batches of 5: two optimiser steps per epoch
    assert [r["step"] for r in _read_jsonl(run / "train_loss.jsonl")] == [1, 2, 3, 4]

    predictions = _read_jsonl(run / "predictions_test.jsonl")
    assert [p["question_id"] for p in predictions] == [f"c{i}" for i in range(9)]
    assert predictions[1]["answers"] == ["gravity"] and all({"f1", "em", "prediction"} <= set(p) for p in predictions)

    # the cut count is logged per split, kept in metrics.jsonl and printed in the summary
    logged = {s: int(n) for s, n in re.findall(r"tokenising (\w+): (\d+) of \d+ examples were longer", err)}
    assert final["truncated"] == {"train": logged["train"], "dev": logged["dev"], "test": logged["test"]}
    assert logged["train"] >= 1 and f"train {logged['train']}, dev {logged['dev']}" in out
    assert re.search(r"best epoch \d: dev F1 [\d.]+ EM [\d.]+ \| test F1 [\d.]+ EM [\d.]+", out)
    assert re.search(r"\([\d.]+ MB\); results in .+; wall time [\d.]+ s", out)
    assert f"learning curve: {run / 'learning_curve.png'}" in out

    png = (run / "learning_curve.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000


def test_evaluate_from_file_equals_evaluate_from_model(trained, capsys):
    root, split_args = trained["root"], trained["split_args"]
    done = run_cli("--mode", "evaluate", "--delta_save_path", str(root / "delta_ckpts"), "--output_dir",
                   str(root / "eval-model"), *split_args, *FIELDS)
    assert done.returncode == 0, done.stderr[-3000:]
    by_model = _only_run(root / "eval-model", "evaluate")
    [model_metrics] = _read_jsonl(by_model / "metrics.jsonl")
    model_rows = _read_jsonl(by_model / "predictions_test.jsonl")
    assert re.search(rf"test: F1 {model_metrics['test_f1']:.2f} EM {model_metrics['test_em']:.2f} on 9 questions",
                     done.stdout)

    code, out, err = _cli(capsys, "--mode", "evaluate", "--predictions_file", str(by_model / "predictions_test.jsonl"),
                          "--output_dir", str(root / "eval-file"), *split_args, *FIELDS)
    assert code == 0, err
    by_file = _only_run(root / "eval-file", "evaluate")
    [file_metrics] = _read_jsonl(by_file / "metrics.jsonl")
    assert {k: file_metrics[k] for k in ("test_f1", "test_em", "count")} == {
        k: model_metrics[k] for k in ("test_f1", "test_em", "count")}
    assert _read_jsonl(by_file / "predictions_test.jsonl") == model_rows
    assert not (by_file / "learning_curve.png").exists()

    # one answer fixed by hand: the file's score moves by exactly that question's share
    fixed = [dict(r) for r in model_rows]
    target = next(i for i, r in enumerate(fixed) if r["f1"] < 100)
    fixed[target]["prediction"] = fixed[target]["answers"][0]
    edited = _write_jsonl(root / "edited.jsonl", [{"question_id": r["question_id"], "prediction": r["prediction"]}
                                                  for r in reversed(fixed)])  # order does not matter, ids do
    code, out, err = _cli(capsys, "--mode", "evaluate", "--predictions_file", str(by_model / "predictions_test.jsonl"),
                          "--compare_file", str(edited), "--output_dir", str(root / "compare"), *split_args, *FIELDS)
    assert code == 0, err
    compared = _only_run(root / "compare", "evaluate")
    share = {k: (sum(r[k] for r in model_rows) - model_rows[target][k] + 100) / 9 for k in ("f1", "em")}
    row = _read_jsonl(compared / "metrics.jsonl")[1]
    assert row["compare_file"] == str(edited) and (row["better"], row["worse"], row["same"]) == (1, 0, 8)
    assert (row["compare_f1"], row["compare_em"]) == pytest.approx((share["f1"], share["em"]), abs=1e-3)
    [diff] = _read_jsonl(compared / "compare_test.jsonl")
    assert diff["question_id"] == f"c{target}" and diff["change"] == "better" and diff["f1_b"] == 100.0
    assert "B vs A, question by question: 1 better, 0 worse, 8 same" in out
    # who got which right (F1 > 50%): the fixed question moves from "both wrong" to "only B" unless A had it half
    right_a = sum(r["f1"] > 50 for r in model_rows)
    a_had_it = model_rows[target]["f1"] > 50
    assert {k: row[k] for k in ("both_right", "only_a", "only_b", "both_wrong")} == {
        "both_right": right_a, "only_a": 0, "only_b": 0 if a_had_it else 1,
        "both_wrong": 9 - right_a - (0 if a_had_it else 1)}
    assert (compared / "compare_test.png").read_bytes().startswith(PNG_SIGNATURE)
    assert f"chart in {compared / 'compare_test.png'}" in out


# ---- scoring predictions files without a model --------------------------------------------------------------

GOLD = [InputExample(guid=f"g{i}", text_a=q, tgt_text=a) for i, (q, a) in enumerate(MEMORY_SET[:4])]


def _predictions(tmp_path: Path, answers: dict[str, str], name: str = "p.jsonl") -> Path:
    return _write_jsonl(tmp_path / name, [{"question_id": k, "prediction": v} for k, v in answers.items()])


def test_score_predictions_matches_by_id(tmp_path):
    path = _predictions(tmp_path, {"g3": "ice", "g1": "gravity", "g0": "carbon dioxide gas", "g2": "Ice."})
    metrics, rows = score_predictions(GOLD, read_predictions(path))
    # g0: 2*(2/3*1)/(2/3+1) = 0.8 against "carbon dioxide"; g1, g2 exact; g3 wrong
    assert metrics == {"f1": 70.0, "em": 50.0, "count": 4}
    assert [(r["question_id"], r["prediction"], r["f1"], r["em"]) for r in rows] == [
        ("g0", "carbon dioxide gas", 80.0, 0.0), ("g1", "gravity", 100.0, 100.0), ("g2", "Ice.", 100.0, 100.0),
        ("g3", "ice", 0.0, 0.0)]


def test_numeric_ids_match_their_text_form(tmp_path):
    gold = [InputExample(guid=7, text_a="q", tgt_text=["a"])]
    path = _write_jsonl(tmp_path / "p.jsonl", [{"qid": "7", "prediction": "a"}])
    assert score_predictions(gold, read_predictions(path, id_field="qid"))[0]["em"] == 100.0


def test_missing_and_extra_ids_are_clear_errors(tmp_path):
    missing = _predictions(tmp_path, {"g0": "x", "g1": "y"}, "missing.jsonl")
    with pytest.raises(OptqaError, match=r"^p does not match gold: 2 of 4 questions have no prediction "
                                         r"\('g2', 'g3'\) \(check --split / --test_file\)$"):
        score_predictions(GOLD, read_predictions(missing), "p", "gold")
    extra = _predictions(tmp_path, {f"g{i}": "x" for i in range(4)} | {"z1": "x", "z2": "x", "z3": "x", "z4": "x"})
    with pytest.raises(OptqaError, match=r"4 predictions are for ids not in gold \('z1', 'z2', 'z3' and 1 more\)"):
        score_predictions(GOLD, read_predictions(extra), "p", "gold")
    twice = [*GOLD, InputExample(guid="g1", text_a="again", tgt_text=["x"])]
    with pytest.raises(OptqaError, match="question id 'g1' appears more than once"):
        score_predictions(twice, {g.guid: "x" for g in twice}, "p", "gold")


@pytest.mark.parametrize("line, words", [
    ('{"question_id": "g1", "prediction": "a"', "not valid JSON"),
    ('["g1", "a"]', "expected a JSON object"),
    ('{"prediction": "a"}', "missing field 'question_id'"),
    ('{"question_id": "g1", "prediction": null}', "field 'prediction' must be a string"),
    ('{"question_id": "g0", "prediction": "again"}', "question id 'g0' appears twice"),
])
def test_bad_prediction_rows_name_file_and_line(tmp_path, line, words):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question_id": "g0", "prediction": "a"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(OptqaError) as err:
        read_predictions(path)
    assert str(err.value).startswith(f"{path}:3: ") and words in str(err.value)


def test_compare_rows_counts_and_differences():
    a = score_predictions(GOLD, {"g0": "carbon", "g1": "gravity", "g2": "ice", "g3": "lungs"})[1]
    b = score_predictions(GOLD, {"g0": "co2", "g1": "mass", "g2": "ICE!", "g3": "kidney"})[1]
    counts, changed = compare_rows(a, b)
    assert counts == {"better": 1, "worse": 1, "same": 2}
    # g2 differs only in text (same score): still listed; g3 is wrong both times with another text
    assert [(r["question_id"], r["change"], r["f1_change"]) for r in changed] == [
        ("g0", "better", pytest.approx(100 - 100 * 2 / 3, abs=1e-3)), ("g1", "worse", -100.0), ("g2", "same", 0.0),
        ("g3", "same", 0.0)]
    table = reports.comparison_table("a.jsonl", "b.jsonl", {"f1": 50, "em": 25}, {"f1": 50, "em": 50}, counts,
                                     changed)
    assert "1 better, 1 worse, 2 same (4 with a different prediction)" in table
    assert re.search(r"better F1\s+66\.67 ->\s+100\.00\s+What gas", table)


def test_evaluate_cli_errors_are_one_line(tmp_path, capsys):
    gold = _write_jsonl(tmp_path / "test.jsonl", [{"question_id": g.guid, "question": g.text_a, "answers": g.tgt_text}
                                                  for g in GOLD])
    preds = _predictions(tmp_path, {"g0": "x"})
    code, out, err = _cli(capsys, "--mode", "evaluate", "--test_file", str(gold), "--predictions_file", str(preds),
                          "--output_dir", str(tmp_path / "runs"))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {preds} does not match {gold}: 3 of 4")
    code, out, err = _cli(capsys, "--mode", "evaluate", "--test_file", str(gold), "--predictions_file", str(preds),
                          "--compare_file", str(tmp_path / "absent.jsonl"))
    assert code == 2 and err == f"error: predictions file not found: {tmp_path / 'absent.jsonl'}\n"
    assert not (tmp_path / "runs").exists()


# ---- the learning-curve plot ----------------------------------------------------------------------------------


def _fake_run(folder: Path) -> Path:
    folder.mkdir()
    _write_jsonl(folder / "train_loss.jsonl", [{"step": s, "epoch": 1 + (s - 1) // 3, "loss": 5.0 / s}
                                               for s in range(1, 7)] + [{"step": 6, "epoch": 2, "loss": 0.5}])
    _write_jsonl(folder / "metrics.jsonl", [{"epoch": 1, "dev_f1": 10.0, "dev_em": 0.0, "step": 3},
                                            {"epoch": 2, "dev_f1": 30.0, "dev_em": 12.5, "step": 6},
                                            {"split": "test", "test_f1": 20.0, "dev_f1": 30.0}])
    return folder


def test_plot_is_a_png_of_loss_and_dev_f1(tmp_path):
    run = _fake_run(tmp_path / "run")
    losses, dev = reports.learning_curve_data(run)
    # a step written twice (resumed run) counts once, with its later value; the final test row is no epoch
    assert losses[-1] == (6, 0.5) and len(losses) == 6 and dev == [(1, 10.0), (2, 30.0)]
    path = reports.plot_learning_curve(run)
    assert path == run / "learning_curve.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def _run_of(folder: Path, losses: list[float], dev_f1: list[float], steps_per_epoch: int) -> Path:
    folder.mkdir()
    _write_jsonl(folder / "train_loss.jsonl", [{"step": s, "epoch": 1 + (s - 1) // steps_per_epoch, "loss": v}
                                               for s, v in enumerate(losses, start=1)])
    _write_jsonl(folder / "metrics.jsonl", [{"epoch": e, "dev_f1": f, "dev_em": 0.0, "step": e * steps_per_epoch}
                                            for e, f in enumerate(dev_f1, start=1)])
    return folder


def _lines(ax) -> dict[str, list]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_the_learning_curve_smooths_the_loss_and_marks_the_best_epoch(tmp_path):
    losses = [4.0 - 0.05 * s + (0.5 if s % 2 else -0.5) for s in range(1, 41)]  # noisy, falling
    run = _run_of(tmp_path / "run", losses, [10.0, 32.5, 30.0, 32.5], steps_per_epoch=10)
    loss_ax, dev_ax = reports.learning_curve_figure(run).axes
    lines = _lines(loss_ax)
    assert set(lines) == {"loss per step", "running mean of 4 steps", "best epoch 2 (step 20)"}
    assert list(lines["loss per step"].get_ydata()) == losses
    smooth = list(lines["running mean of 4 steps"].get_ydata())
    assert smooth[0] == losses[0] and smooth[-1] == pytest.approx(sum(losses[-4:]) / 4)
    assert list(lines["best epoch 2 (step 20)"].get_xdata()) == [20, 20]  # the tie goes to the earlier epoch
    assert loss_ax.get_xlim() == pytest.approx((1 - 0.78, 40 + 0.78))
    assert loss_ax.get_ylim() == pytest.approx((0, max(losses) * 1.05))
    assert all(float(t).is_integer() for t in loss_ax.get_xticks() if 0 <= t <= 41)
    dev_lines = _lines(dev_ax)
    star = dev_lines["best epoch 2: F1 32.50"]
    assert (list(star.get_xdata()), list(star.get_ydata()), star.get_marker()) == ([2], [32.5], "*")
    assert dev_ax.get_xlim() == (0.5, 4.5) and list(dev_ax.get_xticks()) == [1, 2, 3, 4]
    assert dev_ax.get_ylim() == pytest.approx((-0.02 * 37.5, 37.5))


def test_a_one_epoch_curve_has_sane_axes(tmp_path):
    """The issue's case: one epoch, a loss near 1 (ticks ran 0.945-1.065) and an epoch axis far wider than 1."""
    run = _run_of(tmp_path / "run", [1.0, 1.01, 0.99], [0.0], steps_per_epoch=3)
    loss_ax, dev_ax = reports.learning_curve_figure(run).axes
    assert set(_lines(loss_ax)) == {"loss per step", "best epoch 1 (step 3)"}  # 3 steps: nothing to smooth
    assert loss_ax.get_xlim() == (0.5, 3.5) and list(loss_ax.get_xticks()) == [1, 2, 3]
    assert loss_ax.get_ylim() == pytest.approx((0, 1.01 * 1.05))
    assert dev_ax.get_xlim() == (0.5, 1.5) and list(dev_ax.get_xticks()) == [1]
    assert dev_ax.get_ylim() == pytest.approx((-0.1, 5.0))


def test_the_agreement_chart_counts_each_case(tmp_path):
    a = score_predictions(GOLD, {"g0": "carbon", "g1": "gravity", "g2": "ice", "g3": "lungs"})[1]
    b = score_predictions(GOLD, {"g0": "co2", "g1": "mass", "g2": "ICE!", "g3": "kidney"})[1]
    # g0: "carbon" against "carbon dioxide" is F1 66.7: right, as "co2" is
    counts = agreement(a, b)
    assert counts == {"both_right": 2, "only_a": 1, "only_b": 0, "both_wrong": 1}
    ax = reports.agreement_figure(counts, "A.jsonl", "B.jsonl", 50).axes[0]
    bars = ax.containers[0]
    assert [bar.get_width() for bar in bars] == [2, 1, 0, 1]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["both right", "only A", "only B", "both wrong"]
    assert [t.get_text() for t in ax.texts] == ["2 (50%)", "1 (25%)", "0 (0%)", "1 (25%)"]
    assert ax.get_xlim() == (0, 2.5)


def test_a_plain_install_brings_the_plot():
    """``pip install .`` alone gives the learning-curve PNG: matplotlib is a requirement, not an extra."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    unconditional = {Requirement(r).name for r in requires("optqa") if Requirement(r).marker is None}
    assert {"matplotlib", "torch", "transformers", "peft"} <= unconditional

