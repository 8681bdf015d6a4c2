"""Shared fixtures: a tiny OPT + tokenizer built once per session, and small ARC-DA-format data sets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
FIXTURES = REPO / "tests" / "fixtures"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny models gain nothing from more threads, and spinning OpenMP threads on a busy 2-core CI machine make each
# step several times slower; set before torch is imported, and inherited by the CLI subprocesses
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Eight short questions with one-token-ish answers: small enough to memorise in a few seconds.
MEMORY_SET = [
    ("What gas do plants take in from the air?", ["carbon dioxide", "co2"]),
    ("What pulls a dropped ball to the ground?", ["gravity"]),
    ("What is frozen water called?", ["ice"]),
    ("Which organ pumps blood through the body?", ["the heart", "heart"]),
    ("What do bees make from nectar?", ["honey"]),
    ("Which planet is called the red planet?", ["mars"]),
    ("What is the closest star to Earth?", ["the sun", "sun"]),
    ("What process turns liquid water into vapor?", ["evaporation"]),
]


def pytest_configure(config):
    config.addinivalue_line("markers", "families: the family x delta-type cases outside tests/test_families.py's "
                                       "default slice; run them with -m families, the whole matrix with "
                                       "OPTQA_FAMILIES=1")


def pytest_collection_modifyitems(config, items):
    """The ``families`` cases run only when asked for (``-m families`` or ``OPTQA_FAMILIES=1``): the whole
    matrix is 50 trainings, the default slice covers each family once."""
    if "families" in (config.getoption("markexpr") or "") or os.environ.get("OPTQA_FAMILIES") == "1":
        return
    deselected = [item for item in items if "families" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if "families" not in item.keywords]


def sample_texts() -> list[str]:
    texts = []
    for split in ("train", "dev", "test"):
        for line in (SAMPLE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["question"], *row["answers"]]
    texts += [q for q, _ in MEMORY_SET] + [a for _, answers in MEMORY_SET for a in answers]
    return texts


def write_split(folder: Path, rows: list[tuple[str, list[str]]], split: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i, (question, answers) in enumerate(rows):
            handle.write(json.dumps({"question_id": f"{split}-{i}", "tag": "EASY", "question": question,
                                     "answers": answers}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    """A random 2-layer OPT (hidden 64) with a BPE tokenizer trained on the sample texts."""
    from optqa.tiny import build_opt

    return build_opt(tmp_path_factory.mktemp("tiny-opt"), sample_texts(), seed=0)


@pytest.fixture(scope="session")
def lively_opt(tmp_path_factory):
    """A tiny OPT with large random weights: its greedy answers differ from question to question without any
    training (tiny_opt answers every question alike until a delta is trained), so soft prompts and prefixes,
    which barely train on a random backbone, still get a meaningful batched-vs-single comparison."""
    from optqa.tiny import build_opt

    return build_opt(tmp_path_factory.mktemp("lively-opt"), sample_texts(), seed=0, init_std=0.3, embedding_std=1.0)


@pytest.fixture(scope="session")
def memory_data(tmp_path_factory) -> Path:
    """train = dev = test = MEMORY_SET: scores measure memorisation."""
    folder = tmp_path_factory.mktemp("memory-data")
    for split in ("train", "dev", "test"):
        write_split(folder, MEMORY_SET, split)
    return folder


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE


def run_cli(*args: str, stdin: str | None = None, cwd: Path | None = None, timeout: int = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m optqa`` as a user would; returns the completed process (never raises on failure)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "optqa", *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout, env=full_env)


def train_args(plm: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Flags for a quick training run whose outputs all land below ``out``."""
    return ["--mode", "train", "--plm_path", str(plm), "--data_path", str(data),
            "--delta_save_path", str(out / "delta_ckpts"), "--raw_delta_save_path", str(out / "raw_delta_ckpts"),
            "--output_dir", str(out / "runs"), *extra]


def train_in_process(plm: Path, data: Path, out: Path, *extra: str, on_step=None):
    """``python -m optqa`` train flags run by the library in this process (no interpreter start-up); the
    ``TrainSummary``. ``on_step`` is the recipe's hook, called with the global step after each optimiser step."""
    from optqa.cli import parse_args, training_config
    from optqa.run.training import train

    config = training_config(parse_args(train_args(plm, data, out, *extra)))
    return train(config, on_step=on_step)


def stop_at(step: int):
    """An ``on_step`` hook that presses Ctrl-C right after optimiser step ``step`` (and after the resume state
    that step saved, if it saved one): a run stopped at an exact step, with no timing involved."""
    def on_step(global_step: int) -> None:
        if global_step == step:
            raise KeyboardInterrupt
    return on_step


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread while a module runs: a tiny model gains nothing from more, and on a shared, busy
    machine spinning OpenMP threads make each step several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def closed_port():
    """A local port where every connection is refused at once: bound but not listening, and held bound for the
    whole test, so no other program can start listening on it in between (as it could on a port found free
    and closed again)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
