"""The user's path, from the command line: train -> checkpoints + metrics + predictions -> interactive answers
from stdin -> evaluate reproduces the test scores. Plus --help, the console script and the offline demo."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import MEMORY_SET, run_cli, train_args

from optqa.checkpoints.format import BEST_DIR_NAME, MANIFEST_NAME, RESUME_DIR_NAME, RESUME_STATE_NAME, WEIGHTS_NAME
from optqa.config import MODES, RunConfig
from optqa.demo import DEMO_SHOWN
from optqa.metrics import best_over_golds
from optqa.run.folder import CONFIG_NAME, METRICS_NAME, predictions_name

EPOCHS = 30
# one torch thread: a tiny model gains nothing from more, and a busy shared machine punishes spinning threads
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def one_folder(parent: Path) -> Path:
    folders = [p for p in parent.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


@pytest.fixture(scope="module")
def trained(tiny_opt, memory_data, tmp_path_factory):
    """One training run from the command line, shared by the tests below (the adapter memorises part of the
    set in 30 epochs, so predictions are a mix of right and wrong answers)."""
    out = tmp_path_factory.mktemp("e2e")
    result = run_cli(*train_args(tiny_opt, memory_data, out, "--train_epochs", str(EPOCHS), "--lr", "3e-2",
                                 "--modified_modules", "self_attn", "fc1", "fc2", "--max_new_tokens", "6"),
                     env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "result": result, "run": one_folder(out / "runs"), "data": memory_data}


def test_train_fills_both_checkpoint_folders(trained):
    out = trained["out"]
    folders = {"final": out / "delta_ckpts", "best": out / "raw_delta_ckpts" / BEST_DIR_NAME,
               "resume": out / "raw_delta_ckpts" / RESUME_DIR_NAME}
    for name, folder in folders.items():
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        assert (folder / WEIGHTS_NAME).stat().st_size > 0, name
        assert manifest["delta"]["delta_type"] == "adapter"
        assert manifest["delta"]["modified_modules"] == ["self_attn", "fc1", "fc2"]
        # every file in the folder is listed with its hash, and nothing else is there
        assert set(manifest["files"]) == {p.name for p in folder.iterdir() if p.name != MANIFEST_NAME}, name
    assert RESUME_STATE_NAME in json.loads((folders["resume"] / MANIFEST_NAME).read_text())["files"]
    # the final delta is the best epoch's: same weights file
    assert (folders["final"] / WEIGHTS_NAME).read_bytes() == (folders["best"] / WEIGHTS_NAME).read_bytes()


def test_train_writes_config_metrics_and_predictions(trained):
    run = trained["run"]
    config = json.loads((run / CONFIG_NAME).read_text(encoding="utf-8"))
    assert (config["train_epochs"], config["lr"], config["data_path"]) == (EPOCHS, 3e-2, str(trained["data"]))

    rows = read_jsonl(run / METRICS_NAME)
    epochs, final = rows[:-1], rows[-1]
    assert [r["epoch"] for r in epochs] == list(range(1, EPOCHS + 1))
    for row in epochs:
        assert row["train_loss"] > 0 and 0 <= row["dev_f1"] <= 100 and 0 <= row["dev_em"] <= row["dev_f1"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] / 2
    # best epoch: highest dev F1, ties going to the later epoch
    best = max(epochs, key=lambda r: (r["dev_f1"], r["epoch"]))
    assert (final["split"], final["best_epoch"], final["dev_f1"]) == ("test", best["epoch"], best["dev_f1"])

    predictions = read_jsonl(run / predictions_name("test"))
    assert [p["question_id"] for p in predictions] == [f"test-{i}" for i in range(len(MEMORY_SET))]
    for row, (question, golds) in zip(predictions, MEMORY_SET):
        assert {"question_id", "question", "prediction", "answers", "f1"} <= set(row)
        assert (row["question"], row["answers"]) == (question, golds)
        assert row["f1"] == pytest.approx(100 * best_over_golds(row["prediction"], golds)[0], abs=1e-4)
    assert final["test_f1"] == pytest.approx(sum(p["f1"] for p in predictions) / len(predictions), abs=1e-3)
    assert 0 < final["test_f1"] < 100, "the shared run should give a mix of right and wrong answers"
    summary = trained["result"].stdout
    assert f"test F1 {final['test_f1']:.2f} EM {final['test_em']:.2f}" in summary


def predicted(trained) -> dict[str, str]:
    return {p["question"]: p["prediction"] for p in read_jsonl(trained["run"] / predictions_name("test"))}


def interact(trained, stdin: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # from another working folder and with no flag but the checkpoint: it must describe everything else
    result = run_cli("--mode", "interactive_inference", "--delta_save_path", str(trained["out"] / "delta_ckpts"),
                     stdin=stdin, cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "integrity check passed" in result.stderr
    return result


def test_interactive_inference_from_stdin(trained, tmp_path):
    (q1, _), (q2, _), (q3, _) = MEMORY_SET[:3]
    result = interact(trained, f"{q1}\n\n  {q2}  \nquit()\n{q3}\n", tmp_path)
    lines = result.stdout.splitlines()
    # a prompt before each line read: q1, the empty line (asked again), q2, quit()
    assert lines == ["Input a question:", f"Answer: {predicted(trained)[q1]}", "Input a question:",
                     "Input a question:", f"Answer: {predicted(trained)[q2]}", "Input a question:"]


def test_interactive_inference_ends_at_eof(trained, tmp_path):
    question = MEMORY_SET[3][0]
    result = interact(trained, question + "\n", tmp_path)
    assert result.stdout.splitlines() == ["Input a question:", f"Answer: {predicted(trained)[question]}",
                                          "Input a question:"]


def test_evaluate_reproduces_the_saved_test_scores(trained):
    out = trained["out"]
    result = run_cli("--mode", "evaluate", "--delta_save_path", str(out / "delta_ckpts"), "--data_path",
                     str(trained["data"]), "--output_dir", str(out / "evaluate"), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = read_jsonl(trained["run"] / METRICS_NAME)[-1]
    run = one_folder(out / "evaluate")
    scored = read_jsonl(run / METRICS_NAME)[-1]
    assert (scored["test_f1"], scored["test_em"]) == (saved["test_f1"], saved["test_em"])
    assert read_jsonl(run / predictions_name("test")) == read_jsonl(trained["run"] / predictions_name("test"))
    assert f"test: F1 {saved['test_f1']:.2f} EM {saved['test_em']:.2f} on {len(MEMORY_SET)} questions" in result.stdout


# The defaults issue 3 asks for (the course homework's flags); the homework's modules are written
# family-neutrally (issue 27), and --help says they are self_attn fc2 on OPT; lr and train_epochs come from the
# delta type's recipe (issue 30), the adapter's (the default delta type) being the homework's.
ISSUE_DEFAULTS = {"data_path": "./data/ARC-DA-v1.1", "plm_path": "facebook/opt-125m", "delta_type": "adapter",
                  "modified_modules": "attn mlp_out", "batch_size": "8", "max_seq_l": "128",
                  "warmup_steps": "0", "delta_save_path": "./delta_ckpts/", "raw_delta_save_path": "./raw_delta_ckpts/"}
# the recipes chosen by benchmarks/sweep.py (docs/recipes.md)
RECIPE_DEFAULTS = {"lr": "adapter 0.001, lora 0.002 (gemma3_text 0.001), bitfit 0.001, soft_prompt 0.03, prefix 0.01",
                   "train_epochs": "adapter 1, lora 1, bitfit 3, soft_prompt 1, prefix 2"}


def test_help_lists_modes_and_flags_with_defaults():
    result = run_cli("--help")
    assert result.returncode == 0
    description, options = result.stdout.split("\noptions:\n")
    for mode in MODES:
        assert re.search(rf"^\s+{mode}\s+\w", description, re.MULTILINE), f"mode {mode} not described"
    # one entry per option, from its "  --flag" line to the next; argparse wraps lines wherever it likes
    entries = {}
    for chunk in re.split(r"\n(?=  -)", options):
        words = chunk.split()
        entries[words[0].rstrip(",")] = " ".join(words)
    assert set(entries) == {"-h"} | {f"--{f.name}" for f in dataclasses.fields(RunConfig)}
    for flag, default in ISSUE_DEFAULTS.items():
        assert entries[f"--{flag}"].endswith(f"(default: {default})"), entries[f"--{flag}"]
    for flag, default in RECIPE_DEFAULTS.items():
        entry = entries[f"--{flag}"]
        assert entry.endswith(f"(default: the delta type's recipe: {default})"), entry
    assert re.search(r"\(default: templates/\w+\.txt\)$", entries["--template"])
    assert "the default is, per family: OPT: self_attn fc2; GPT-2: attn mlp.c_proj; " in entries["--modified_modules"]


def test_console_script_is_installed():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("optqa") == "optqa.cli:entry"
    executable = shutil.which("optqa")
    assert executable, "the optqa command is not on PATH"
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: optqa")


@pytest.mark.parametrize("precision", [
    "auto",  # bf16 autocast on this CPU (avx512_bf16); fp32 on CPUs without native bf16
    "fp32",  # the path of CPUs without native bf16 (and of CI machines like them)
])
def test_demo_runs_offline_and_answers_from_memory(tmp_path, precision):
    # the default, relative --output_dir (./runs): the checkpoint must still load from any folder
    # 150 epochs: on a machine other work keeps busy this takes several times its quiet time (a hang still ends)
    result = run_cli("--mode", "demo", "--precision", precision, cwd=tmp_path, env=ONE_THREAD, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("1/4", "2/4", "3/4", "4/4"):
        assert step in result.stdout
    pairs = re.findall(r"^\s+A: (.*?)\s+\(gold: (.*)\)$", result.stdout, re.MULTILINE)
    assert len(pairs) == DEMO_SHOWN, result.stdout
    remembered = [answer for answer, golds in pairs if best_over_golds(answer, golds.split(" | "))[1]]
    assert len(remembered) >= DEMO_SHOWN - 1, result.stdout
    demo = tmp_path / "runs" / "demo"
    assert (demo / "delta_ckpts" / MANIFEST_NAME).is_file()
    manifest = json.loads((demo / "delta_ckpts" / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["backbone"]["name_or_path"] == str(demo / "tiny-opt")
    if precision != "fp32":
        return
    # the printed next: command, run from another folder, answers the first shown question as the demo did
    [next_line] = [line for line in result.stdout.splitlines() if line.startswith("next: ")]
    command = shlex.split(next_line[len("next: "):])
    assert command == ["python", "-m", "optqa", "--mode", "interactive_inference", "--delta_save_path",
                       str(demo / "delta_ckpts")]
    [question] = re.findall(r"^\s+Q: (.*)$", result.stdout, re.MULTILINE)[:1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    answered = run_cli(*command[3:], stdin=question + "\n", cwd=elsewhere, env=ONE_THREAD)
    assert answered.returncode == 0, answered.stderr[-3000:]
    assert f"delta adapter on {demo / 'tiny-opt'} ready" in answered.stderr
    assert [line for line in answered.stdout.split("\n") if line.startswith("Answer:")] == [f"Answer: {pairs[0][0]}"]
