"""The benchmark scripts write their results: quality.py --quick on a tiny model (every row runs, the table and
chart are written), the shared RESULTS.md section writer, and a cheap script's section."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from test_baselines import CHATML


def test_quality_benchmark_quick_writes_its_section_and_chart(tiny_opt, memory_data, tmp_path):
    plm = tmp_path / "chat-opt"
    shutil.copytree(tiny_opt, plm)
    settings = json.loads((plm / "tokenizer_config.json").read_text())
    (plm / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": CHATML}))
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nkept\n\n<!-- quality:start -->\nold\n<!-- quality:end -->\n\nkept too\n")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick", "--plm_path", str(plm),
                           "--data_path", str(memory_data), "--workdir", str(tmp_path / "work"), "--results",
                           str(results), "--chart", str(tmp_path / "quality.png"), "--num_shots", "2",
                           "--num_threads", "1"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nkept\n\n<!-- quality:start -->") and text.endswith("kept too\n")
    assert "old" not in text and text.count("<!-- quality:start -->") == 1
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    systems = [line.split(" | ")[0][2:] for line in table]
    assert systems == ["zero-shot", "2-shot", "zero-shot, chat template", "2-shot, chat template", "optqa adapter",
                       "optqa lora", "optqa bitfit", "optqa soft_prompt", "optqa prefix", "PEFT LoRA loop"]
    for line in table:  # every row ran and was scored: F1, EM and the answering time are numbers
        cells = [c.strip() for c in line.split("|")[1:-1]]
        float(cells[1]), float(cells[2]), float(cells[7])
    lora = [c.strip() for c in table[5].split("|")[1:-1]]
    assert int(lora[3].replace(",", "")) > 0 and lora[4].endswith(" MB") and float(lora[5]) > 0
    assert "Machine: " in text and "torch threads" in text and "CPU flags" in text
    assert (tmp_path / "quality.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_quality_systems_run_apart_fill_one_table(tiny_opt, memory_data, tmp_path):
    """--systems runs some rows; a second run of other rows adds to the table of the first (same backbone and
    data), and a row of another backbone's run is not mixed in."""
    def run(*systems: str) -> list[str]:
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick", "--plm_path",
                               str(tiny_opt), "--data_path", str(memory_data), "--workdir", str(tmp_path / "work"),
                               "--results", str(tmp_path / "RESULTS.md"), "--chart", str(tmp_path / "q.png"),
                               "--num_threads", "1", "--systems", *systems], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr[-3000:]
        text = (tmp_path / "RESULTS.md").read_text()
        return [line.split(" | ")[0][2:] for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]

    rows = tmp_path / "work" / "rows.jsonl"
    (tmp_path / "work").mkdir()
    rows.write_text(json.dumps({"key": {"plm_path": "other", "data_path": str(memory_data), "quick": True,
                                        "num_shots": 5}, "system": "optqa adapter", "f1": 99.0}) + "\n")
    assert run("bitfit") == ["optqa bitfit"]
    assert run("peft", "lora") == ["optqa lora", "optqa bitfit", "PEFT LoRA loop"]
    # the section names the command of each row, not only the last run's
    ran = (tmp_path / "RESULTS.md").read_text().split("Rows run:\n", 1)[1].split("\n<!--", 1)[0].splitlines()
    assert [line.split(": ", 1)[0] for line in ran] == ["- optqa lora; PEFT LoRA loop", "- optqa bitfit"]
    assert ran[0].endswith("--systems peft lora`") and ran[1].endswith("--systems bitfit`")


TEMPLATE_SETTING = "lora lr=1e-2 template=templates/question_answer_template.txt"


def test_sweep_quick_writes_its_table_and_skips_finished_settings(tiny_opt, memory_data, tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "sweep.py"), "--quick", "--plm_path", str(tiny_opt),
               "--data_path", str(memory_data), "--workdir", str(tmp_path / "work"), "--results",
               str(tmp_path / "RESULTS.md"), "--num_threads", "1", "--runs", "lora lr=1e-2 train_epochs=2",
               "bitfit lr=3e-3 modified_modules=self_attn,fc2", TEMPLATE_SETTING]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in (tmp_path / "work" / "sweep.jsonl").read_text().splitlines()]
    # --quick: at most 2 optimiser steps, one per epoch on the 8 memory questions in one batch
    assert [(r["setting"], len(r["dev_f1"])) for r in results] == [("lora lr=1e-2 train_epochs=2", 2),
                                                                   ("bitfit lr=3e-3 modified_modules=self_attn,fc2", 2),
                                                                   (TEMPLATE_SETTING, 1)]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- sweep:start -->\n## Default recipes: the sweep (`benchmarks/sweep.py`)" in text
    table = [line for line in text.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == ["bitfit lr=3e-3 modified_modules=self_attn,fc2",
                                                     "lora lr=1e-2 train_epochs=2", TEMPLATE_SETTING]
    # one folder per setting, side by side: a template's path becomes part of a name, not a folder below it
    digest = hashlib.sha256(TEMPLATE_SETTING.encode()).hexdigest()[:8]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "bitfit_lr-3e-3_modified_modules-self_attn,fc2", "data",  # data: --quick's cut of the data
        f"lora_lr-1e-2_template-templates_question_answer_template.txt-{digest}", "lora_lr-1e-2_train_epochs-2",
        "sweep.jsonl"]
    manifest = json.loads((tmp_path / "work" / "bitfit_lr-3e-3_modified_modules-self_attn,fc2" / "delta_ckpts" /
                           "optqa_manifest.json").read_text())
    assert manifest["hyperparameters"]["lr"] == 3e-3
    assert manifest["hyperparameters"]["modified_modules"] == ["self_attn", "fc2"]
    again = subprocess.run(command, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert again.returncode == 0 and len((tmp_path / "work" / "sweep.jsonl").read_text().splitlines()) == 3
    # results of another seed (or backbone, data, --quick) are not this sweep's: the settings run again
    other = subprocess.run([*command, "--seed", "1"], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert other.returncode == 0 and len((tmp_path / "work" / "sweep.jsonl").read_text().splitlines()) == 6


def test_sweep_table_gives_the_mean_of_a_setting_run_with_several_seeds():
    """Rows that differ only in seed= are one setting: the sweep's --seed stands for a row that names none."""
    sweep = _benchmarks_script("sweep")
    rows = [{"setting": s, "best_f1": f, "best_em": 20.0, "best_epoch": 1, "dev_f1": [f], "train_s": 60.0}
            for s, f in [("lora lr=2e-3", 45.1), ("lora lr=2e-3 seed=7", 43.1), ("adapter lr=1e-3", 40.3),
                         ("lora lr=2e-3 seed=1", 41.1), ("lora lr=1e-3", 41.4), ("adapter lr=1e-3 seed=7", 39.7),
                         ("prefix seed=7 lr=1e-2", 40.6), ("prefix lr=1e-2 seed=3", 40.4)]]
    assert sweep.seed_groups(rows, 42) == [
        {"setting": "lora lr=2e-3", "seeds": [1, 7, 42], "best_f1": [41.1, 43.1, 45.1], "mean": 43.1},
        {"setting": "adapter lr=1e-3", "seeds": [7, 42], "best_f1": [39.7, 40.3], "mean": 40.0},
        {"setting": "prefix lr=1e-2", "seeds": [3, 7], "best_f1": [40.4, 40.6], "mean": 40.5}]
    table = sweep.markdown(rows, argparse.Namespace(plm_path="/w/SmolLM2.gguf", data_path="d", seed=42))
    assert table.split("the mean:\n\n")[1] == (
        "| setting | seeds | best dev F1 per seed | mean |\n| --- | --- | --- | ---: |\n"
        "| `adapter lr=1e-3` | 7, 42 | 39.7 / 40.3 | 40.0 |\n"
        "| `lora lr=2e-3` | 1, 7, 42 | 41.1 / 43.1 / 45.1 | 43.1 |\n"
        "| `prefix lr=1e-2` | 3, 7 | 40.4 / 40.6 | 40.5 |")
    assert "several seeds" not in sweep.markdown(rows[:1], argparse.Namespace(plm_path="p", data_path="d", seed=42))


def _benchmarks_script(name: str):
    """A script of benchmarks/ imported as the scripts import each other (their folder first on sys.path)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def _benchmarks_common():
    """benchmarks/common.py, imported as the scripts import it (benchmarks/ is their folder, not a package)."""
    return _benchmarks_script("common")


MACHINE = {"cpu": "Test CPU", "logical_cpus": 4, "physical_cores": 2, "usable_cpus": 4, "memory_gb": 8.0,
           "native_bf16": False, "cpu_flags": "avx2 yes", "threads": 1, "gpu": None, "python": "3.11.7",
           "torch": "2.13.0", "transformers": "5.25.0", "peft": "0.21.2", "os": "Linux"}


def test_write_section_replaces_its_own_section_and_keeps_the_others(tmp_path, monkeypatch):
    """A section is the markers, the title, the date and the command (with --quick said), the machine line and the
    body; a second run replaces it in place, another script's section and the text around them are kept."""
    common = _benchmarks_common()
    monkeypatch.setattr(sys, "argv", ["/somewhere/benchmarks/probe.py"])
    when = datetime.datetime(2026, 12, 4, 17, 5, tzinfo=datetime.timezone.utc)
    section = common.render_section("probe", "Probe (`benchmarks/probe.py`)", "| a |\n| --- |\n| 1 |\n", MACHINE,
                                    quick=True, argv=["--quick", "--sizes", "1 kB"], when=when)
    assert section == (
        "<!-- probe:start -->\n## Probe (`benchmarks/probe.py`)\n\n2026-12-04 17:05 UTC, "
        "`python benchmarks/probe.py --quick --sizes '1 kB'` (--quick: a smoke run, too few steps and questions to "
        "judge the numbers by).\n\nMachine: Test CPU, 2 physical cores / 4 logical, 8.0 GB RAM, native bf16: no "
        "(CPU flags: avx2 yes), 1 torch threads; Linux, Python 3.11.7, torch 2.13.0, transformers 5.25.0, peft 0.21.2"
        "\n\n| a |\n| --- |\n| 1 |\n<!-- probe:end -->")
    results = tmp_path / "RESULTS.md"
    common.write_section(results, "probe", "Probe", "first", MACHINE, argv=[])
    assert results.read_text().startswith("# Benchmark results\n\n<!-- probe:start -->\n## Probe\n\n")
    other = "<!-- other:start -->\n## Other\n\nkept as it was\n<!-- other:end -->"
    results.write_text(results.read_text() + "\n" + other + "\n\ntail\n")
    common.write_section(results, "probe", "Probe", "second", MACHINE, argv=[])
    text = results.read_text()
    assert text.count("<!-- probe:start -->") == 1 and "first" not in text and "\nsecond\n<!-- probe:end -->" in text
    assert text.endswith("<!-- probe:end -->\n\n" + other + "\n\ntail\n")
    assert not (tmp_path / "RESULTS.md.partial").exists()
    results.write_text("<!-- probe:start -->\nhalf a section\n")  # a hand edit lost the end marker: nothing is written
    with pytest.raises(ValueError, match="<!-- probe:start --> without its pair"):
        common.write_section(results, "probe", "Probe", "third", MACHINE, argv=[])
    assert results.read_text() == "<!-- probe:start -->\nhalf a section\n"


def test_question_cost_writes_its_section_into_the_results_file(tmp_path):
    """A benchmark script's run puts its table into --results between its own markers, with the machine line and
    the command; another section and the text around it stay as they were."""
    results = tmp_path / "RESULTS.md"
    other = "<!-- quality:start -->\n## Answer quality\n\nnot touched\n<!-- quality:end -->"
    results.write_text(f"# Benchmark results\n\nintro\n\n{other}\n\n<!-- question_cost:start -->\nold numbers\n"
                       "<!-- question_cost:end -->\n\nend\n")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "question_cost.py"), "--sizes", "2", "--repeats",
                           "1", "--results", str(results)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()
    assert text.startswith(f"# Benchmark results\n\nintro\n\n{other}\n\n<!-- question_cost:start -->\n"
                           "## What one long question costs the encoding (`benchmarks/question_cost.py`)\n\n")
    assert text.endswith("<!-- question_cost:end -->\n\nend\n") and "old numbers" not in text
    section = text.split("<!-- question_cost:start -->")[1].split("<!-- question_cost:end -->")[0]
    assert f"UTC, `python benchmarks/question_cost.py --sizes 2 --repeats 1 --results {results}`.\n" in section
    assert "\nMachine: " in section and "torch threads" in section and "--quick" not in section
    rows = [line for line in section.splitlines() if line.startswith("| 2 kB |")]
    assert [row.split(" | ")[1] for row in rows] == ["-", "light"]  # what it printed, row for row
    assert all(row in done.stdout for row in rows)
