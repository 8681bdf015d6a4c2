"""Shared by the benchmark scripts: the machine description, an OPT-125m-shaped backbone with random weights,
ARC-DA-like synthetic data, peak-memory readings and running a measurement in its own process.

Nothing here downloads anything: the backbone, its tokenizer and the data are built locally (and cached in
the work folder), so a benchmark runs the same on an offline laptop.

Every script writes what it measured into its own section of ``benchmarks/RESULTS.md`` (``write_section``), with
the machine, the date and the command that ran, so numbers are never typed by hand.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "templates" / "answer_template.txt"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
ASSETS_VERSION = 1  # bump when the synthetic data or the backbone recipe changes, to rebuild cached assets

# Token counts of ARC-DA v1.1 with OPT's tokenizer (all 2985 questions), from
# /work/shared/reference/arc-da-and-opt-facts.md; the synthetic data are drawn to match them.
ARC_DA = {"train": 1250, "dev": 338, "test": 1397, "question_mean": 21.4, "question_median": 17,
          "question_p95": 47, "question_max": 152, "answer_mean": 3.7, "answer_max": 59, "example_mean": 29,
          "pad_to_128_waste": 77, "pad_random_batch8_waste": 44}

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def bench_parser(doc: str, quick_help: str, workdir_help: str):
    """The arguments every speed benchmark shares: ``--quick`` and ``--workdir`` (the built backbone, data and
    checkpoint are cached there, one folder for bench_speed and bench_int8)."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "optqa-bench-speed"),
                        help=workdir_help)
    parser.add_argument("--emulate", choices=("avx2",),
                        help="run on an AVX2-only laptop's kernels on a newer CPU: the script runs again with every "
                             "library's instruction set capped (ATen, MKL, fbgemm, oneDNN; optqa.hardware."
                             "KERNEL_ISA_CAPS). It emulates the instructions, not the laptop's caches or memory")
    add_results_option(parser)
    return parser


def add_results_option(parser) -> None:
    """``--results PATH``: the Markdown file the script writes its section into (tests point it elsewhere)."""
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="write this run's section into this Markdown file, in place of the section's previous "
                             "run; the other sections are kept (default: benchmarks/RESULTS.md)")


def emulate(args) -> None:
    """With ``--emulate avx2``, run this script again under ``KERNEL_ISA_CAPS`` and exit with its status.

    The caps must be in the environment before torch loads its libraries (MKL and fbgemm read them once), hence
    a new process rather than setting them here; it inherits stdin/stdout, so the output is the same."""
    if not args.emulate:
        return
    from optqa.hardware import KERNEL_ISA_CAPS

    if all(os.environ.get(name) == value for name, value in KERNEL_ISA_CAPS.items()):
        return  # this is the emulated run
    raise SystemExit(subprocess.run([sys.executable, *sys.argv], env={**os.environ, **KERNEL_ISA_CAPS},
                                    check=False).returncode)


def fill_counts(args, counts: tuple[tuple[str, int, int], ...]):
    """Counts left unset take their full default, or their small one with ``--quick``: (name, full, quick)."""
    for name, full, small in counts:
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    return args


def machine() -> dict:
    """What the numbers were measured on: CPU model, cores, library versions, bf16 support, threads."""
    import peft
    import torch
    import transformers

    from optqa.hardware import configure_threads, cpu_has_native_bf16, usable_cpus
    from optqa.quantize import describe_cpu

    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="ignore").splitlines():
            if line.lower().startswith(("model name", "hardware")):
                model = line.split(":", 1)[1].strip()
                break
    elif platform.system() == "Darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        model = out.stdout.strip() or model
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        memory_gb = psutil.virtual_memory().total / 2**30
    except ImportError:
        physical, memory_gb = None, None
    return {"cpu": model, "logical_cpus": os.cpu_count(), "physical_cores": physical, "usable_cpus": usable_cpus(),
            "memory_gb": round(memory_gb, 1) if memory_gb else None, "native_bf16": cpu_has_native_bf16(),
            "cpu_flags": describe_cpu(),
            "threads": configure_threads(None), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "os": platform.platform(terse=True)}


def machine_markdown(info: dict) -> str:
    cores = f"{info['physical_cores'] or '?'} physical cores / {info['logical_cpus']} logical"
    if info["usable_cpus"] != info["logical_cpus"]:
        cores += f" ({info['usable_cpus']} usable)"
    return (f"Machine: {info['cpu']}, {cores}, {info['memory_gb']} GB RAM, native bf16: "
            f"{'yes' if info['native_bf16'] else 'no'} (CPU flags: {info['cpu_flags']}), {info['threads']} torch threads"
            f"{', GPU ' + info['gpu'] if info['gpu'] else ''}; {info['os']}, Python {info['python']}, "
            f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}")


# --- RESULTS.md ----------------------------------------------------------------------------------------------

QUICK_NOTE = "--quick: a smoke run, too few steps and questions to judge the numbers by"


def section_markers(name: str) -> tuple[str, str]:
    """The HTML comments around a script's section of RESULTS.md: ``<!-- NAME:start -->``, ``<!-- NAME:end -->``."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, as it can be typed again from the repository's root."""
    argv = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *argv])


def render_section(name: str, title: str, body: str, info: dict, *, quick: bool = False,
                   argv: list[str] | None = None, when: datetime.datetime | None = None) -> str:
    """A script's section: markers, ``## title``, the date and command (``--quick`` said as such), the machine
    line (``machine_markdown``), then ``body`` (the script's tables and notes, Markdown)."""
    start, end = section_markers(name)
    when = when or datetime.datetime.now(datetime.timezone.utc)
    ran = f"{when:%Y-%m-%d %H:%M} UTC, `{command_line(argv)}`" + (f" ({QUICK_NOTE})." if quick else ".")
    return "\n".join([start, f"## {title}", "", ran, "", machine_markdown(info), "", body.strip("\n"), end])


def write_section(path: Path | str, name: str, title: str, body: str, info: dict | None = None, *,
                  quick: bool = False, argv: list[str] | None = None) -> str:
    """Put a script's section into ``path`` in place of its previous one (or at the end; a new file gets a title).

    Args:
        path: the results file (``--results``, default ``benchmarks/RESULTS.md``).
        name: the section's marker name, e.g. ``"bench_speed"``; other names' sections are kept as they are.
        title: the section's heading (without ``##``); keep it fixed, the docs link to its anchor.
        body: Markdown: the tables the script printed, with what they mean.
        info: ``machine()``'s description (the script's, with its thread count); when None, measured here with
            the torch threads in use now.
        quick: the run was ``--quick``; the section says so.
        argv: the script's arguments (default ``sys.argv[1:]``), shown as the command that ran.

    Returns:
        The section as written.

    Raises:
        ValueError: the file has one of the section's markers without the other (a hand edit; nothing is written).
    """
    path = Path(path)
    if info is None:
        import torch

        threads = torch.get_num_threads()  # machine() sets optqa's choice: report the threads the run computed with
        info = {**machine(), "threads": threads}
    section = render_section(name, title, body, info, quick=quick, argv=argv)
    start, end = section_markers(name)
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n\n"
    if (start in text) != (end in text):
        raise ValueError(f"{path}: {start if start in text else end} without its pair; fix the file by hand")
    if start in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    partial = path.with_name(path.name + ".partial")  # a run killed while writing leaves the old file whole
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return section


def write_run(args, name: str, title: str, body: str, info: dict | None = None,
              argv: list[str] | None = None) -> str:
    """``write_section`` for a script's run: into its ``--results``, said to be ``--quick`` where it was, and under
    ``--emulate avx2`` as the section ``NAME_avx2`` (kept beside the native one) titled as emulated."""
    emulated = getattr(args, "emulate", None)
    return write_section(args.results, f"{name}_{emulated}" if emulated else name,
                         f"{title} (emulated {emulated.upper()})" if emulated else title, body, info,
                         quick=getattr(args, "quick", False), argv=argv)


def log_results(path: Path, key: dict, rows: list[dict]) -> None:
    """Append ``rows`` to a results log (JSON lines), each with ``key``: what makes results comparable (the
    backbone, the data, ``--quick``...). quality.py and sweep.py keep their rows so, to be resumed or split over
    processes."""
    with Path(path).open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"key": key, **row}) + "\n")


def logged_results(path: Path, key: dict, name: str) -> list[dict]:
    """The newest row per ``row[name]`` in a results log among the rows logged with ``key``, in first-logged order
    (rows of another backbone, data or ``--quick`` setting are left out)."""
    path, newest = Path(path), {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        row = json.loads(line)
        if row.pop("key", None) == key:
            newest[row[name]] = row
    return list(newest.values())


# --- ARC-DA-like data ---------------------------------------------------------------------------------------

def _lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return min(high, max(low, round(math.exp(math.log(median) + sigma * rng.gauss(0.0, 1.0)))))


def _pseudo_words(rng: random.Random, count: int) -> list[str]:
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((2, 3)))))
    return sorted(words)


def build_assets(folder: Path, seed: int = 0, log=print) -> dict:
    """An OPT-125m-shaped random backbone and ARC-DA-sized synthetic splits in ``folder`` (reused if built).

    Questions are pseudo-words that the tokenizer keeps whole, so a question of n tokens can be written
    exactly; n is drawn from a log-normal fitted to ARC-DA's median (17) and 95th percentile (47), the
    answer length from one fitted to its mean (3.7). The tokenizer is a small byte-level BPE (ids < 8000)
    inside the real 50272-row embedding, so every matrix, including the 50272-wide output layer that
    dominates a short sequence's cost, has OPT-125m's shape.
    """
    folder = Path(folder)
    stamp = folder / "assets.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == ASSETS_VERSION:
        return json.loads(stamp.read_text())
    from optqa.tiny import OPT_125M_SHAPE, build_opt, build_tokenizer

    started = time.perf_counter()
    rng = random.Random(seed)
    words = _pseudo_words(rng, 3000)
    corpus = [" ".join(rng.sample(words, 12)) for _ in range(4000)] + ["What is it? Answer: it"] * 200
    plm = folder / "opt-125m-shape"
    build_tokenizer(corpus, plm, vocab_size=8000)
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(str(plm / "vocab.json"), str(plm / "merges.txt"))
    whole = [w for w in words if len(bpe.encode(" " + w).ids) == 1]
    if len(whole) < 500:
        raise RuntimeError(f"only {len(whole)} pseudo-words are single tokens; the tokenizer recipe is broken")

    def question(n_tokens: int) -> str:  # "What" + (n - 2) words + "?" is n tokens
        return "What " + " ".join(rng.choice(whole) for _ in range(n_tokens - 2)) + "?"

    def answer() -> str:
        return " ".join(rng.choice(whole) for _ in range(_lognormal_int(rng, 3.0, 0.65, 1, 59)))

    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        with (data / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for i in range(ARC_DA[split]):
                n = _lognormal_int(rng, ARC_DA["question_median"], 0.62, 4, ARC_DA["question_max"])
                golds = [answer() for _ in range(rng.choice((1, 2, 3, 4, 5)))]
                handle.write(json.dumps({"question_id": f"{split}-{i}", "tag": "SYNTHETIC", "question": question(n),
                                         "answers": golds}) + "\n")
    log(f"building an OPT-125m-shaped backbone with random weights in {plm} (once; cached)")
    build_opt(plm, None, seed=seed, **OPT_125M_SHAPE)
    info = {"version": ASSETS_VERSION, "plm": str(plm), "data": str(data),
            "build_s": round(time.perf_counter() - started, 1)}
    stamp.write_text(json.dumps(info))
    return info


def length_report(plm: str, data: str, max_seq_l: int = 128, batch_size: int = 8, seed: int = 0) -> dict:
    """Token lengths of the synthetic data, rendered by optqa's template, next to ARC-DA's."""
    from transformers import AutoTokenizer

    from optqa.data import LMTokenizerWrapper, read_qa_jsonl
    from optqa.template import ManualTemplate

    tokenizer = AutoTokenizer.from_pretrained(plm)
    examples = [e for split in ("train", "dev", "test") for e in read_qa_jsonl(Path(data) / f"{split}.jsonl")]
    questions = [len(tokenizer(e.text_a, add_special_tokens=False)["input_ids"]) for e in examples]
    answers = [len(tokenizer(" " + e.tgt_text[0], add_special_tokens=False)["input_ids"]) for e in examples]
    wrapper = LMTokenizerWrapper(tokenizer, ManualTemplate(tokenizer, text=TEMPLATE.read_text()), max_seq_l)
    lengths = [len(e) for e in wrapper.encode_all(examples, targets="first")]
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = [[lengths[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
    computed = sum(len(b) * max(b) for b in batches)
    return {"questions": len(examples), "question_mean": statistics.fmean(questions),
            "question_median": statistics.median(questions), "question_p95": _percentile(questions, 95),
            "question_max": max(questions), "answer_mean": statistics.fmean(answers), "answer_max": max(answers),
            "example_mean": statistics.fmean(lengths),
            "pad_to_128_waste": 100 * (1 - sum(lengths) / (len(lengths) * max_seq_l)),
            "pad_random_batch8_waste": 100 * (1 - sum(lengths) / computed)}


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# --- memory -------------------------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (Linux VmHWM), else since the process started."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def process_peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# --- subprocesses -------------------------------------------------------------------------------------------

def child_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
           "PYTHONWARNINGS": "ignore", **extra}
    return env


def run_worker(script: Path, args: list[str], out: Path, timeout: float = 1800) -> dict:
    """Run one measurement in a fresh process (so its peak memory is its own); it writes JSON to ``out``."""
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(script), *args, "--out", str(out)], capture_output=True, text=True,
                          env=child_env(), timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"worker {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())
