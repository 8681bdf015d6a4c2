"""The largest OPT that fits in a given memory, with full fine-tuning and with delta tuning.

    python benchmarks/memory_table.py                      # computed from the OPT family's shapes (seconds)
    python benchmarks/memory_table.py --measure 125m 350m  # also measure peak RSS of real training steps
    python benchmarks/memory_table.py --measure 1.3b --modes delta

Parameter counts come from the real OPT configurations, instantiated on PyTorch's meta device (no memory,
no download); the delta is optqa's default LoRA attached to that meta model, so its size is exact.

Memory of one training step (bytes):
  full fine-tuning, AdamW in fp32:  16 x params (weights 4 + gradients 4 + Adam's two moments 8) + activations
  delta tuning, frozen fp32 weights: 4 x params + 16 x delta params + activations            (optqa today)
  delta tuning, frozen bf16 weights: 2 x params + 16 x delta params + activations
                                     (--precision bf16 stores the frozen Linear weights in bf16 at the first
                                     step; the backbone is loaded in fp32 first, so 4 x params must fit too)
  --gradient_checkpointing keeps one fp32 hidden state per layer and recomputes one layer at a time:
                                     activations become (4 x layers + recompute coefficient) x tokens x hidden
plus OVERHEAD_GB for the framework (CPU: the imported libraries, GPU: the CUDA context). Activations are
``coefficient x layers x tokens x hidden``; the coefficient is measured here (--measure) on random-weight
models of the real shapes, or a default fitted the same way on this project's CPU machine.

The tables also go into the script's section of ``benchmarks/RESULTS.md`` (``--results``), with the machine and
the date.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TITLE = "How large an OPT fits in memory (`benchmarks/memory_table.py`)"
GB = 2**30
OVERHEAD_GB = 1.0
BUDGETS_GB = (8, 16, 24, 32, 80)
# a length-grouped batch of 8 ARC-DA examples of up to 64 tokens (mean 29; 95th-percentile question 47 tokens),
# of which the last ANSWER_TOKENS are the answer
BATCH, SEQ, ANSWER_TOKENS = 8, 64, 8
# activation bytes per (layer x token x hidden unit), fp32: the largest of --measure 125m 350m on the project's
# CPU machine (AMD EPYC, torch 2.13, transformers 5.23)
# delta_ckpt: what --gradient_checkpointing leaves besides one hidden state per layer (--measure 125m
# --modes delta_ckpt): the recomputed layer, the gradients flowing back through it and the allocator's slack
DEFAULT_COEFFICIENT = {"full": 129.0, "delta": 122.0, "delta_ckpt": 705.0}
STEPS = 2  # Adam's moments are allocated by the first step: the second shows the steady-state peak

# facebook/opt-* configurations (hidden, layers, heads, ffn, word_embed_proj_dim); vocab 50272, 2048 positions
OPT_FAMILY = {
    "125m": (768, 12, 12, 3072, 768),
    "350m": (1024, 24, 16, 4096, 512),
    "1.3b": (2048, 24, 32, 8192, 2048),
    "2.7b": (2560, 32, 32, 10240, 2560),
    "6.7b": (4096, 32, 32, 16384, 4096),
    "13b": (5120, 40, 40, 20480, 5120),
    "30b": (7168, 48, 56, 28672, 7168),
    "66b": (9216, 64, 72, 36864, 9216),
}


def opt_config(size: str):
    from transformers import OPTConfig

    hidden, layers, heads, ffn, embed = OPT_FAMILY[size]
    return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                     word_embed_proj_dim=embed, do_layer_norm_before=size != "350m", vocab_size=50272,
                     max_position_embeddings=2048, dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)


def counts(size: str) -> tuple[int, int]:
    """(backbone parameters, default LoRA parameters), exactly, without allocating anything."""
    import torch
    from transformers import OPTForCausalLM

    from optqa.deltas import AutoDeltaModel

    with torch.device("meta"):
        model = OPTForCausalLM(opt_config(size))
        total = sum(p.numel() for p in model.parameters())
        delta = AutoDeltaModel.from_config({"delta_type": "lora"}, backbone_model=model)
    return total, delta.num_trainable_parameters()


def estimate_gb(size: str, params: int, delta: int, coefficient: dict) -> dict:
    hidden, layers = OPT_FAMILY[size][:2]
    tokens = BATCH * SEQ

    def activations(mode: str) -> float:
        return coefficient[mode] * layers * tokens * hidden

    recomputed = (4 * layers + coefficient["delta_ckpt"]) * tokens * hidden
    return {"full": (16 * params + activations("full")) / GB + OVERHEAD_GB,
            "delta_fp32": (4 * params + 16 * delta + activations("delta")) / GB + OVERHEAD_GB,
            "delta_fp32_ckpt": (4 * params + 16 * delta + recomputed) / GB + OVERHEAD_GB,
            "delta_bf16": (2 * params + 16 * delta + activations("delta")) / GB + OVERHEAD_GB,
            "load_fp32": 4 * params / GB + OVERHEAD_GB}


# --- measuring (each run in its own process, so its peak RSS is its own) -------------------------------------

def worker(size: str, mode: str, out: Path) -> None:
    import torch
    from common import peak_rss_mb, reset_peak_rss
    from transformers import OPTForCausalLM

    from optqa.deltas import AutoDeltaModel

    torch.manual_seed(0)
    torch.set_num_threads(2)
    baseline = _current_rss_mb()
    reset_peak_rss()
    model = OPTForCausalLM(opt_config(size))
    params = sum(p.numel() for p in model.parameters())
    if mode == "delta_ckpt":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if mode.startswith("delta"):
        model = AutoDeltaModel.from_config({"delta_type": "lora"}, backbone_model=model).model  # freezes the backbone
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    started = time.perf_counter()
    for step in range(STEPS):
        input_ids = torch.randint(4, 50000, (BATCH, SEQ))
        # optqa's loss: the vocabulary projection only where answer tokens are predicted
        logits = model(input_ids=input_ids, logits_to_keep=ANSWER_TOKENS + 1, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 input_ids[:, -ANSWER_TOKENS:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out.write_text(json.dumps({"size": size, "mode": mode, "params": params,
                               "delta": sum(p.numel() for p in trainable) if mode != "full" else 0,
                               "baseline_mb": baseline, "peak_mb": peak_rss_mb(),
                               "seconds_per_step": (time.perf_counter() - started) / STEPS}))


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(sizes: list[str], modes: list[str]) -> list[dict]:
    from common import run_worker

    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="optqa-memory-"))
    for size in sizes:
        for mode in modes:
            print(f"measuring {size} {mode} ...", file=sys.stderr, flush=True)
            rows.append(run_worker(Path(__file__), ["--worker", size, mode], scratch / f"{size}-{mode}.json"))
    return rows


def fitted_coefficient(measured: list[dict]) -> dict:
    """Activation bytes per (layer x token x hidden unit), the largest seen per mode (a safe estimate)."""
    fitted = dict(DEFAULT_COEFFICIENT)
    for mode in ("full", "delta", "delta_ckpt"):
        values = []
        for row in (r for r in measured if r["mode"] == mode):
            hidden, layers = OPT_FAMILY[row["size"]][:2]
            state = 16 * row["params"] if mode == "full" else 4 * row["params"] + 16 * row["delta"]
            rest = (row["peak_mb"] - row["baseline_mb"]) * 2**20 - state
            values.append(rest / (BATCH * SEQ * hidden) - 4 * layers if mode == "delta_ckpt"
                          else rest / (layers * BATCH * SEQ * hidden))
        if values:
            fitted[mode] = max(values)
    return fitted


def render(coefficient: dict, measured: list[dict]) -> str:
    sizes = list(OPT_FAMILY)
    info = {s: counts(s) for s in sizes}
    est = {s: estimate_gb(s, *info[s], coefficient) for s in sizes}
    seen = {(r["size"], r["mode"]): r for r in measured}
    lines = [f"Estimated memory for one training step (batch {BATCH} x {SEQ} tokens, AdamW, default LoRA; "
             f"+{OVERHEAD_GB:g} GB framework overhead; activation coefficient full {coefficient['full']:.0f}, "
             f"delta {coefficient['delta']:.0f} B/(layer*token*hidden), checkpointed "
             f"{coefficient['delta_ckpt']:.0f} B/(token*hidden)):", "",
             "| OPT | parameters | LoRA parameters | full fine-tuning | delta, fp32 backbone | same, "
             "--gradient_checkpointing | delta, bf16 backbone "
             "| measured here (peak RSS: delta / checkpointed / full) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in sizes:
        params, delta = info[s]
        got = [seen.get((s, m)) for m in ("delta", "delta_ckpt", "full")]
        shown = " / ".join(f"{r['peak_mb'] / 1024:.2f} GB" if r else "-" for r in got) if any(got) else ""
        lines.append(f"| opt-{s} | {params / 1e6:,.0f}M | {delta / 1e6:.2f}M | {est[s]['full']:.1f} GB "
                     f"| {est[s]['delta_fp32']:.1f} GB | {est[s]['delta_fp32_ckpt']:.1f} GB "
                     f"| {est[s]['delta_bf16']:.1f} GB | {shown} |")
    lines += ["", "Largest OPT that fits:", "",
              "| memory | full fine-tuning (fp32 AdamW) | delta tuning, fp32 backbone | same, --gradient_checkpointing "
              "| delta tuning, bf16 weights (loaded in fp32) |",
              "| --- | --- | --- | --- | --- |"]
    for budget in BUDGETS_GB:
        cells = []
        for key in ("full", "delta_fp32", "delta_fp32_ckpt", "delta_bf16"):
            fits = [s for s in sizes if est[s][key] <= budget
                    and (key != "delta_bf16" or est[s]["load_fp32"] <= budget)]
            cells.append(f"opt-{fits[-1]} ({est[fits[-1]][key]:.1f} GB)" if fits else "none")
        lines.append(f"| {budget} GB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", nargs="*", default=[], choices=list(OPT_FAMILY),
                        help="OPT sizes to train for a few steps (random weights) while measuring peak RSS")
    parser.add_argument("--modes", nargs="+", default=["delta", "full"], choices=["delta", "delta_ckpt", "full"],
                        help="what to measure (full fine-tuning of opt-1.3b needs ~22 GB)")
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    common.add_results_option(parser)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.out)
        return
    measured = measure(args.measure, args.modes)
    body = render(fitted_coefficient(measured), measured)
    if measured:  # the measured runs first, one line each
        body = "\n".join(f"- measured opt-{row['size']} {row['mode']}: peak RSS {row['peak_mb']:.0f} MB, of which "
                         f"{row['peak_mb'] - row['baseline_mb']:.0f} MB above the imports; "
                         f"{row['seconds_per_step']:.1f} s/step" for row in measured) + "\n\n" + body
    print(body)
    common.write_run(args, "memory_table", TITLE, body)


if __name__ == "__main__":
    main()
