"""--mode serve: memory of N deltas on one backbone, and batched answering of concurrent requests.

    python benchmarks/serve_bench.py                    # both parts on an OPT-125m-shaped random backbone
    python benchmarks/serve_bench.py --skip_memory      # only the 64-concurrent vs 64-sequential table
    python benchmarks/serve_bench.py --precision fp32   # the same in fp32 (default: auto, bf16 where native)
    python benchmarks/serve_bench.py --quick            # smoke run: 16 requests of 8 tokens

Memory: peak RSS of a fresh process that loads 1 and then 6 deltas (adapter, two LoRAs, BitFit, soft prompt,
prefix, random weights) through ``load_served`` exactly as ``--mode serve`` does, and answers one question with
each, next to a process that only loads the backbone. Goal (issue 15): 6 deltas <= 1.15x one.

Throughput: the real server (``python -m optqa --mode serve`` in its own process) with 2 deltas; 64 requests
(one question each, alternating deltas, ``max_tokens`` 16) sent one after another, then all 64 at once.
Random weights never emit eos, so every answer runs to ``max_tokens`` in both runs: the same work per
question. Goal: concurrent questions/s >= 5x sequential.

The tables also go into the script's section of ``benchmarks/RESULTS.md`` (``--results``), with the machine and
the date.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_results_option,
    build_assets,
    child_env,
    fill_counts,
    machine,
    machine_markdown,
    peak_rss_mb,
    run_worker,
    write_run,
)

TITLE = "Serving several deltas (`benchmarks/serve_bench.py`)"

DELTAS = [  # served name, delta type, RunConfig flags
    ("adapter", "adapter", {}),
    ("lora", "lora", {"modified_modules": ["self_attn.q_proj", "self_attn.v_proj"]}),
    ("lora_ffn", "lora", {"modified_modules": ["self_attn", "fc2"]}),
    ("bitfit", "bitfit", {}),
    ("soft_prompt", "soft_prompt", {}),
    ("prefix", "prefix", {}),
]


def checkpoints(workdir: Path, plm: str) -> dict[str, Path]:
    """One random-weight checkpoint per entry of DELTAS on the backbone (built once, cached)."""
    from optqa.tiny import build_random_checkpoint

    out = {}
    for seed, (name, delta_type, flags) in enumerate(DELTAS):
        folder = workdir / "serve-deltas" / name
        if not (folder / "optqa_manifest.json").is_file():
            # small random weights: the answers stay finite (N(0, 1) adapters on 768 wide layers overflow bf16)
            build_random_checkpoint(plm, folder, delta_type, seed=seed, max_new_tokens=16, **flags)
            _scale(folder, 0.02)
        out[name] = folder
    return out


def _scale(folder: Path, factor: float) -> None:
    from optqa.checkpoints.format import read_checkpoint, save_checkpoint

    folder, manifest, state = read_checkpoint(folder)
    save_checkpoint(folder, {k: v * factor for k, v in state.items()}, {k: v for k, v in manifest.items()
                                                                        if k != "files"})


def memory_worker(args) -> None:
    """In a fresh process: load ``--count`` deltas as --mode serve does, answer once with each, report peak RSS."""
    from optqa.hardware import configure_threads

    configure_threads(args.threads)
    paths = json.loads(args.paths)
    started = time.perf_counter()
    if args.count == 0:
        from optqa.plm import load_plm

        load_plm("opt", args.plm)
        result = {"count": 0, "loaded_mb": peak_rss_mb(), "answered": []}
    else:
        from optqa.serve import load_served

        served = load_served(dict(list(paths.items())[:args.count]),
                             precision=args.precision)
        loaded = peak_rss_mb()
        answered, failed = [], {}
        for name, s in served.items():
            try:
                s.model.answer(["What is the first question?"], max_new_tokens=4)
                answered.append(name)
            except Exception as exc:  # noqa: BLE001 - reported in the table, the others are still measured
                failed[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
        result = {"count": args.count, "loaded_mb": loaded, "answered": answered, "failed": failed}
    result.update(peak_mb=peak_rss_mb(), seconds=round(time.perf_counter() - started, 1))
    Path(args.out).write_text(json.dumps(result))


def measure_memory(paths: dict[str, Path], plm: str, precision: str, workdir: Path,
                   threads: int | None) -> list[dict]:
    rows = []
    for count in (0, 1, len(paths)):
        print(f"memory: {count} deltas ...", flush=True)
        rows.append(run_worker(Path(__file__), ["--worker", "memory", "--count", str(count), "--plm", plm,
                                                *(["--threads", str(threads)] if threads else []),
                                                "--precision", precision,
                                                "--paths", json.dumps({k: str(v) for k, v in paths.items()})],
                               workdir / "serve-memory.json"))
    return rows


def start_server(paths: dict[str, Path], precision: str, threads: int | None) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "optqa", "--mode", "serve", "--port", "0", "--precision", precision,
               "--deltas", *[f"{k}={v}" for k, v in paths.items()]]
    if threads:
        command += ["--num_threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=child_env(), cwd=REPO)
    line = process.stdout.readline()
    if not line.startswith("serving "):
        process.kill()
        raise RuntimeError(f"server did not start: {line} {process.stderr.read()[-2000:]}")
    return process, line.split(" at ")[1].split("/ ")[0]


async def _post(client, name: str, question: str, max_tokens: int) -> float:
    started = time.perf_counter()
    response = await client.post("/v1/completions", json={"model": name, "prompt": question,
                                                          "max_tokens": max_tokens})
    response.raise_for_status()
    return time.perf_counter() - started


async def _sequential(url: str, jobs, max_tokens: int) -> tuple[float, list[float]]:
    import httpx2

    async with httpx2.AsyncClient(base_url=url, timeout=600) as client:
        started = time.perf_counter()
        latencies = [await _post(client, name, q, max_tokens) for name, q in jobs]
        return time.perf_counter() - started, latencies


async def _concurrent(url: str, jobs, max_tokens: int) -> tuple[float, list[float]]:
    import httpx2

    async with httpx2.AsyncClient(base_url=url, timeout=600,
                                  limits=httpx2.Limits(max_connections=len(jobs))) as client:
        started = time.perf_counter()
        latencies = await asyncio.gather(*[_post(client, name, q, max_tokens) for name, q in jobs])
        return time.perf_counter() - started, list(latencies)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def measure_throughput(paths: dict[str, Path], data: Path, precision: str, requests: int,
                       max_tokens: int, threads: int | None) -> list[dict]:
    questions = [json.loads(line)["question"] for line in (data / "dev.jsonl").read_text().splitlines()]
    names = list(paths)
    jobs = [(names[i % len(names)], questions[i]) for i in range(requests)]
    process, url = start_server(paths, precision, threads)
    try:
        asyncio.run(_sequential(url, jobs[:4], max_tokens))  # warm-up: first-call casts and allocations
        rows = []
        for label, run in (("sequential", _sequential), ("concurrent", _concurrent)):
            print(f"throughput: {requests} {label} requests ...", flush=True)
            wall, latencies = asyncio.run(run(url, jobs, max_tokens))
            rows.append({"run": label, "requests": requests, "wall_s": round(wall, 2),
                         "questions_per_s": round(requests / wall, 2),
                         "p50_s": round(statistics.median(latencies), 3), "p95_s": round(percentile(latencies, 95), 3)})
        import httpx2

        rows.append({"health": httpx2.get(url + "/health").json()})
        return rows
    finally:
        process.terminate()
        process.wait(timeout=60)


def memory_table(rows: list[dict]) -> str:
    """Peak RSS per number of deltas served, against one, and the PASS/MISS line of the goal (Markdown)."""
    one = rows[1]["peak_mb"]
    lines = ["| deltas served | peak RSS | vs 1 delta | answered |", "| ---: | ---: | ---: | --- |"]
    for row in rows:
        label = "backbone only" if row["count"] == 0 else str(row["count"])
        failed = "; ".join(f"{k}: {v}" for k, v in row.get("failed", {}).items())
        lines.append(f"| {label} | {row['peak_mb']:.0f} MB | {row['peak_mb'] / one:.3f}x | "
                     f"{', '.join(row['answered']) or '-'}{' (failed: ' + failed + ')' if failed else ''} |")
    ratio = rows[-1]["peak_mb"] / one
    lines += ["", f"{'PASS' if ratio <= 1.15 else 'MISS'}: {rows[-1]['count']} deltas use {ratio:.3f}x the memory of "
                  "one (goal <= 1.15x)"]
    return "\n".join(lines)


def throughput_table(rows: list[dict], requests: int, max_tokens: int) -> str:
    """Sequential against concurrent requests, the server's batch count, and the PASS/MISS line (Markdown)."""
    lines = [f"{requests} requests over 2 deltas (adapter, lora), one question each, max_tokens {max_tokens}:", "",
             "| requests sent | wall time | questions/s | p50 latency | p95 latency |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows[:2]:
        lines.append(f"| {row['requests']} {row['run']} | {row['wall_s']:.2f} s | {row['questions_per_s']:.2f} | "
                     f"{row['p50_s']:.3f} s | {row['p95_s']:.3f} s |")
    speedup = rows[1]["questions_per_s"] / rows[0]["questions_per_s"]
    lines += ["", f"server: {rows[2]['health']['batches']} generation batches for {rows[2]['health']['questions']} "
                  "questions",
              f"{'PASS' if speedup >= 5 else 'MISS'}: concurrent answering is {speedup:.1f}x the sequential rate "
              "(goal >= 5x)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "optqa-bench-serve"),
                        help="where the backbone, data and checkpoints are built once and cached")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer and shorter requests")
    parser.add_argument("--requests", type=int, help="requests sent each way (default 64; quick 16)")
    parser.add_argument("--max_tokens", type=int, help="tokens per answer (default 16; quick 8)")
    parser.add_argument("--threads", type=int, help="the server's --num_threads (default: one per usable core); "
                        "on a machine other jobs keep busy, 1 avoids OpenMP threads spinning against them")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--skip_throughput", action="store_true")
    parser.add_argument("--json", help="also write every number to this file")
    # worker mode (one measurement per fresh process)
    parser.add_argument("--worker", choices=("memory",))
    parser.add_argument("--count", type=int)
    parser.add_argument("--plm")
    parser.add_argument("--paths")
    parser.add_argument("--out")
    add_results_option(parser)
    args = fill_counts(parser.parse_args(), (("requests", 64, 16), ("max_tokens", 16, 8)))
    if args.worker:
        memory_worker(args)
        return

    workdir = Path(args.workdir)
    assets = build_assets(workdir)
    paths = checkpoints(workdir, assets["plm"])
    info = machine()
    print(machine_markdown(info))
    load = (f"; load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
            if hasattr(os, "getloadavg") else "")
    report: dict = {"machine": info, "precision": args.precision, "threads": args.threads}
    parts = [f"precision {args.precision}, server threads: {args.threads or 'default'}{load}"]
    print(parts[0])
    if not args.skip_memory:
        report["memory"] = measure_memory(paths, assets["plm"], args.precision, workdir, args.threads)
        parts.append(memory_table(report["memory"]))
        print("\n" + parts[-1])
    if not args.skip_throughput:
        two = {k: paths[k] for k in ("adapter", "lora")}
        report["throughput"] = measure_throughput(two, Path(assets["data"]), args.precision, args.requests,
                                                  args.max_tokens, args.threads)
        parts.append(throughput_table(report["throughput"], args.requests, args.max_tokens))
        print("\n" + parts[-1])
    write_run(args, "serve_bench", TITLE, "\n\n".join(parts), info)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
