"""The sweep that chose optqa's default recipes: train each setting on a real backbone and ARC-DA-format data,
score dev after every epoch, and write the table to ``benchmarks/RESULTS.md``.

```bash
python benchmarks/sweep.py --plm_path SmolLM2-135M-Instruct.Q4_1.gguf --data_path ../shared/data/ARC-DA-v1.1
python benchmarks/sweep.py ... --runs "lora lr=2e-3 train_epochs=1" "soft_prompt lr=3e-2"   # your own settings
python benchmarks/sweep.py ... --quick    # a smoke run of the grid on a few questions
```

A setting is a delta type and optqa flags, ``name=value`` (``name=a,b`` for a list, ``name=`` for the empty
string) or a bare ``name`` for a true switch (``chat_template``);
what it leaves out takes optqa's default. Each runs ``python -m optqa --mode train`` as a user does (in this
process, one after the other), with dev as the split it keeps the best epoch by; the final "test" scores, which a
sweep must not look at, are taken on a stand-in of 8 dev questions. Results are appended to
``<workdir>/sweep.jsonl`` as each setting ends (with the backbone, data, ``--quick`` and seed they ran with:
only results of the same ones count), so a sweep can be stopped and run again (finished settings are
skipped) or split over several processes sharing the work folder; the table is rewritten from that file after
the sweep (section ``<!-- sweep:start -->`` of RESULTS.md; finished settings count, so a second run of the
same settings only writes the table); a setting run with several seeds (``seed=N`` added) gets a second table of
its mean, since one seed's dev F1 moves by about 2. When a backbone changes, run it again and move the
defaults in ``optqa/config.py`` (the registry's ``recipe``) to the best row per delta type.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, log_results, logged_results, machine, machine_markdown, write_run  # noqa: E402
from quality import QUICK, optqa, prepare_data  # noqa: E402

SECTION = "sweep"
# all_linear on SmolLM2 (Llama), spelled out: those rows ran before the family-neutral name existed, and a
# setting's text is its key in sweep.jsonl
_ALL_LINEAR = ("modified_modules=self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.o_proj,"
               "mlp.gate_proj,mlp.up_proj,mlp.down_proj")
# The grid run to choose the defaults (SmolLM2-135M-Instruct, ARC-DA). First round: each delta type's learning
# rate around its literature value, LoRA's training targets and prompt format, and the number of epochs.
GRID = [
    "lora lr=1e-3 train_epochs=1",
    "lora lr=1e-3 train_epochs=1 chat_template",
    "lora lr=2e-3 train_epochs=1",
    "lora lr=1e-3 train_epochs=1 train_targets=all",
    "lora lr=5e-4 train_epochs=2",
    "adapter lr=1e-3 train_epochs=1",
    "bitfit lr=3e-3 train_epochs=1",
    "soft_prompt lr=3e-2 train_epochs=1",
    "prefix lr=1e-2 train_epochs=1",
    # second round, each type's chosen lr as the centre: capacity (modules, rank, bottleneck, prompt and prefix
    # lengths), a second epoch, the lr beside it, fp32 against bf16 autocast, and a second seed for the noise
    f"lora lr=1e-3 train_epochs=1 {_ALL_LINEAR}",
    f"lora lr=2e-3 train_epochs=1 {_ALL_LINEAR}",
    f"lora lr=5e-4 train_epochs=1 {_ALL_LINEAR}",
    f"lora lr=1e-3 train_epochs=2 {_ALL_LINEAR}",
    f"lora lr=1e-3 train_epochs=1 train_targets=all {_ALL_LINEAR}",
    "lora lr=2e-3 train_epochs=1 lora_r=16 lora_alpha=32",
    "lora lr=2e-3 train_epochs=2",
    "lora lr=2e-3 train_epochs=1 precision=fp32",
    "lora lr=2e-3 train_epochs=1 seed=7",
    "adapter lr=2e-3 train_epochs=1",
    "adapter lr=1e-3 train_epochs=2",
    "adapter lr=1e-3 train_epochs=1 bottleneck_dim=64",
    "adapter lr=2e-3 train_epochs=1 bottleneck_dim=64",
    "adapter lr=1e-3 train_epochs=1 bottleneck_dim=128",
    "adapter lr=1e-3 train_epochs=1 seed=7",
    "adapter lr=1e-3 train_epochs=1 bottleneck_dim=64 seed=7",
    "bitfit lr=2e-3 train_epochs=2",
    "bitfit lr=1e-3 train_epochs=2 batch_size=4",
    "soft_prompt lr=3e-2 train_epochs=1 soft_token_num=50",
    "soft_prompt lr=1e-1 train_epochs=1",
    "prefix lr=1e-2 train_epochs=1 prefix_token_num=20",
    "prefix lr=1e-2 train_epochs=2",
    "prefix lr=1e-2 train_epochs=2 seed=7",
    # third round, towards dev F1 47 with LoRA: a third seed of its recipe and two more of all_linear (the noise),
    # a warm-up, every gold answer at the chosen lr, 3 epochs with dropout and weight decay, the Question: template
    "lora lr=2e-3 train_epochs=1 seed=1",
    "lora lr=1e-3 train_epochs=1 modified_modules=all_linear seed=7",
    "lora lr=1e-3 train_epochs=1 modified_modules=all_linear seed=1",
    "lora lr=2e-3 train_epochs=1 warmup_steps=30",
    "lora lr=2e-3 train_epochs=1 train_targets=all",
    "lora lr=2e-3 train_epochs=3 lora_dropout=0.1 weight_decay=0.01",
    "lora lr=2e-3 train_epochs=1 template=templates/question_answer_template.txt",
    "lora lr=2e-3 train_epochs=1 template=templates/question_answer_template.txt seed=7",
    # fourth round, the noise: the recipe, all_linear and the Question: template with five seeds each (all_linear's
    # seed 42 again under its short name, so that its seeds group into one mean: seed_groups)
    "lora lr=1e-3 train_epochs=1 modified_modules=all_linear",
    "lora lr=2e-3 train_epochs=1 template=templates/question_answer_template.txt seed=1",
    "lora lr=2e-3 train_epochs=1 seed=2",
    "lora lr=2e-3 train_epochs=1 seed=3",
    "lora lr=2e-3 train_epochs=1 template=templates/question_answer_template.txt seed=2",
    "lora lr=2e-3 train_epochs=1 template=templates/question_answer_template.txt seed=3",
    "lora lr=1e-3 train_epochs=1 modified_modules=all_linear seed=2",
    "lora lr=1e-3 train_epochs=1 modified_modules=all_linear seed=3",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plm_path", required=True, help="the backbone: a Hugging Face folder or a .gguf file")
    parser.add_argument("--data_path", required=True, help="ARC-DA-format folder with train.jsonl and dev.jsonl")
    parser.add_argument("--runs", nargs="+", default=GRID, metavar="SETTING",
                        help="settings to run, each 'DELTA_TYPE flag=value ...' (default: the grid that chose the "
                             "defaults)")
    parser.add_argument("--quick", action="store_true", help=f"the first {QUICK['train']} train and "
                        f"{QUICK['dev']} dev questions, at most {QUICK['max_steps']} steps per setting")
    parser.add_argument("--num_threads", type=int, default=None, help="torch threads (default: optqa's choice)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", default=str(REPO / "benchmarks" / "sweep-work"),
                        help="checkpoints, run folders and sweep.jsonl (finished settings are skipped)")
    parser.add_argument("--results", default=str(RESULTS), help="the Markdown file its section is written into")
    return parser.parse_args(argv)


def setting_flags(setting: str) -> list[str]:
    """``"lora lr=2e-3 chat_template"`` as optqa flags: ``--delta_type lora --lr 2e-3 --chat_template``.

    Raises:
        ValueError: an empty setting.
    """
    words = setting.split()
    if not words:
        raise ValueError("an empty setting")
    flags = ["--delta_type", words[0]]
    for word in words[1:]:
        name, equals, value = word.partition("=")
        flags += [f"--{name}", *value.split(",")] if equals else [f"--{name}"]  # "name=": the empty string
    return flags


def setting_folder(setting: str) -> str:
    """The work folder's name for ``setting``: ``lora_lr-2e-3``; where a value holds characters a file name may
    not (a template's path: ``/``; ``:`` on Windows), those become ``_`` and a digest of the setting keeps the
    name its own.
    """
    plain = setting.replace(" ", "_").replace("=", "-")
    safe = re.sub(r"[^\w.,+-]", "_", plain)
    return safe if safe == plain else f"{safe}-{hashlib.sha256(setting.encode()).hexdigest()[:8]}"


def run_setting(args, data: Path, setting: str) -> dict:
    """Train one setting; its dev F1/EM per epoch, the best epoch, and the train command's wall time."""
    out = Path(args.workdir) / setting_folder(setting)
    stand_in = out / "test-stand-in.jsonl"  # the final test scoring is not used here: keep it cheap
    out.mkdir(parents=True, exist_ok=True)
    dev_lines = (data / "dev.jsonl").read_text(encoding="utf-8").splitlines()
    stand_in.write_text("\n".join(dev_lines[:8]) + "\n", encoding="utf-8")
    flags = ["--mode", "train", "--plm_path", args.plm_path, "--data_path", str(data), "--test_file", str(stand_in),
             "--output_dir", str(out / "runs"), "--delta_save_path", str(out / "delta_ckpts"),
             "--raw_delta_save_path", str(out / "raw_delta_ckpts"), "--seed", str(args.seed),
             *setting_flags(setting)]
    if args.num_threads:
        flags += ["--num_threads", str(args.num_threads)]
    if args.quick:
        flags += ["--max_steps", str(QUICK["max_steps"]), "--max_new_tokens", str(QUICK["max_new_tokens"])]
    seconds = optqa(flags)
    [run] = sorted((out / "runs").glob("train-*"))[-1:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    epochs = [r for r in rows if "epoch" in r]
    best = max(epochs, key=lambda r: r["dev_f1"])
    return {"setting": setting, "dev_f1": [r["dev_f1"] for r in epochs], "best_epoch": best["epoch"],
            "best_f1": best["dev_f1"], "best_em": best["dev_em"], "train_s": round(seconds, 1)}


def seed_groups(results: list[dict], seed: int) -> list[dict]:
    """The settings that ran with more than one seed, each with its best dev F1 per seed and their mean: on a dev
    split of a few hundred questions one seed's F1 moves by about 2 (SmolLM2, ARC-DA dev), so two settings are
    told apart by means, not by single rows.

    Args:
        results: the sweep's rows (``run_setting``'s dicts).
        seed: the sweep's ``--seed``, the seed of a setting that names none.
    Returns:
        One dict per setting run with two seeds or more, in the order first seen: ``setting`` (without its
        ``seed=``), ``seeds`` and ``best_f1`` (same order, ascending seed), ``mean`` (of ``best_f1``).
    """
    groups: dict[str, dict[int, float]] = {}
    for r in results:
        words = r["setting"].split()
        seeds = [int(w.partition("=")[2]) for w in words if w.startswith("seed=")]
        rest = " ".join(w for w in words if not w.startswith("seed="))
        groups.setdefault(rest, {})[seeds[-1] if seeds else seed] = r["best_f1"]
    return [{"setting": name, "seeds": sorted(by_seed), "best_f1": [by_seed[s] for s in sorted(by_seed)],
             "mean": sum(by_seed.values()) / len(by_seed)} for name, by_seed in groups.items() if len(by_seed) > 1]


def markdown(results: list[dict], args) -> str:
    lines = [f"Backbone `{Path(args.plm_path).name}`, data `{args.data_path}`.", "",
             "| setting | best dev F1 | dev EM | best epoch | dev F1 per epoch | train s |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    for r in sorted(results, key=lambda r: (r["setting"].split()[0], -r["best_f1"])):
        per_epoch = " / ".join(f"{f:.1f}" for f in r["dev_f1"])
        lines.append(f"| `{r['setting']}` | {r['best_f1']:.1f} | {r['best_em']:.1f} | {r['best_epoch']} | "
                     f"{per_epoch} | {r['train_s']:.0f} |")
    lines += ["", "Settings not named take optqa's defaults of the time; train s: the train command's wall time "
                  "(loading and dev scoring after every epoch included), on cores other work may have shared."]
    groups = seed_groups(results, args.seed)
    if groups:
        lines += ["", f"Settings run with several seeds (`seed=N`; none named: {args.seed}), best dev F1 per seed "
                      "and the mean:", "", "| setting | seeds | best dev F1 per seed | mean |",
                  "| --- | --- | --- | ---: |"]
        for g in sorted(groups, key=lambda g: (g["setting"].split()[0], -g["mean"])):
            lines.append(f"| `{g['setting']}` | {', '.join(map(str, g['seeds']))} | "
                         f"{' / '.join(f'{f:.1f}' for f in g['best_f1'])} | {g['mean']:.1f} |")
    return "\n".join(lines)


def _key(args) -> dict:
    """What makes settings' results comparable: the same backbone, data, subset and seed."""
    return {"plm_path": args.plm_path, "data_path": args.data_path, "quick": args.quick, "seed": args.seed}


def main(argv=None) -> int:
    args = parse_args(argv)
    from optqa.cli import configure_logging

    configure_logging()
    logging.getLogger("optqa").setLevel(logging.WARNING)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data, info, log = prepare_data(args), machine(), workdir / "sweep.jsonl"
    if args.num_threads:
        info["threads"] = args.num_threads
    print(machine_markdown(info), flush=True)
    for setting in args.runs:
        if any(r["setting"] == setting for r in logged_results(log, _key(args), "setting")):
            continue
        started = time.strftime("%H:%M:%S")
        try:
            result = run_setting(args, data, setting)
        except RuntimeError as exc:
            print(f"{setting}: {exc}", flush=True)
            continue
        log_results(log, _key(args), [result])
        print(f"[{started}] {setting}: best dev F1 {result['best_f1']:.1f} (epoch {result['best_epoch']}), "
              f"{result['train_s']:.0f} s", flush=True)
    rows = [r for r in logged_results(log, _key(args), "setting") if r["setting"] in args.runs]
    print(write_run(args, SECTION, "Default recipes: the sweep (`benchmarks/sweep.py`)", markdown(rows, args), info,
                    argv=argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
