"""Command line: maps flags (generated from RunConfig) to calls. No logic of its own."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from .config import RunConfig
from .errors import OptqaError

log = logging.getLogger("optqa")

DESCRIPTION = """Delta-tune OPT language models for direct-answer QA (ARC-DA) and answer questions with them.

modes:
  train                  train a delta; dev F1/EM per epoch; best delta to --raw_delta_save_path;
                         test scores; final delta to --delta_save_path
  evaluate               score a saved delta on --split (or a --predictions_file) and write predictions
  interactive_inference  answer questions typed (or piped) one per line, with the delta in --delta_save_path
  demo                   offline first run: tiny random OPT + bundled sample, train, save, reload, answer
  inspect                show and verify a checkpoint without loading the backbone
  export                 write a single-file bundle (and a PEFT adapter folder where PEFT has the method)
  import_opendelta       convert an OpenDelta checkpoint (config.json + pytorch_model.bin)
  download               fetch ARC-DA v1.1 into --data_path and check it
  serve                  answer over HTTP with several deltas on one backbone: OpenAI-style
                         /v1/completions and /v1/models, and a web page at /"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optqa", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = " ".join(default) if isinstance(default, list) else default
        # a help text that already explains its default (e.g. "<data_path>/train.jsonl") is not given a second one
        text = f.metadata["help"]
        kwargs: dict = {"help": text if "default:" in text else f"{text} (default: {shown})"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        kind = hints[f.name]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.metadata.get("nargs"):
            kwargs.update(nargs=f.metadata["nargs"], type=str)
        else:
            base = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
            kwargs["type"] = base[0]
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_args(argv=None) -> tuple[RunConfig, set[str]]:
    """The config, and which flags the user actually typed (a checkpoint's values win over defaults)."""
    given = vars(build_parser().parse_args(argv))
    return RunConfig(**given), set(given)


def main(argv=None) -> int:
    config, explicit = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "peft", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from . import commands

        return getattr(commands, config.mode)(config, explicit) or 0
    except OptqaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))

