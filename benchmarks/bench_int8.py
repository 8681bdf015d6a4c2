#!/usr/bin/env python
"""int8 answering (``--quantize int8``) against fp32 (and bf16 where native) on an OPT-125m-shaped model, in one run.

    python benchmarks/bench_int8.py                # ~5 min on 2 cores, after the assets are built once
    python benchmarks/bench_int8.py --quick        # smoke run
    # an AVX2-only laptop's kernels, emulated on a newer CPU (ATen, MKL, fbgemm and oneDNN capped at AVX2):
    python benchmarks/bench_int8.py --emulate avx2

Prints what the CPU is (its flags, and the kernel level torch actually runs), then:

- the question loop: seconds per answer, one question at a time as a person types them, fp32 vs int8
  (int8 with and without the output head quantised), with the same LoRA checkpoint, merged, as
  ``--mode interactive_inference`` loads it; and the Linear calls of one decoding step alone, fp32 vs int8, the
  most the loop's ratio can be on this machine's kernels;
- batched answering (``--mode evaluate``'s path, batch 32): questions/s fp32 vs int8 vs bf16 (bf16 only where
  it is native: emulated bf16 is several times slower than fp32);
- agreement: greedy answers of a tiny OPT whose adapter memorised the bundled sample, fp32 vs int8;
- start-up: seconds from launching the question loop to its first ``Input a question:`` and first answer,
  with ``--quantize none`` and with the default (auto), against a bare transformers import-and-load;
  and where that time goes, phase by phase, in one fresh process per setting (``startup_phases``).

Random weights never emit eos, so every 125m-shaped answer runs to --max_new_tokens in every setting: each
does the same work per question. The report also goes into its section of ``benchmarks/RESULTS.md`` (``--results``;
``bench_int8_avx2`` under ``--emulate avx2``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_speed import make_checkpoint, time_bare_load, time_repl  # noqa: E402

TITLE = "int8 answering against fp32 and bf16 (`benchmarks/bench_int8.py`)"
GOALS = {"loop": 2.5, "batched_vs_single": 7.0, "agreement": 95.0, "first_answer": 1.3}


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.bench_parser(__doc__, "smoke run: few questions, one start-up each",
                                 "where the backbone, data and checkpoint are built and cached (shared with bench_speed)")
    parser.add_argument("--questions", type=int, help="dev questions answered in batches (default 64; quick 32)")
    parser.add_argument("--single_questions", type=int, help="questions answered one at a time (default 8; quick 3)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="answer tokens generated per question")
    parser.add_argument("--repl_runs", type=int, help="start-ups timed per setting (default 2; quick 1)")
    parser.add_argument("--threads", type=int, help="torch threads (default: optqa's choice)")
    return common.fill_counts(parser.parse_args(argv), (("questions", 64, 32), ("single_questions", 8, 3),
                                                          ("repl_runs", 2, 1)))


def step_matmuls(plm, use, rounds: int = 15) -> dict:
    """The Linear calls of one decoding step and nothing else: every frozen Linear of ``plm`` (OPT-125m: 72 layers
    and the head) called once on one row, in the model's order, fp32 and int8 passes taking turns so neither
    finds its weights in cache from the pass before (as in the loop, where the other work of a step runs between
    them). fp32 / int8 here is the most the question loop's ratio can be on these kernels: the rest of a step
    (attention, LayerNorm, the KV cache, Python) costs both the same and only lowers it.

    Returns:
        ``{"fp32_ms", "int8_ms", "ratio", "calls"}``, medians over ``rounds`` passes each.
    """
    import torch

    from optqa.quantize import frozen_linears

    linears = [module for _, module in frozen_linears(plm)]
    rows = {width: torch.randn(1, 1, width) for width in {module.in_features for module in linears}}
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            for name in ("fp32", "int8") if round_ % 2 else ("int8", "fp32"):
                use(name)
                started = time.perf_counter()
                for module in linears:
                    module(rows[module.in_features])
                if round_:  # the first round warms up
                    times[name].append(time.perf_counter() - started)
    fp32, int8 = (statistics.median(times[name]) * 1e3 for name in ("fp32", "int8"))
    return {"fp32_ms": fp32, "int8_ms": int8, "ratio": fp32 / int8, "calls": len(linears)}


def answering(checkpoint: str, data: str, args) -> dict:
    """Seconds per answer one at a time, and batched questions/s, per setting, on one loaded model.

    One at a time, fp32, int8 and int8 with an fp32 head take turns question by question, so a machine whose
    speed drifts over the minutes of a run moves them alike; switching costs nothing, the packed layers being
    kept (``quantize_int8``'s ``shared``). bf16 (where native) comes last: its answering rounds the frozen
    weights to bf16 in place. Batched, each setting answers the dev questions in turn."""
    import torch

    from optqa.answering import prepare_for_answering
    from optqa.build import load_trained
    from optqa.config import RunConfig
    from optqa.data import read_qa_jsonl
    from optqa.hardware import configure_threads, cpu_has_native_bf16
    from optqa.quantize import dequantize, quantize_int8
    from optqa.run.evaluation import predict

    configure_threads(args.threads)
    dev = read_qa_jsonl(Path(data) / "dev.jsonl")
    # LoRA merged as the question loop merges it, fp32
    model, _, saved = load_trained(checkpoint, overrides={"max_new_tokens": args.max_new_tokens}, merge_lora=True)
    prepare_for_answering(model, RunConfig(quantize="none", precision="fp32"))
    packed: dict = {}
    results: dict[str, dict] = {}
    results["quantize_seconds"] = quantize_int8(model.plm, shared=packed)["seconds"]
    dequantize(model.plm)
    results["quantize_seconds_one_thread"] = quantize_int8(model.plm, workers=1)["seconds"]
    dequantize(model.plm)

    times: dict[str, list[float]] = {}  # setting -> seconds per answer, one question at a time

    def use(name: str) -> None:
        dequantize(model.plm)
        model.autocast_dtype = None
        if name.startswith("int8"):
            quantize_int8(model.plm, head=name == "int8", shared=packed)  # model.quantization follows: "int8"
        elif name == "bf16":
            model.autocast_dtype = torch.bfloat16

    def one_at_a_time(turns: list[str]) -> None:
        for name in turns:
            use(name)
            model.answer([dev[-1].text_a])  # warm-up, untimed
        for round_, question in enumerate(e.text_a for e in dev[:args.single_questions]):
            for name in turns[round_ % len(turns):] + turns[:round_ % len(turns)]:  # each goes first in turn
                use(name)
                started = time.perf_counter()
                model.answer([question])
                times.setdefault(name, []).append(time.perf_counter() - started)

    settings = ["fp32", "int8", "int8, head fp32"]
    one_at_a_time(settings)
    results["step_matmuls"] = step_matmuls(model.plm, use)
    encoded = model.wrapper.encode_all(dev[:args.questions])
    if cpu_has_native_bf16():
        settings.append("bf16")
        one_at_a_time(["bf16"])
    for name in settings:
        row = results[name] = {"seconds_per_answer": statistics.median(times[name])}
        if name != "int8, head fp32":
            use(name)
            started = time.perf_counter()
            predict(model, encoded, saved.eval_batch_size)
            row["questions_per_s"] = len(encoded) / (time.perf_counter() - started)
        print(f"  {name}: {row}", flush=True)
    results["batch_size"] = saved.eval_batch_size
    return results


def kernels(threads: int | None, rows_list=(1, 32, 256), repeats: int = 7) -> dict:
    """The issue's own kernel measurement: 24 OPT-125m MLP matrices (12 fc1 768->3072, 12 fc2 3072->768) as frozen
    ``nn.Linear`` layers, called in fp32 and again after ``quantize_int8`` (the int8 path answering runs), at 1 row
    (one question decoding), 32 (a batch decoding) and 256 (a prompt pass). The weights are distinct (57 MB in
    int8, 226 MB in fp32), as a model's are, though a large L3 may still hold them between repeats.

    Returns:
        ``{rows: {"fp32_ms", "int8_ms", "ratio"}}``, each time the best of ``repeats`` passes over all 24.
    """
    import torch

    from optqa.hardware import configure_threads
    from optqa.quantize import quantize_int8

    configure_threads(threads)
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(*shape) for _ in range(12) for shape in ((768, 3072), (3072, 768)))
    layers.requires_grad_(False)
    inputs = {rows: {width: torch.randn(rows, width) for width in (768, 3072)} for rows in rows_list}

    def best_ms(rows: int) -> float:
        def one_pass() -> None:
            for layer in layers:
                layer(inputs[rows][layer.in_features])

        one_pass()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            one_pass()
            times.append(time.perf_counter() - started)
        return min(times) * 1e3

    with torch.inference_mode():
        fp32 = {rows: best_ms(rows) for rows in rows_list}
        quantize_int8(layers, workers=1)
        int8 = {rows: best_ms(rows) for rows in rows_list}
    return {rows: {"fp32_ms": fp32[rows], "int8_ms": int8[rows], "ratio": fp32[rows] / int8[rows]} for rows in rows_list}


# Run in a fresh process: the question loop's start-up, phase by phase, through the library calls it makes.
PHASES = r"""
import json, sys, time
marks = [("start", time.perf_counter())]
checkpoint, max_new_tokens, choice, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
import torch
marks.append(("import torch", time.perf_counter()))
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
marks.append(("import transformers", time.perf_counter()))
from optqa.build import load_trained
from optqa.config import RunConfig
from optqa.answering import prepare_for_answering
from optqa.quantize import quantize_int8, resolve_quantize
from optqa.hardware import configure_threads
marks.append(("import optqa (assemble, answering, quantize)", time.perf_counter()))
configure_threads(threads or None)
model, _, _ = load_trained(checkpoint, overrides={"max_new_tokens": max_new_tokens}, merge_lora=True)
marks.append(("load_trained: read + verify the checkpoint, load the backbone, fingerprint it, merge LoRA (no PEFT)",
              time.perf_counter()))
resolved = resolve_quantize(choice, "auto", model.device)
prepare_for_answering(model, RunConfig(quantize="none", precision="fp32" if resolved == "int8" else "auto"))
if resolved == "int8":
    stats = quantize_int8(model.plm)
    marks.append((f"pack int8 ({stats['layers']} layers, {torch.get_num_threads()} torch threads)", time.perf_counter()))
model.answer(["Which gas do plants take in?"], max_new_tokens=1)
marks.append(("first forward, 1 token (kernel warm-up)", time.perf_counter()))
model.answer(["What is frozen water called?"])
marks.append((f"answer, {max_new_tokens} tokens", time.perf_counter()))
print(json.dumps({"resolved": resolved, "phases": [(name, t - marks[i][1]) for i, (name, t) in enumerate(marks[1:])]}))
"""


def startup_phases(checkpoint: str, max_new_tokens: int, choice: str, threads: int | None) -> dict:
    """Seconds per phase of the question loop's start-up in a fresh process (the interpreter's own start, a few
    hundredths of a second, is not in it): imports, ``load_trained``, LoRA merge, int8 packing, the first forward
    and one answer."""
    done = subprocess.run([sys.executable, "-c", PHASES, checkpoint, str(max_new_tokens), choice, str(threads or 0)],
                          capture_output=True, text=True, env=common.child_env(), cwd=common.REPO, timeout=600,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError("the start-up phases could not be timed:\n" + done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement() -> dict:
    """Greedy answers of a tiny OPT whose adapter memorised the bundled sample's 40 training questions, fp32 vs
    int8: on those (a trained model's answers) and on the unseen dev/test questions, where a random backbone
    answers noise whose top tokens are near ties."""
    import torch

    from optqa.build import build_model
    from optqa.config import REPO_ROOT, RunConfig
    from optqa.data import collate_for_training, read_qa_jsonl
    from optqa.quantize import quantize_int8
    from optqa.tiny import build_opt

    sample = REPO_ROOT / "data" / "sample"
    rows = {split: read_qa_jsonl(sample / f"{split}.jsonl") for split in ("train", "dev", "test")}
    texts = [t for split in rows.values() for e in split for t in (e.text_a, *e.tgt_text)]
    folder = Path(tempfile.mkdtemp(prefix="optqa-int8-tiny-"))
    build_opt(folder, texts, seed=0)
    torch.manual_seed(0)
    model, _ = build_model(RunConfig(plm_path=str(folder), delta_type="adapter", bottleneck_dim=64, max_new_tokens=12,
                                     max_seq_l=96), template=common.TEMPLATE.read_text())
    batch = collate_for_training(model.wrapper.encode_all(rows["train"], targets="first"), model.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(300):  # memorises all 40 (loss ~0.06)
        model(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    groups = {"trained": rows["train"], "unseen": rows["dev"] + rows["test"]}
    fp32 = {name: model.answer([e.text_a for e in group]) for name, group in groups.items()}
    quantize_int8(model.plm)
    result = {"memorised": sum(a in e.tgt_text for a, e in zip(fp32["trained"], rows["train"]))}
    for name, group in groups.items():
        int8 = model.answer([e.text_a for e in group])
        result[name] = {"questions": len(group), "same": sum(a == b for a, b in zip(fp32[name], int8)),
                        "differ": [(e.text_a, a, b) for e, a, b in zip(group, fp32[name], int8) if a != b]}
    return result


def report(args, info: dict, answer: dict, kernel: dict, agree: dict, startup: dict) -> str:
    """The tables and lines printed at the end and written to RESULTS.md (Markdown): the question loop and batched
    answering, the kernel pair, packing, agreement, start-up against the floor and where it goes.

    ``startup``: ``{"bare": [s], "repl": {quantize: [marks]}, "loads": [load before, after], "phases": {...}}``."""
    import torch

    from optqa.quantize import resolve_quantize

    bare, repl, loads, phases = startup["bare"], startup["repl"], startup["loads"], startup["phases"]
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)

    fp32, int8 = answer["fp32"], answer["int8"]
    say(f"| {info['cpu']} ({torch.backends.cpu.get_cpu_capability()} kernels) | fp32 | int8 | int8, head fp32 |"
        + (" bf16 |" if "bf16" in answer else ""))
    say("| --- | --- | --- | --- |" + (" --- |" if "bf16" in answer else ""))
    say(f"| question loop, s per answer ({args.max_new_tokens} tokens) | {fp32['seconds_per_answer']:.3f} | "
        f"{int8['seconds_per_answer']:.3f} ({fp32['seconds_per_answer'] / int8['seconds_per_answer']:.2f}x) | "
        f"{answer['int8, head fp32']['seconds_per_answer']:.3f} |"
        + (f" {answer['bf16']['seconds_per_answer']:.3f} |" if "bf16" in answer else ""))
    say(f"| batched (batch {answer['batch_size']}), questions/s | {fp32['questions_per_s']:.2f} | "
        f"{int8['questions_per_s']:.2f} ({int8['questions_per_s'] / fp32['questions_per_s']:.2f}x) | - |"
        + (f" {answer['bf16']['questions_per_s']:.2f} |" if "bf16" in answer else ""))
    single_qps = 1 / fp32["seconds_per_answer"]
    say(f"| batched vs fp32 one at a time | {fp32['questions_per_s'] / single_qps:.2f}x | "
        f"{int8['questions_per_s'] / single_qps:.2f}x | - |"
        + (f" {answer['bf16']['questions_per_s'] / single_qps:.2f}x |" if "bf16" in answer else ""))
    step = answer["step_matmuls"]
    say(f"| one decoding step's {step['calls']} Linear calls alone, 1 row, ms | {step['fp32_ms']:.2f} | "
        f"{step['int8_ms']:.2f} ({step['ratio']:.2f}x: the loop's ceiling on these kernels) | - |"
        + (" - |" if "bf16" in answer else ""))
    thread_count = f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    say(f"\n| int8 Linear vs fp32, 24 OPT-125m MLP matrices, {thread_count} | "
        + " | ".join(f"{rows} row{'s' if rows > 1 else ''}" for rows in kernel) + " |")
    say("| --- |" + " --- |" * len(kernel))
    say("| fp32 / int8, ms | " + " | ".join(f"{k['fp32_ms']:.1f} / {k['int8_ms']:.1f}" for k in kernel.values()) + " |")
    say("| int8 speed-up | " + " | ".join(f"{k['ratio']:.2f}x" for k in kernel.values()) + " |")
    # packing runs on torch's threads (--threads here, --num_threads in optqa)
    say(f"\nquantising the backbone took {answer['quantize_seconds']:.2f} s on {thread_count}"
        + (f" ({answer['quantize_seconds_one_thread']:.2f} s on one)" if info["threads"] != 1 else ""))
    say(f"agreement with fp32: the {agree['trained']['questions']} trained questions (fp32 memorised "
        f"{agree['memorised']}): {agree['trained']['same']} identical "
        f"({100 * agree['trained']['same'] / agree['trained']['questions']:.1f}%); the "
        f"{agree['unseen']['questions']} unseen ones: {agree['unseen']['same']} identical\n")
    for name in ("trained", "unseen"):
        for question, a, b in agree[name]["differ"]:
            say(f"- {name}, differs: {question!r}: fp32 {a!r}, int8 {b!r}")
    floor = statistics.median(bare)
    auto = resolve_quantize("auto", "auto", torch.device("cpu"))
    say(f"\nstart-up (median of {args.repl_runs}; auto is {auto} here), import-and-load floor {floor:.2f} s"
        + (f" (1-minute load average {loads[0]:.2f} before, {loads[1]:.2f} after, on {os.cpu_count()} CPUs)"
           if loads else "") + ":\n")
    for q, runs in repl.items():
        prompt = statistics.median(r["prompt"] for r in runs)
        first = statistics.median(r["answer"] for r in runs)
        say(f"- --quantize {q}: first prompt {prompt:.2f} s, first answer {first:.2f} s ({first / floor:.2f}x the "
            f"floor; goal <= {GOALS['first_answer']}x)")
    for q, measured in phases.items():
        say(f"\nwhere the start-up goes, --quantize {q} (= {measured['resolved']}), one fresh process:\n")
        for name, seconds in measured["phases"]:
            say(f"- {seconds:.3f} s: {name}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.emulate(args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    info = common.machine()
    info["threads"] = args.threads or info["threads"]  # machine() reports optqa's default; answering uses these
    print(common.machine_markdown(info))
    print("kernels (the issue's measurement: 24 OPT-125m MLP matrices, fp32 vs int8):", flush=True)
    kernel = kernels(args.threads)
    assets = common.build_assets(workdir / "assets")
    checkpoint = make_checkpoint(assets, workdir)
    print("answering (LoRA checkpoint, merged; OPT-125m shape):", flush=True)
    answer = answering(checkpoint, assets["data"], args)
    print("agreement (tiny OPT, adapter memorised data/sample):", flush=True)
    agree = agreement()
    print("start-up:", flush=True)
    threads = ("--num_threads", str(args.threads)) if args.threads else ()
    bare: list[float] = []
    repl: dict[str, list[dict]] = {"none": [], "auto": []}
    loads = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []  # other jobs on the machine move the ratios
    for _ in range(args.repl_runs):  # round by round, so a change in the machine's load moves floor and loop alike
        bare.append(time_bare_load(assets["plm"]))
        for q, runs in repl.items():
            runs.append(time_repl(checkpoint, args.max_new_tokens, extra=("--quantize", q, *threads)))
    loads += [os.getloadavg()[0]] if loads else []
    phases = {q: startup_phases(checkpoint, args.max_new_tokens, q, args.threads) for q in ("none", "auto")}

    body = report(args, info, answer, kernel, agree, {"bare": bare, "repl": repl, "loads": loads, "phases": phases})
    print("\n" + body)
    common.write_run(args, "bench_int8", TITLE, body, info, argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
