"""``--mode demo``: the offline first run. Builds a tiny random OPT and tokenizer, trains a delta on the
bundled sample, saves it, reloads it from the checkpoint alone and answers a few questions."""
from __future__ import annotations

import logging
import shlex
from pathlib import Path

from optqa.config import RunConfig, Settings, find_repo_file
from optqa.errors import OptqaError

log = logging.getLogger("optqa")
SAMPLE = Path("data/sample")
# a random 2-layer backbone needs a bigger step and more passes than a pretrained one to memorise the sample
DEMO_SETTINGS = dict(delta_type="adapter", modified_modules=["self_attn", "fc1", "fc2"], bottleneck_dim=96, lr=2e-2,
                     train_epochs=150, batch_size=8, max_new_tokens=12, save_steps=0)
# on a random backbone dev F1 is noise, so picking the epoch by it would keep an arbitrary one: the demo shows
# memorisation and picks its epoch by F1 on the training questions it prints (a few, to keep epochs quick)
DEMO_SHOWN = 6


def find_sample(config: Settings) -> Path:
    """The demo's data: --data_path if given, else the bundled sample.

    Raises:
        OptqaError: no --data_path and no bundled sample (not run from a checkout).
    """
    if config.data_path is not None:
        return Path(config.data_path)
    found = find_repo_file(SAMPLE)
    if found is not None and (found / "train.jsonl").is_file():
        return found
    raise OptqaError("the bundled sample data/sample/ was not found; run from the optqa checkout or pass --data_path")


def run_demo(config: Settings) -> None:
    """``--mode demo`` with its config (``MODE_CONFIGS["demo"]``: a flag not typed is None)."""
    from optqa.build import load_trained
    from optqa.data import load_split
    from optqa.run.training import train
    from optqa.tiny import build_opt

    sample = find_sample(config)
    root = Path(config.resolved().output_dir) / "demo"
    # typed flags override the demo's settings; the paths below are the demo's own (the demo's config has no
    # others, and --data_path was read by find_sample)
    demo_config = RunConfig(**{**DEMO_SETTINGS, **config.given(), "data_path": str(sample), "mode": "train",
                               "plm_path": str(root / "tiny-opt"), "delta_save_path": str(root / "delta_ckpts"),
                               "raw_delta_save_path": str(root / "raw_delta_ckpts"), "output_dir": str(root / "runs"),
                               "dev_file": str(root / "shown.jsonl")})
    root.mkdir(parents=True, exist_ok=True)
    lines = (sample / "train.jsonl").read_bytes().splitlines(keepends=True)
    (root / "shown.jsonl").write_bytes(b"".join(lines[:DEMO_SHOWN]))
    train_examples = load_split(demo_config, "train")
    texts = [e.text_a for e in train_examples] + [a for e in train_examples for a in e.tgt_text]
    texts += [e.text_a for e in load_split(demo_config, "test")]
    print(f"1/4 building a tiny random OPT (2 layers, hidden 64) and a BPE tokenizer in {root / 'tiny-opt'}")
    build_opt(root / "tiny-opt", texts, seed=demo_config.seed)
    print(f"2/4 training the {demo_config.delta_type} delta on {sample} ({len(train_examples)} questions, "
          f"{demo_config.train_epochs} epochs)")
    summary = train(demo_config)
    memorised_f1 = summary.dev_f1  # the demo's dev split is the training questions shown below (shown.jsonl)
    print(f"3/4 saved the delta to {summary.delta_save_path} ({summary.checkpoint_bytes / 1e3:.1f} kB); "
          f"F1 on the training questions {memorised_f1:.1f} (those shown below), on unseen test questions "
          f"{summary.test_f1:.1f} (a random backbone knows no science)")
    model, manifest, _ = load_trained(demo_config.delta_save_path)
    shown = train_examples[:DEMO_SHOWN]
    print("4/4 reloaded from the checkpoint alone; answers to training questions it memorised:")
    for example, answer in zip(shown, model.answer([e.text_a for e in shown])):
        print(f"  Q: {example.text_a}\n  A: {answer}   (gold: {' | '.join(example.tgt_text)})")
    # absolute, like the backbone path in the manifest: the command works from any folder
    print("next: python -m optqa --mode interactive_inference --delta_save_path "
          + shlex.quote(str(Path(demo_config.delta_save_path).resolve())))
