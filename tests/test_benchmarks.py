"""benchmarks/quality.py --quick on a tiny model: every row runs, and the table and chart are written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

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
