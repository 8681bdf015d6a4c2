#!/usr/bin/env python
"""How many torch threads pay off: 1 thread against every usable CPU, on a quiet machine and beside a busy process.

    python benchmarks/threads.py            # full run (10-20 min on a loaded 2-core machine)
    python benchmarks/threads.py --quick    # smoke run (~3 min)

For each backbone (random weights built locally from ``OPTConfig``, no download): the demo's tiny OPT (hidden
64, 2 layers), a small one (hidden 256, 4 layers), a medium one (hidden 512, 6 layers) and an OPT-125m-shaped
one (hidden 768, 12 layers), with optqa's default delta, it times ``--steps`` training steps (forward, backward,
AdamW; batch 8 of the bundled sample) and answering ``--questions`` sample questions in one batch (greedy,
``--max_new_tokens``). Each is timed with 1 thread and with all usable CPUs, alternating,
``--repeats`` times, first on the machine as it is ("quiet") and then with a sibling process the script starts
spinning on one core ("busy"). The ratio is N threads' time over 1 thread's in the same condition of the same
run, of the medians and of the fastest repeats (on a shared machine, the moments its cores were free): under 1
means threads help. These numbers set ``optqa.hardware.choose_threads``'s rule (``SMALL_HIDDEN_SIZE``, the free CPUs).
Other jobs on a shared machine change the absolute times: the load average each condition ran under is printed.
The table also goes into its section of ``benchmarks/RESULTS.md`` (``--results``), with the machine and the date.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SAMPLE = common.REPO / "data" / "sample"
TITLE = "Threads: 1 against every usable CPU (`benchmarks/threads.py`)"
SHAPES = {
    "tiny (hidden 64, 2 layers)": {},
    "small (hidden 256, 4 layers)": dict(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4,
                                         word_embed_proj_dim=256),
    "medium (hidden 512, 6 layers)": dict(hidden_size=512, num_hidden_layers=6, ffn_dim=2048, num_attention_heads=8,
                                          word_embed_proj_dim=512),
    "OPT-125m shape (hidden 768, 12 layers)": None,  # optqa.tiny.OPT_125M_SHAPE
}


def parse_args(argv=None):
    parser = common.bench_parser(__doc__, "smoke run: fewer steps and repeats", "where the backbones are built")
    parser.add_argument("--steps", type=int, help="timed training steps per measurement (default 6; quick 2)")
    parser.add_argument("--questions", type=int, default=12, help="sample questions answered per measurement")
    parser.add_argument("--max_new_tokens", type=int, default=12, help="answer tokens per question (the demo's 12)")
    parser.add_argument("--repeats", type=int, help="alternating 1 / N thread measurements (default 3; quick 1)")
    parser.add_argument("--shapes", nargs="+", type=int, choices=range(len(SHAPES)), default=list(range(len(SHAPES))),
                        help="which backbones, by index: " + ", ".join(f"{i}: {n}" for i, n in enumerate(SHAPES)))
    return common.fill_counts(parser.parse_args(argv), (("steps", 6, 2), ("repeats", 3, 1)))


def spin() -> None:
    """The busy sibling: one core's worth of pure CPU work until the script ends it."""
    while True:
        pass


def build(workdir: Path, name: str, shape: dict | None) -> Path:
    from optqa.data import read_qa_jsonl
    from optqa.tiny import OPT_125M_SHAPE, build_opt

    folder = workdir / name.split(" (")[0].replace(" ", "-")
    if not (folder / "config.json").is_file():
        examples = read_qa_jsonl(SAMPLE / "train.jsonl") + read_qa_jsonl(SAMPLE / "test.jsonl")
        texts = [e.text_a for e in examples] + [a for e in examples for a in e.tgt_text]
        build_opt(folder, texts, seed=0, **(OPT_125M_SHAPE if shape is None else shape))
    return folder


class Work:
    """One backbone with optqa's default delta, ready to train a few steps and to answer."""

    def __init__(self, plm: Path, args):
        import torch

        from optqa.build import build_model
        from optqa.config import RunConfig
        from optqa.data import collate_for_training, read_qa_jsonl
        from optqa.hardware import autocast_dtype

        config = RunConfig(plm_path=str(plm), template=str(common.TEMPLATE), max_new_tokens=args.max_new_tokens)
        self.model, _ = build_model(config)
        self.model.autocast_dtype = autocast_dtype(config.precision, self.model.device)
        train = read_qa_jsonl(SAMPLE / "train.jsonl")
        encoded = self.model.wrapper.encode_all(train, targets="first")
        pad = self.model.tokenizer.pad_token_id
        self.batches = [collate_for_training(encoded[i:i + 8], pad) for i in range(0, len(encoded), 8)]
        self.questions = [e.text_a for e in read_qa_jsonl(SAMPLE / "dev.jsonl")][:args.questions]
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4)
        self.steps = args.steps

    def train_seconds(self) -> float:
        self.model.train()
        started = time.perf_counter()
        for step in range(self.steps):
            loss = self.model(self.batches[step % len(self.batches)])
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    def answer_seconds(self) -> float:
        self.model.eval()
        started = time.perf_counter()
        self.model.answer(self.questions)
        return time.perf_counter() - started


def measure(work: Work, threads: list[int], repeats: int) -> dict:
    """Median seconds per (task, threads), the thread counts alternating so drifting load hits them alike."""
    import torch

    times = {(task, n): [] for task in ("train", "answer") for n in threads}
    for n in threads:  # warm-up, untimed: first calls allocate and pick kernels
        torch.set_num_threads(n)
        work.train_seconds(), work.answer_seconds()
    for _ in range(repeats):
        for n in threads:
            torch.set_num_threads(n)
            times["train", n].append(work.train_seconds())
            times["answer", n].append(work.answer_seconds())
    # the median is the typical time; the minimum is the closest a shared machine comes to a quiet one
    return {key: (statistics.median(values), min(values)) for key, values in times.items()}


def main() -> None:
    args = parse_args()
    common.emulate(args)
    from optqa.hardware import usable_cpus

    info = common.machine()
    print(common.machine_markdown(info))
    workdir = Path(args.workdir) / "threads"
    workdir.mkdir(parents=True, exist_ok=True)
    many = usable_cpus()
    threads = [1, many] if many > 1 else [1]
    names = [list(SHAPES)[i] for i in args.shapes]
    works = {name: Work(build(workdir, name, SHAPES[name]), args) for name in names}
    rows, raw = [], []
    for condition in ("quiet", "busy"):
        sibling = None
        if condition == "busy":
            sibling = multiprocessing.Process(target=spin, daemon=True)
            sibling.start()
            time.sleep(1.0)
        try:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            for name, work in works.items():
                times = measure(work, threads, args.repeats)
                raw.append({"condition": condition, "backbone": name, "load_before": load,
                            "median_min_s": {f"{task}/{n}": s for (task, n), s in times.items()}})
                for task, what in (("train", f"{args.steps} training steps"),
                                   ("answer", f"{len(work.questions)} questions")):
                    (one, one_min), (all_, all_min) = times[task, 1], times[task, threads[-1]]
                    rows.append(f"| {condition} (load {load:.1f}) | {name} | {what} | {one:.3f} | {all_:.3f} | "
                                f"{all_ / one:.2f} | {all_min / one_min:.2f} |")
        finally:
            if sibling is not None:
                sibling.terminate()
                sibling.join()
    lines = [f"{args.repeats} alternating repeats, median seconds; ratio = {threads[-1]} threads / 1 thread "
             "(under 1: threads help), of the medians and of the fastest repeats. Load: the 1-minute load average as "
             "the condition began.", "",
             f"| machine | backbone | work | 1 thread, s | {threads[-1]} threads, s | ratio | ratio of fastest |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |", *rows]
    if hasattr(os, "getloadavg"):
        lines += ["", f"after: load average {os.getloadavg()[0]:.1f}"]
    body = "\n".join(lines)
    print("\n" + body)
    print(json.dumps(raw))
    common.write_run(args, "threads", TITLE, body, info)


if __name__ == "__main__":
    main()
