"""Answer quality on a real backbone: every delta type, the prompting baselines and a plain PEFT LoRA loop, side
by side on the dev split.

```bash
python benchmarks/quality.py --plm_path ./SmolLM2-135M-Instruct --data_path ../shared/data/ARC-DA-v1.1
python benchmarks/quality.py --plm_path ./SmolLM2-135M-Instruct --data_path ... --quick   # smoke run, minutes
```

Rows, each scored on dev (F1/EM in percent, SQuAD-style, best over the gold answers):

- the baselines, through ``python -m optqa --mode evaluate --no_delta``: zero-shot, ``--num_shots`` shots, and
  ``--chat_template`` (where the tokenizer has one);
- every delta type with its default recipe, through ``python -m optqa --mode train --delta_type T`` (the test
  split is kept back, so training's final "test" scores are dev's: ``--test_file`` is the dev file), then
  ``--mode evaluate`` of the saved checkpoint on dev (the answering time);
- a plain PEFT LoRA loop with the same budget (epochs, learning rate, batch size, max_seq_l, max_new_tokens): what
  a user writes from PEFT's docs: ``get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r, lora_alpha))`` with
  PEFT's default target modules, AdamW with a linear schedule, the same prompt text as optqa's default template,
  greedy ``generate``.

``--systems`` runs some rows only (``baselines``, delta types, ``peft``): every row is kept in
``<workdir>/rows.jsonl`` with the backbone, data and settings it ran with, and the table holds the newest row of
each system run with the same ones, so the rows can be run one after the other, or at once in separate processes.

optqa runs in this process through its command line (``optqa.cli.main``), as a user runs it, one system after the
other on the same torch threads. Training time is the train command's wall time, model loading and optqa's dev
scoring after every epoch included; "train s net" takes off that dev scoring (epochs + 1 times the answering time
of the separate dev evaluation: the final scores are dev's too), comparable with the PEFT loop, which scores
once. The table and a chart are written to ``benchmarks/RESULTS.md`` (the section between
``<!-- quality:start -->`` and ``<!-- quality:end -->``, replaced on every run, with the machine and the date)
and ``benchmarks/quality.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, command_line, log_results, logged_results, machine, machine_markdown, write_run  # noqa: E402

TITLE = "Answer quality on dev (`benchmarks/quality.py`)"
# --quick: a smoke run of every row in minutes on a real backbone, seconds on a tiny one
QUICK = {"train": 16, "dev": 8, "train_epochs": 1, "max_steps": 2, "max_new_tokens": 8}


@dataclass
class Row:
    """One system's dev scores and costs (None: not applicable, e.g. a baseline trains nothing)."""
    system: str
    f1: float | None = None
    em: float | None = None
    trainable: int | None = None
    checkpoint_bytes: int | None = None
    train_s: float | None = None
    train_net_s: float | None = None
    answer_s: float | None = None
    note: str = ""
    # when and by which command the row was run: rows of several runs (--systems) fill one table
    ran: str = ""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plm_path", required=True, help="the backbone: a Hugging Face folder (or what optqa's "
                                                          "--plm_path accepts, e.g. a .gguf file)")
    parser.add_argument("--data_path", required=True, help="ARC-DA-format folder with train.jsonl and dev.jsonl")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['train']} train and {QUICK['dev']} dev questions, "
                             f"{QUICK['train_epochs']} epoch of at most {QUICK['max_steps']} steps")
    parser.add_argument("--num_shots", type=int, default=5, help="shots of the few-shot baseline")
    parser.add_argument("--num_threads", type=int, default=None, help="torch threads (default: optqa's choice)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--systems", nargs="+", default=None, metavar="SYSTEM",
                        help="rows to (re)run: 'baselines', delta types, 'peft' (default: all). Rows are kept in "
                             "<workdir>/rows.jsonl, so runs of different systems (one after the other, or at once "
                             "in separate processes) fill one table")
    parser.add_argument("--workdir", default=str(REPO / "benchmarks" / "quality-work"),
                        help="checkpoints, run folders and the quick data subset go here")
    parser.add_argument("--results", default=str(RESULTS), help="the Markdown file its section is written into")
    parser.add_argument("--chart", default=str(REPO / "benchmarks" / "quality.png"))
    return parser.parse_args(argv)


# ---- data --------------------------------------------------------------------------------------------------


def prepare_data(args) -> Path:
    """The data folder the runs read: ``--data_path``, or with ``--quick`` a subset of it in the work folder
    (the first train and dev questions)."""
    source = Path(args.data_path)
    if not args.quick:
        return source
    target = Path(args.workdir) / "data"
    target.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        lines = [line for line in (source / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line]
        (target / f"{split}.jsonl").write_text("\n".join(lines[:QUICK[split]]) + "\n", encoding="utf-8")
    return target


def budget(args) -> dict:
    """What both optqa and the PEFT loop get: optqa's defaults for LoRA on the backbone's family (the quick
    settings on top)."""
    from optqa.config import MODE_CONFIGS, RunConfig
    from optqa.plm import backbone_model_type

    lora = RunConfig.of(MODE_CONFIGS["train"](delta_type="lora"), model_type=backbone_model_type(args.plm_path))
    settings = {name: getattr(lora, name) for name in ("train_epochs", "lr", "batch_size", "max_seq_l",
                                                       "max_new_tokens", "eval_batch_size", "lora_r", "lora_alpha",
                                                       "max_steps", "warmup_steps")}
    if args.quick:
        settings.update({k: QUICK[k] for k in ("train_epochs", "max_steps", "max_new_tokens")})
    return settings


# ---- optqa, through its command line --------------------------------------------------------------------------


def optqa(argv: list[str]) -> float:
    """Run ``python -m optqa ARGV`` in this process; returns its wall time in seconds.

    Raises:
        RuntimeError: optqa refused or failed, with its ``error:`` line.
    """
    from optqa.cli import main

    err = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    if status:
        lines = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
        raise RuntimeError(lines[-1] if lines else f"exit status {status}")
    return time.perf_counter() - started


def _shared(args, data: Path, out: Path) -> list[str]:
    flags = ["--data_path", str(data), "--test_file", str(data / "dev.jsonl"), "--output_dir", str(out / "runs"),
             "--seed", str(args.seed)]
    if args.num_threads:
        flags += ["--num_threads", str(args.num_threads)]
    if args.quick:
        flags += ["--max_new_tokens", str(QUICK["max_new_tokens"])]
    return flags


def _last_metrics(out: Path) -> dict:
    [run] = sorted((out / "runs").glob("evaluate-*"))[-1:]
    return json.loads((run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0])


def score_on_dev(args, data: Path, out: Path, source: list[str]) -> tuple[dict, float]:
    """``--mode evaluate --split dev`` with ``source`` (a checkpoint or baseline flags): its metrics row and wall
    time."""
    seconds = optqa(["--mode", "evaluate", "--split", "dev", *source, *_shared(args, data, out)])
    return _last_metrics(out), seconds


def baseline_rows(args, data: Path, settings: dict) -> list[Row]:
    """Zero-shot, few-shot and chat-template baselines of the bare backbone."""
    from transformers import AutoTokenizer

    from optqa.plm import backbone_max_positions

    chat = bool(getattr(AutoTokenizer.from_pretrained(args.plm_path), "chat_template", None)) \
        if Path(args.plm_path).is_dir() else True
    # K shots take about K questions' room more: --max_seq_l grows with them, up to the backbone's positions
    room = settings["max_seq_l"] * (args.num_shots + 1)
    positions = backbone_max_positions(args.plm_path)
    if positions:
        room = min(room, positions - settings["max_new_tokens"])
    shots = ["--num_shots", str(args.num_shots), "--max_seq_l", str(room)]
    systems = [("zero-shot", []), (f"{args.num_shots}-shot", shots), ("zero-shot, chat template", ["--chat_template"]),
               (f"{args.num_shots}-shot, chat template", ["--chat_template", *shots])]
    rows = []
    for name, flags in systems:
        if "--chat_template" in flags and not chat:
            rows.append(Row(name, note="skipped: the tokenizer has no chat template"))
            continue
        out = Path(args.workdir) / ("baseline-" + name.replace(", ", "-").replace(" ", "-"))
        try:
            metrics, seconds = score_on_dev(args, data, out, ["--no_delta", "--plm_path", args.plm_path, *flags])
        except RuntimeError as exc:
            rows.append(Row(name, note=str(exc)))
            continue
        rows.append(Row(name, metrics["dev_f1"], metrics["dev_em"], trainable=0, answer_s=seconds))
    return rows


def delta_row(args, data: Path, delta_type: str, settings: dict) -> Row:
    """Train ``delta_type`` with its default recipe, then score the saved checkpoint on dev."""
    out = Path(args.workdir) / f"delta-{delta_type}"
    ckpt = out / "delta_ckpts"
    flags = ["--mode", "train", "--plm_path", args.plm_path, "--delta_type", delta_type, "--delta_save_path",
             str(ckpt), "--raw_delta_save_path", str(out / "raw_delta_ckpts"), *_shared(args, data, out)]
    if args.quick:
        flags += ["--train_epochs", str(settings["train_epochs"]), "--max_steps", str(settings["max_steps"])]
    name = f"optqa {delta_type}"
    try:
        train_s = optqa(flags)
        metrics, answer_s = score_on_dev(args, data, out, ["--delta_save_path", str(ckpt)])
    except RuntimeError as exc:
        return Row(name, note=str(exc))
    manifest = json.loads((ckpt / "optqa_manifest.json").read_text(encoding="utf-8"))
    [run] = sorted((out / "runs").glob("train-*"))[-1:]
    epochs = sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line)
    hyper = manifest["hyperparameters"]
    note = f"lr {hyper['lr']:g}, {hyper['train_epochs']} epochs"
    if hyper.get("modified_modules"):
        note += ", modules " + " ".join(hyper["modified_modules"])
    return Row(name, metrics["dev_f1"], metrics["dev_em"], manifest["trainable_parameters"],
               sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()), train_s,
               max(train_s - (epochs + 1) * answer_s, 0.0), answer_s, note)


# ---- the peer: a plain PEFT LoRA loop -------------------------------------------------------------------------


def _read(path: Path) -> list[tuple[str, list[str]]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["question"].strip(), [r["answers"]] if isinstance(r["answers"], str) else r["answers"]) for r in rows]


def peft_row(args, data: Path, settings: dict) -> Row:
    """LoRA as PEFT's docs write it: ``get_peft_model``, AdamW, a linear schedule, greedy ``generate``.

    Same prompt text as optqa's default template (``<question> Answer:``), target = `` <first answer><eos>``
    with the loss on the target only, the same epochs, learning rate, batch size, max_seq_l and max_new_tokens.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    from optqa.gguf import dequantized_folder, is_gguf_path
    from optqa.metrics import score

    # a GGUF file: the plain loop reads the same dequantised folder optqa made of it (as a user would save one)
    folder = dequantized_folder(Path(args.plm_path)) if is_gguf_path(Path(args.plm_path)) else Path(args.plm_path)
    if not folder.is_dir():
        return Row("PEFT LoRA loop", note="skipped: the plain loop loads a Hugging Face folder or a GGUF file only")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=settings["lora_r"],
                                             lora_alpha=settings["lora_alpha"]))
    train, dev = _read(data / "train.jsonl"), _read(data / "dev.jsonl")
    examples = []
    for question, answers in train:
        target = tokenizer(" " + answers[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt = tokenizer(f"{question} Answer:")["input_ids"][:max(settings["max_seq_l"] - len(target), 1)]
        examples.append((prompt + target, [-100] * len(prompt) + target))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings["lr"])
    batches = (len(examples) + settings["batch_size"] - 1) // settings["batch_size"]
    total = batches * settings["train_epochs"]
    if settings["max_steps"]:
        total = min(total, settings["max_steps"])
    scheduler = get_linear_schedule_with_warmup(optimizer, settings["warmup_steps"], total)
    model.train()
    step = 0
    for epoch in range(settings["train_epochs"]):
        order = list(range(len(examples)))
        random.Random(args.seed + epoch).shuffle(order)
        for start in range(0, len(order), settings["batch_size"]):
            if step == total:
                break
            chunk = [examples[i] for i in order[start:start + settings["batch_size"]]]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in chunk])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk])
            model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
    train_s = time.perf_counter() - started
    model.eval()
    tokenizer.padding_side = "left"
    started = time.perf_counter()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(dev), settings["eval_batch_size"]):
            prompts = [f"{q} Answer:" for q, _ in dev[start:start + settings["eval_batch_size"]]]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True)
            out = model.generate(**encoded, max_new_tokens=settings["max_new_tokens"], do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            predictions += [t.strip() for t in tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:],
                                                                        skip_special_tokens=True)]
    answer_s = time.perf_counter() - started
    metrics = score(predictions, [golds for _, golds in dev])
    saved = Path(args.workdir) / "peft-lora"
    model.save_pretrained(saved)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    modules = " ".join(sorted(model.peft_config["default"].target_modules))
    return Row("PEFT LoRA loop", metrics["f1"], metrics["em"], trainable,
               sum(f.stat().st_size for f in saved.iterdir() if f.is_file()), train_s, train_s, answer_s,
               f"lr {settings['lr']:g}, {settings['train_epochs']} epochs, modules {modules} (PEFT's default)")


# ---- the report -----------------------------------------------------------------------------------------------


def _run_key(args) -> dict:
    """What makes rows comparable: the same backbone, data, subset and shots."""
    return {"plm_path": args.plm_path, "data_path": args.data_path, "quick": args.quick, "num_shots": args.num_shots}


def kept(path: Path, args) -> list[Row]:
    """The newest row of every system in the rows file run with ``args``' key, in the table's order: baselines,
    delta types, PEFT."""
    from optqa.config import DELTA_TYPES

    newest = [Row(**fields) for fields in logged_results(path, _run_key(args), "system")]
    shots = args.num_shots
    order = ["zero-shot", f"{shots}-shot", "zero-shot, chat template", f"{shots}-shot, chat template",
             *(f"optqa {t}" for t in DELTA_TYPES), "PEFT LoRA loop"]
    return sorted(newest, key=lambda r: order.index(r.system) if r.system in order else len(order))


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[Row], args, settings: dict) -> str:
    """The section's body in RESULTS.md: what was run on, the budget, and the table."""
    lines = [f"Backbone `{args.plm_path}`, data `{args.data_path}`{' (--quick subset)' if args.quick else ''}; "
             f"budget: {settings['train_epochs']} epochs"
             + (f" (at most {settings['max_steps']} steps)" if settings["max_steps"] else "")
             + f", lr {settings['lr']:g} (LoRA's; other delta types their own default), "
               f"batch {settings['batch_size']}, max_seq_l {settings['max_seq_l']}, "
               f"max_new_tokens {settings['max_new_tokens']}.", "",
             "| system | dev F1 | dev EM | trainable params | checkpoint | train s | train s net | answer s | notes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        size = None if r.checkpoint_bytes is None else r.checkpoint_bytes / 1e6
        lines.append(f"| {r.system} | {_cell(r.f1, '.1f')} | {_cell(r.em, '.1f')} | {_cell(r.trainable, ',')} | "
                     f"{_cell(size, '.2f')}{' MB' if size is not None else ''} | {_cell(r.train_s, '.1f')} | "
                     f"{_cell(r.train_net_s, '.1f')} | {_cell(r.answer_s, '.1f')} | {r.note} |")
    lines += ["", "train s: the train command's wall time (loading, optqa's dev scoring after every epoch and its "
                  "final scoring of the kept-back split's stand-in, dev, included); train s net: without that "
                  "scoring ((epochs + 1) x answer s), comparable with the PEFT loop's. "
                  "answer s: scoring dev once (optqa at its default --precision auto: bf16 where the CPU has it "
                  "natively; the PEFT loop in fp32). The few-shot rows run with --max_seq_l (K + 1) x "
                  f"{settings['max_seq_l']} (at most the backbone's positions less max_new_tokens)."]
    by_run: dict[str, list[str]] = {}
    for r in rows:
        by_run.setdefault(r.ran or "an earlier run (not recorded)", []).append(r.system)
    # "; " between systems: a system's own name may hold a comma ("zero-shot, chat template")
    lines += ["", "Rows run:"] + [f"- {'; '.join(systems)}: {ran}" for ran, systems in by_run.items()]
    return "\n".join(lines)


def chart(rows: list[Row], path: Path, title: str) -> Path:
    """Dev F1 and EM per system as horizontal bars (systems that did not run are left out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = [r for r in rows if r.f1 is not None]
    figure = Figure(figsize=(8, 1.2 + 0.45 * max(len(scored), 1)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    positions = range(len(scored))
    f1 = ax.barh([p - 0.2 for p in positions], [r.f1 for r in scored], height=0.4, label="F1", color="tab:blue")
    em = ax.barh([p + 0.2 for p in positions], [r.em for r in scored], height=0.4, label="EM", color="tab:orange")
    for bars in (f1, em):
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize="small")
    ax.set_yticks(list(positions), [r.system for r in scored])
    ax.invert_yaxis()
    ax.set_xlim(0, min(100.0, max([r.f1 for r in scored] + [8.0]) * 1.2 + 2))
    ax.set(xlabel="dev score (%)", title=title)
    ax.legend(loc="lower right")
    figure.savefig(path, format="png")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    from optqa.cli import configure_logging
    from optqa.config import DELTA_TYPES

    configure_logging()
    logging.getLogger("optqa").setLevel(logging.WARNING)  # optqa's per-run log lines would drown the table
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    data = prepare_data(args)
    settings = budget(args)
    info = machine()
    if args.num_threads:
        info["threads"] = args.num_threads
    print(machine_markdown(info), flush=True)
    systems = args.systems or ["baselines", *DELTA_TYPES, "peft"]
    unknown = sorted(set(systems) - {"baselines", *DELTA_TYPES, "peft"})
    if unknown:
        raise SystemExit(f"error: unknown system {unknown[0]!r} (baselines, {', '.join(DELTA_TYPES)}, peft)")
    # one label for every row of this run: the minute it started and its command
    ran = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, `{command_line(argv)}`"
    for system in systems:
        new = (baseline_rows(args, data, settings) if system == "baselines" else
               [peft_row(args, data, settings)] if system == "peft" else [delta_row(args, data, system, settings)])
        for row in new:
            print(f"{row.system}: dev F1 {_cell(row.f1, '.1f')} {row.note}", flush=True)
        log_results(Path(args.workdir) / "rows.jsonl", _run_key(args),
                    [dataclasses.asdict(dataclasses.replace(row, ran=ran)) for row in new])
    rows = kept(Path(args.workdir) / "rows.jsonl", args)
    section = write_run(args, "quality", TITLE, markdown(rows, args, settings), info, argv=argv)
    chart(rows, Path(args.chart), f"dev F1/EM, {Path(args.plm_path).name}{' (--quick)' if args.quick else ''}")
    print(section)
    print(f"written to {args.results} and {args.chart}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
