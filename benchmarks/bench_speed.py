#!/usr/bin/env python
"""optqa's speed against its peers on an OPT-125m-shaped model, measured side by side in one run.

    python benchmarks/bench_speed.py            # full run (~10 min on 2 cores)
    python benchmarks/bench_speed.py --quick    # smoke run (~3 min)

Builds (once, cached in --workdir) an OPT-125m-shaped backbone with random weights and ARC-DA-like data with
ARC-DA's token-length distribution, then measures, each configuration in its own process:

- training: real (non-pad) tokens/s and peak memory, optqa against a plain PEFT + torch loop on the same
  data (a) padded to max_seq_l like OpenPrompt and (b) padded per batch in random order, for LoRA and the
  adapter (the plain adapter loop uses optqa's adapter injection, the rest is plain: full logits, fp32,
  no bucketing); optqa with --precision fp32 shows how much comes from bf16 and how much from padding;
- answering: dev questions/s of optqa's batched generation against one question at a time;
- interactive start-up: seconds from launching ``--mode interactive_inference`` to its first
  ``Input a question:`` and to the first answer, next to a bare transformers model load;
- the share of computed tokens that are padding, for each.

It prints a markdown table (with the machine) and the ratios against the peers measured in the same run, and
writes them into its section of ``benchmarks/RESULTS.md`` (``--results``; ``bench_speed_avx2`` under
``--emulate avx2``).
Random weights never emit eos, so every answer runs to max_new_tokens in every method: answering does the
same work per question everywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
BATCH_SIZE = 8
MAX_SEQ_L = 128
LR = 1e-3
TITLE = "Speed: optqa against plain loops (`benchmarks/bench_speed.py`)"
TARGETS = {"max_seq_l": 2.0, "per_batch": 1.2, "answering": 10.0}
PADDING_NAMES = {"grouped": "per batch, length-grouped", "per_batch": "per batch, random order",
                 "max_seq_l": f"to max_seq_l ({MAX_SEQ_L})"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.bench_parser(__doc__, "smoke run: few steps, few questions, no ablation",
                                 "where the backbone, data and checkpoint are built and cached")
    parser.add_argument("--steps", type=int, help="timed training steps per configuration (default 20; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; quick 1)")
    parser.add_argument("--questions", type=int, help="dev questions answered by optqa (default 64; quick 8)")
    parser.add_argument("--single_questions", type=int,
                        help="dev questions answered one at a time (default 12; quick 3)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="answer tokens generated per question")
    parser.add_argument("--repl_runs", type=int, help="interactive start-ups timed (default 3; quick 1)")
    parser.add_argument("--deltas", nargs="+", default=["lora", "adapter"], choices=["lora", "adapter"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "answer", "repl"])
    parser.add_argument("--threads", type=int, help="torch threads in every measured process (default: optqa's "
                        "choice, one per usable physical core)")
    parser.add_argument("--json", help="also write every measurement to this file")
    # worker mode: one measurement in this process
    parser.add_argument("--worker", choices=["train", "answer"], help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["optqa", "optqa_fp32", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--delta", choices=["lora", "adapter"], help=argparse.SUPPRESS)
    parser.add_argument("--padding", choices=list(PADDING_NAMES), help=argparse.SUPPRESS)
    parser.add_argument("--plm", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return common.fill_counts(parser.parse_args(argv), (("steps", 20, 3), ("warmup", 2, 1), ("questions", 64, 8),
                                                          ("single_questions", 12, 3), ("repl_runs", 3, 1)))


# --- workers (each runs in its own process) ------------------------------------------------------------------

def delta_settings(delta: str) -> dict:
    from optqa.config import DELTA_CONFIGS

    return {k: v for k, v in DELTA_CONFIGS[delta]().to_dict().items() if k != "non_linearity"}


def encoded_train(plm_path: str, data: str, tokenizer=None):
    from transformers import AutoTokenizer

    from optqa.data import LMTokenizerWrapper, read_qa_jsonl
    from optqa.template import ManualTemplate

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(plm_path)
    wrapper = LMTokenizerWrapper(tokenizer, ManualTemplate(tokenizer, text=common.TEMPLATE.read_text()), MAX_SEQ_L)
    return wrapper.encode_all(read_qa_jsonl(Path(data) / "train.jsonl"), targets="first"), tokenizer


def pad_to(batch: dict, width: int, pad_id: int) -> dict:
    import torch

    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) for k, v in batch.items() if k in fill}


def worker_train(args) -> dict:
    """Timed training steps of one configuration; tokens/s counts real (non-pad) tokens only."""
    import torch
    from accelerate.utils import set_seed

    from optqa.data import LengthGroupedBatchSampler, collate_for_training
    from optqa.hardware import autocast_dtype, configure_threads

    configure_threads(None)
    set_seed(0)
    settings = delta_settings(args.delta)
    if args.impl.startswith("optqa"):
        from optqa.build import build_model
        from optqa.config import RunConfig

        config = RunConfig(plm_path=args.plm, data_path=args.data, template=str(common.TEMPLATE), lr=LR,
                           batch_size=BATCH_SIZE, max_seq_l=MAX_SEQ_L,
                           precision="fp32" if args.impl == "optqa_fp32" else "auto", **settings)
        model, _ = build_model(config)
        model.autocast_dtype = autocast_dtype(config.precision, model.device)
        precision = str(model.autocast_dtype or torch.float32).replace("torch.", "")
        encoded, tokenizer = encoded_train(args.plm, args.data, model.tokenizer)
        module, loss_of = model, model  # PromptForGeneration.forward: mean loss over answer tokens
    else:
        from transformers import AutoModelForCausalLM

        plm = AutoModelForCausalLM.from_pretrained(args.plm, dtype=torch.float32)
        if args.delta == "lora":
            import peft

            from optqa.deltas import resolve_modules

            # optqa's default names roles (attn_qv); a PEFT user names the Linears inside a layer (q_proj, v_proj)
            targets = sorted({name.split(".")[-1] for name in resolve_modules(plm, settings["modified_modules"])})
            module = peft.get_peft_model(plm, peft.LoraConfig(
                task_type="CAUSAL_LM", r=settings["lora_r"], lora_alpha=settings["lora_alpha"], lora_dropout=0.0,
                target_modules=targets))
        else:
            from optqa.deltas import AutoDeltaModel

            module = AutoDeltaModel.from_config(settings, backbone_model=plm).model
        precision = "float32"
        encoded, tokenizer = encoded_train(args.plm, args.data)

        def loss_of(batch):  # what a plain loop does: the model's own loss over full fp32 logits
            return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss

    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    pad_id = tokenizer.pad_token_id
    sampler = LengthGroupedBatchSampler([len(e) for e in encoded], BATCH_SIZE, seed=0,
                                        group_by_length=args.padding == "grouped")
    # a row padded to max_seq_l costs the same every step: half the steps measure it as well
    steps = max(1, args.steps // 2) if args.padding == "max_seq_l" else args.steps
    batches = list(sampler)[:args.warmup + steps]
    module.train()
    load_peak = common.process_peak_rss_mb()
    common.reset_peak_rss()
    real = computed = 0
    losses = []
    started = None
    for step, indices in enumerate(batches):
        if step == args.warmup:
            started = time.perf_counter()
        batch = collate_for_training([encoded[i] for i in indices], pad_id)
        if args.padding == "max_seq_l":
            batch = pad_to(batch, MAX_SEQ_L, pad_id)
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step >= args.warmup:
            real += int(batch["attention_mask"].sum())
            computed += batch["input_ids"].numel()
    seconds = time.perf_counter() - started
    return {"kind": "train", "impl": args.impl, "delta": args.delta, "padding": args.padding,
            "precision": precision, "steps": steps, "seconds": seconds, "real_tokens": real,
            "computed_tokens": computed, "tokens_per_s": real / seconds, "padding_share": 1 - real / computed,
            "train_peak_rss_mb": common.peak_rss_mb(), "load_peak_rss_mb": load_peak,
            "process_peak_rss_mb": common.process_peak_rss_mb(), "first_loss": losses[0], "threads": torch.get_num_threads()}


def worker_answer(args) -> dict:
    """Dev questions/s: optqa's batched path (``--mode evaluate``'s) or plain one-at-a-time greedy generation."""
    import torch

    from optqa.config import MODE_CONFIGS
    from optqa.data import collate_for_generation, generation_batches, read_qa_jsonl

    dev = read_qa_jsonl(Path(args.data) / "dev.jsonl")
    if args.impl == "optqa":
        from optqa.run.answering import load_for_answering
        from optqa.run.evaluation import predict

        # --mode evaluate's config and path on an fp32 / bf16 backbone; benchmarks/bench_int8.py measures int8
        config = MODE_CONFIGS["evaluate"](delta_save_path=args.checkpoint, max_new_tokens=args.max_new_tokens)
        model, _, saved = load_for_answering(config, quantize_default="none")
        encoded = model.wrapper.encode_all(dev[:args.questions])
        model.answer([dev[-1].text_a])  # warm-up, untimed, as for the peer
        common.reset_peak_rss()
        started = time.perf_counter()
        answers = predict(model, encoded, saved.eval_batch_size)
        seconds = time.perf_counter() - started
        batches = generation_batches(encoded, saved.eval_batch_size)
        widths = [collate_for_generation(b, 0)["input_ids"].numel() for b in batches]
        real = sum(len(e.prompt_ids) for e in encoded)
        precision = str(model.autocast_dtype or torch.float32).replace("torch.", "")
        batch_size = saved.eval_batch_size
    else:
        from optqa.build import load_trained
        from optqa.hardware import configure_threads

        configure_threads(None)
        model, _, _ = load_trained(args.checkpoint)  # LoRA left unmerged, fp32: what a plain PEFT user runs
        plm, tokenizer = model.plm, model.tokenizer
        encoded = model.wrapper.encode_all(dev[:args.questions])

        def one(prompt_ids):
            ids = torch.tensor([prompt_ids])
            with torch.no_grad():
                out = plm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                   max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
            return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

        one(model.wrapper.encode(dev[-1]).prompt_ids)  # warm-up
        common.reset_peak_rss()
        started = time.perf_counter()
        answers = [one(e.prompt_ids) for e in encoded]
        seconds = time.perf_counter() - started
        real = sum(len(e.prompt_ids) for e in encoded)
        widths = [real]
        precision, batch_size = "float32", 1
    return {"kind": "answer", "impl": args.impl, "questions": len(answers), "seconds": seconds,
            "questions_per_s": len(answers) / seconds, "prompt_padding_share": 1 - real / sum(widths),
            "precision": precision, "batch_size": batch_size, "peak_rss_mb": common.peak_rss_mb(),
            "answers": answers}


# --- interactive start-up ---------------------------------------------------------------------------------

def time_repl(checkpoint: str, max_new_tokens: int, timeout: float = 600, extra: tuple[str, ...] = ()) -> dict:
    """Seconds from launching the REPL to its first prompt, and to its first answer; ``extra``: more flags."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "optqa", "--mode", "interactive_inference", "--delta_save_path",
                             checkpoint, "--max_new_tokens", str(max_new_tokens), *extra], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=common.child_env(),
                            cwd=common.REPO)
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    marks: dict[str, float] = {}
    try:
        for line in proc.stdout:
            if line.startswith("Input a question:") and "prompt" not in marks:
                marks["prompt"] = time.perf_counter() - started
                proc.stdin.write("What is frozen water called?\n")
                proc.stdin.flush()
            elif line.startswith("Answer:"):
                marks["answer"] = time.perf_counter() - started
                proc.stdin.write("quit()\n")
                proc.stdin.flush()
                break
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    if "answer" not in marks:
        raise RuntimeError("the REPL gave no answer:\n" + "".join(errors[-15:]))
    return marks


def time_bare_load(plm: str) -> float:
    """The floor for any transformers-based REPL: start Python, import, load tokenizer and model."""
    code = ("from transformers import AutoModelForCausalLM, AutoTokenizer; import sys; "
            "AutoTokenizer.from_pretrained(sys.argv[1]); AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "print('ready', flush=True)")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, plm], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=common.child_env())
    ready = proc.stdout.readline()
    seconds = time.perf_counter() - started  # like the REPL's: up to the line, not the interpreter's exit
    proc.wait()
    if not ready.startswith("ready"):
        raise RuntimeError("a bare transformers load of the benchmark backbone failed")
    return seconds


def make_checkpoint(assets: dict, workdir: Path) -> str:
    """A LoRA checkpoint for the 125m-shaped backbone, written by optqa's own training command."""
    folder = workdir / "lora_ckpt"
    if (folder / "optqa_manifest.json").is_file():
        return str(folder)
    small = workdir / "ckpt-data"
    small.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 8), ("dev", 2), ("test", 2)):
        lines = (Path(assets["data"]) / f"{split}.jsonl").read_text().splitlines()[:count]
        (small / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    settings = delta_settings("lora")
    command = [sys.executable, "-m", "optqa", "--mode", "train", "--plm_path", assets["plm"], "--data_path", str(small),
               "--delta_type", "lora", "--modified_modules", *settings["modified_modules"], "--train_epochs", "1",
               "--max_new_tokens", "2", "--template", str(common.TEMPLATE), "--delta_save_path", str(folder),
               "--raw_delta_save_path", str(workdir / "raw_ckpt"), "--output_dir", str(workdir / "runs")]
    proc = subprocess.run(command, capture_output=True, text=True, env=common.child_env(), cwd=common.REPO)
    if proc.returncode != 0:
        raise RuntimeError("optqa could not train the benchmark checkpoint:\n" + proc.stderr[-2000:])
    return str(folder)


# --- the report -----------------------------------------------------------------------------------------------

def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def training_table(rows: list[dict]) -> tuple[str, list[str]]:
    lines = ["| delta | training loop | padding | precision | real tokens/s | padding share | peak RSS (MB) "
             "| optqa is |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    verdicts = []
    names = {"optqa": "optqa", "optqa_fp32": "optqa --precision fp32", "plain": "plain PEFT + torch"}
    for delta in dict.fromkeys(r["delta"] for r in rows):
        group = [r for r in rows if r["delta"] == delta]
        ours = next((r for r in group if r["impl"] == "optqa"), None)
        for r in group:
            versus = ("" if ours is None or r is ours else
                      f"{ratio(ours['tokens_per_s'], r['tokens_per_s'])} faster, "
                      f"{ratio(ours['train_peak_rss_mb'], r['train_peak_rss_mb'])} memory")
            name = names[r["impl"]]
            if r["impl"] == "plain" and delta != "lora":  # PEFT has no adapter: that peer runs optqa's injection
                name = f"plain torch loop (optqa's {delta})"
            lines.append(f"| {delta} | {name} | {PADDING_NAMES[r['padding']]} | {r['precision']} | "
                         f"{r['tokens_per_s']:.0f} | {100 * r['padding_share']:.0f}% | {r['train_peak_rss_mb']:.0f} | "
                         f"{versus or '-'} |")
            if ours is not None and r["impl"] == "plain":
                target = TARGETS[r["padding"]]
                speed = ours["tokens_per_s"] / r["tokens_per_s"]
                memory_ok = ours["train_peak_rss_mb"] <= r["train_peak_rss_mb"] * 1.02
                verdicts.append(f"{'PASS' if speed >= target and memory_ok else 'MISS'}: {delta} training "
                                f"{speed:.2f}x a plain loop padded {PADDING_NAMES[r['padding']]} (target >= "
                                f"{target}x), peak memory {ours['train_peak_rss_mb']:.0f} vs "
                                f"{r['train_peak_rss_mb']:.0f} MB")
    return "\n".join(lines), verdicts


def answering_table(rows: list[dict]) -> tuple[str, list[str]]:
    lines = ["| answering dev questions | batch | precision | questions/s | prompt padding share | peak RSS (MB) "
             "| optqa is |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    ours = next(r for r in rows if r["impl"] == "optqa")
    names = {"optqa": "optqa (batched, KV cache, merged LoRA)", "plain": "one question at a time (plain generate)"}
    for r in rows:
        versus = "-" if r is ours else f"{ratio(ours['questions_per_s'], r['questions_per_s'])} faster"
        lines.append(f"| {names[r['impl']]} | {r['batch_size']} | {r['precision']} | {r['questions_per_s']:.2f} | "
                     f"{100 * r['prompt_padding_share']:.0f}% | {r['peak_rss_mb']:.0f} | {versus} |")
    single = next(r for r in rows if r["impl"] == "plain")
    speed = ours["questions_per_s"] / single["questions_per_s"]
    same = sum(a == b for a, b in zip(ours["answers"], single["answers"]))
    return "\n".join(lines), [f"{'PASS' if speed >= TARGETS['answering'] else 'MISS'}: answering {speed:.1f}x "
                              f"one-at-a-time (target >= {TARGETS['answering']}x); {same} of "
                              f"{min(len(ours['answers']), len(single['answers']))} answers identical "
                              "(bf16 vs fp32 may differ on random weights)"]


def repl_table(runs: list[dict], bare: list[float]) -> str:
    prompt = statistics.median(r["prompt"] for r in runs)
    answer = statistics.median(r["answer"] for r in runs)
    floor = statistics.median(bare)
    return "\n".join([
        "| interactive start-up (median of %d) | seconds |" % len(runs), "| --- | ---: |",
        f"| launch -> first `Input a question:` | {prompt:.1f} |",
        f"| launch -> first answer ({runs[0].get('max_new_tokens', '')} tokens) | {answer:.1f} |",
        f"| floor: python + import transformers + load the same backbone | {floor:.1f} |"])


def report(results: dict, args, wall_s: float) -> str:
    """What ran, the tables of every measurement made, the PASS/MISS lines and the wall time (Markdown)."""
    lines = [f"OPT-125m shape (random weights), ARC-DA-like data, batch {BATCH_SIZE}, max_seq_l {MAX_SEQ_L}. "
             f"Training: {args.steps} timed steps per row ({max(1, args.steps // 2)} when padded to max_seq_l) after "
             f"{args.warmup} warm-up, each row in its own process; answering: {args.questions} dev questions batched, "
             f"{args.single_questions} one at a time, greedy, max_new_tokens {args.max_new_tokens} (random weights "
             "never emit eos, so every answer is that long in every method)."]
    verdicts = []
    for rows, table in ((results["train"], training_table), (results["answer"], answering_table)):
        if rows:
            text, found = table(rows)
            lines += ["", text]
            verdicts += found
    if results["repl"]:
        lines += ["", repl_table(results["repl"], results["bare_load"])]
    if verdicts:
        lines += [""] + [f"- {v}" for v in verdicts]
        if args.quick:
            lines.append("(--quick: a smoke run; a batch of a few questions and a few steps are too small to judge the "
                         "targets)")
    lines += ["", f"(benchmark wall time {wall_s:.0f} s)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.emulate(args)
    if args.worker:
        result = worker_train(args) if args.worker == "train" else worker_answer(args)
        Path(args.out).write_text(json.dumps(result))
        return 0
    total = time.perf_counter()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every worker and the REPL
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = common.machine()
    print(common.machine_markdown(info), flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * (info["usable_cpus"] or 1):
        print(f"warning: load average {load:.1f} on {info['usable_cpus']} CPUs: other work competes for the CPU, "
              "absolute numbers are low and ratios noisy", flush=True)
    assets = common.build_assets(workdir / "assets")
    lengths = common.length_report(assets["plm"], assets["data"], MAX_SEQ_L, BATCH_SIZE)
    arc = common.ARC_DA
    print(f"data: {lengths['questions']} ARC-DA-like questions; question tokens mean {lengths['question_mean']:.1f} "
          f"(ARC-DA {arc['question_mean']}), median {lengths['question_median']:.0f} ({arc['question_median']}), "
          f"p95 {lengths['question_p95']:.0f} ({arc['question_p95']}), max {lengths['question_max']} "
          f"({arc['question_max']}); answer mean {lengths['answer_mean']:.1f} ({arc['answer_mean']}); example mean "
          f"{lengths['example_mean']:.1f} ({arc['example_mean']}); padding to {MAX_SEQ_L} wastes "
          f"{lengths['pad_to_128_waste']:.0f}% ({arc['pad_to_128_waste']}%), random batches of {BATCH_SIZE} "
          f"{lengths['pad_random_batch8_waste']:.0f}% ({arc['pad_random_batch8_waste']}%)", flush=True)
    common_args = ["--plm", assets["plm"], "--data", assets["data"], "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--max_new_tokens", str(args.max_new_tokens)]
    results: dict = {"machine": info, "lengths": lengths, "train": [], "answer": [], "repl": [], "bare_load": []}
    out = workdir / "worker.json"

    if "train" not in args.skip:
        configs = [("optqa", "grouped")] + ([] if args.quick else [("optqa_fp32", "grouped")]) + [
            ("plain", "per_batch"), ("plain", "max_seq_l")]
        for delta in args.deltas:
            for impl, padding in configs:
                row = common.run_worker(SCRIPT, ["--worker", "train", "--impl", impl, "--delta", delta, "--padding",
                                                 padding, *common_args], out)
                print(f"  train {delta:7s} {impl:10s} {padding:9s}: {row['tokens_per_s']:7.0f} real tokens/s, "
                      f"padding {100 * row['padding_share']:3.0f}%, peak {row['train_peak_rss_mb']:.0f} MB "
                      f"({row['seconds']:.1f} s for {row['steps']} steps)", flush=True)
                results["train"].append(row)
    checkpoint = None
    if "answer" not in args.skip or "repl" not in args.skip:
        checkpoint = make_checkpoint(assets, workdir)
    if "answer" not in args.skip:
        for impl, count in (("optqa", args.questions), ("plain", args.single_questions)):
            row = common.run_worker(SCRIPT, ["--worker", "answer", "--impl", impl, "--checkpoint", checkpoint,
                                             "--questions", str(count), *common_args], out)
            print(f"  answer {impl:6s}: {row['questions_per_s']:.2f} questions/s ({row['questions']} questions in "
                  f"{row['seconds']:.1f} s)", flush=True)
            results["answer"].append(row)
    if "repl" not in args.skip:
        for _ in range(args.repl_runs):
            marks = time_repl(checkpoint, args.max_new_tokens)
            marks["max_new_tokens"] = args.max_new_tokens
            results["repl"].append(marks)
            results["bare_load"].append(time_bare_load(assets["plm"]))
            print(f"  repl: first prompt {marks['prompt']:.1f} s, first answer {marks['answer']:.1f} s "
                  f"(bare load {results['bare_load'][-1]:.1f} s)", flush=True)

    body = report(results, args, time.perf_counter() - total)
    print(f"\n### Speed: OPT-125m shape (random weights), ARC-DA-like data, batch {BATCH_SIZE}, "
          f"max_seq_l {MAX_SEQ_L}\n")
    print(common.machine_markdown(info) + ".")
    print(body)
    common.write_run(args, "bench_speed", TITLE, body, info, argv=argv)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
