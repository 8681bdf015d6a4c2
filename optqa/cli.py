"""Command line: maps flags (generated from RunConfig) to calls. No logic of its own."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import typing

from .config import RunConfig, shown_default
from .errors import OptqaError

log = logging.getLogger("optqa")

DESCRIPTION = """Delta-tune OPT language models for direct-answer QA (ARC-DA) and answer questions with them.

modes:
  train                  train a delta; dev F1/EM per epoch; best delta to --raw_delta_save_path;
                         test scores; final delta to --delta_save_path
  evaluate               score a saved delta on --split (or a --predictions_file) and write predictions
  interactive_inference  answer questions typed (or piped) one per line, with the delta in --delta_save_path
                         (a folder, a .optqa bundle, or hf://OWNER/NAME[@REVISION] on the Hugging Face Hub)
  demo                   offline first run: tiny random OPT + bundled sample, train, save, reload, answer
  inspect                show and verify a checkpoint without loading the backbone
  export                 write a single-file bundle (and a PEFT adapter folder where PEFT has the method)
  push                   upload a delta to the Hugging Face Hub (--hub_repo OWNER/NAME; --dry_run writes it)
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
        shown = shown_default(f)
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


# the exit status of a program killed by SIGPIPE (128 + 13), what `... | head` gets from C tools
BROKEN_PIPE_STATUS = 141


def main(argv=None) -> int:
    """``python -m optqa``: run one mode; returns the exit status (0, 2 for an ``error:`` line, 130 after Ctrl-C,
    141 when the reader of stdout went away)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = _run(argv)
        sys.stdout.flush()  # what is still buffered meets a closed pipe here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        # the reader went away (`optqa ... | head`): nothing more can be shown, so stop quietly; stdout is pointed
        # at devnull so that the interpreter's final flush does not raise the same error again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE_STATUS


def _run(argv: list[str]) -> int:
    try:
        config, explicit = parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        for noisy in ("transformers", "peft", "accelerate", "httpx", "httpx2", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        from . import commands
        from .options import check_run

        check_run(config, explicit)
        return getattr(commands, config.mode)(config, explicit) or 0
    except OptqaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_message(argv), file=sys.stderr)
        return 130
    except SystemExit as exc:
        # argparse's --help and usage errors: their output may also meet a closed pipe in the flush above
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


def interrupted_message(argv: list[str]) -> str:
    """What Ctrl-C prints: for training, the exact command that continues the run from its last saved state."""
    from pathlib import Path

    try:
        config, _ = parse_args(argv)
    except SystemExit:
        return "interrupted"
    if config.mode != "train":
        return "interrupted"
    from .checkpoint import MANIFEST_NAME, RESUME_DIR_NAME

    state = Path(config.raw_delta_save_path) / RESUME_DIR_NAME
    if not (state / MANIFEST_NAME).is_file():
        return (f"interrupted before any resume state was saved in {state}; start again with the same command "
                f"(state is saved every --save_steps {config.save_steps} steps and at each epoch end)")
    again = argv if config.resume else [*argv, "--resume"]
    return f"interrupted; continue from the last saved state with: python -m optqa {shlex.join(again)}"


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))

