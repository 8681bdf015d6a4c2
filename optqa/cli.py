"""The command line, the top of the package: flags generated from RunConfig's sections, each mode's config built
from the flags typed (``optqa.options.config_for``), one gate for option pairs (``optqa.options.check_run``), then
one ``<mode>_mode`` function per ``--mode`` (``MODE_RUNNERS``) that turns the config into calls to the library below
and prints the outcome. Exit status: 0, 2 for an ``error:`` line, 130 after Ctrl-C, 141
when the reader of stdout went away."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import typing
from pathlib import Path
from typing import Any, Callable

from optqa.config import MODES, RunConfig, Settings, shown_default
from optqa.errors import OptqaError

log = logging.getLogger("optqa")

DESCRIPTION = """Delta-tune OPT language models for direct-answer QA (ARC-DA) and answer questions with them.

modes:
  train                  train a delta; dev F1/EM per epoch; best delta to --raw_delta_save_path;
                         test scores; final delta to --delta_save_path
  evaluate               score a saved delta on --split (or a --predictions_file) and write predictions;
                         baselines: --no_delta (the bare backbone), --num_shots K, --chat_template
  interactive_inference  answer questions typed (or piped) one per line, with the delta in --delta_save_path
                         (a folder, a .optqa bundle, or hf://OWNER/NAME[@REVISION] on the Hugging Face Hub)
  demo                   offline first run: tiny random OPT + bundled sample, train, save, reload, answer
  inspect                show and verify a checkpoint without loading the backbone
  export                 write a single-file bundle (and a PEFT adapter folder where PEFT has the method)
  push                   upload a delta to the Hugging Face Hub (--hub_repo OWNER/NAME; --dry_run writes it)
  import_opendelta       convert an OpenDelta checkpoint (config.json + pytorch_model.bin)
  download               fetch ARC-DA v1.1 into --data_path and check it
  serve                  answer over HTTP with several deltas on one backbone: OpenAI-style
                         /v1/completions, /v1/chat/completions and /v1/models, and a web page at /"""


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


def parse_flags(argv=None) -> dict[str, Any]:
    """The flags typed, by name (argparse's usage errors and --help end the program with SystemExit)."""
    return vars(build_parser().parse_args(argv))


def parse_args(argv=None) -> Settings:
    """The config of the mode ``argv`` asks for (``optqa.config.MODE_CONFIGS``): a flag not typed is None, so a
    checkpoint's recorded value wins over a default nobody typed.

    Raises:
        OptqaError: a flag the mode does not read.
    """
    from optqa.options import config_for

    return config_for(parse_flags(argv))


# the exit status of a program killed by SIGPIPE (128 + 13), what `... | head` gets from C tools
BROKEN_PIPE_STATUS = 141


def main(argv=None) -> int:
    """``python -m optqa``: run one mode; returns the exit status (0, 2 for an ``error:`` line, 130 after Ctrl-C,
    141 when the reader of stdout went away)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.stdout is None:  # started with stdout closed (`>&-`): Python has no stream to print to
        print("error: standard output is closed: nothing could be shown; redirect it to a file or to "
              f"{os.devnull} instead", file=sys.stderr)
        return 2
    try:
        status = _run(argv)
        sys.stdout.flush()  # what is still buffered meets a closed pipe here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        # the reader went away (`optqa ... | head`): nothing more can be shown, so stop quietly
        _drop_stdout()
        return BROKEN_PIPE_STATUS
    except OSError as exc:
        if not _from_stdout(exc):
            raise
        # stdout's file refuses what is printed (`> /dev/full`, a full disk): say so once, where it can be read
        _drop_stdout()
        print(f"error: could not write to standard output: {exc.strerror or exc}", file=sys.stderr)
        return 2


def entry() -> typing.NoReturn:
    """``python -m optqa`` and the ``optqa`` command: ``main`` with the command line, then ``end_process``."""
    end_process(main())


def end_process(status: int) -> typing.NoReturn:
    """Exit with ``status`` (``python -m optqa``'s last step).

    A process of a multi-process run (torchrun, accelerate launch: ``WORLD_SIZE`` over 1) ends without the
    interpreter's finalisation (``os._exit``, once its log and streams are flushed). Under FSDP2 the sharded model
    outlives the run (dropping every Python reference to it does not free it: torch holds it outside Python's
    view), and with it the gloo process group; torn down while the interpreter was, a gloo worker releasing its
    last work's tensors aborted one rank now and then under load ("terminate called without an active
    exception", exit -6; the race is pytorch/pytorch#179291's).
    Every file a run writes is closed by then, and its process group ended.
    """
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader gone away, a stream closed: nothing more can be shown
                pass
        os._exit(status)
    sys.exit(status)


def _from_stdout(exc: OSError) -> bool:
    """Whether ``exc`` is stdout's file refusing what was printed (a refused write as ``write_failure`` knows
    them). Writing to an open stream carries no file name, while optqa's own file work either names its file
    (open, rename, mkdir) or is turned into an ``error:`` line where it happens (checkpoints, run folders); and a
    terminal does not refuse text."""
    from optqa.checkpoints.format import write_failure

    return write_failure(exc) is not None and exc.filename is None and not sys.stdout.isatty()


def _drop_stdout() -> None:
    """Point stdout at devnull, so that the interpreter's final flush does not meet a closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _parse(argv: list[str]) -> dict[str, Any] | int:
    """``parse_flags``, or the exit status where argparse ends the run: 0 after --help, 2 after a usage error.

    Also when the help meets a closed pipe (``optqa --help | head``): Python 3.11.7's argparse drops what the pipe
    refuses, 3.11.2's raises BrokenPipeError, and a help shorter than stdout's buffer meets it only in a later
    flush; each ends the same way here (tests/test_exits.py).
    """
    try:
        return parse_flags(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BrokenPipeError:
        status = 0
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
    return status


def _run(argv: list[str]) -> int:
    given = _parse(argv)
    if isinstance(given, int):
        return given
    try:
        configure_logging()
        from optqa.options import check_run, config_for

        config = config_for(given)
        check_run(config)
        return MODE_RUNNERS[config.mode](config) or 0
    except OptqaError as exc:
        # a training run stopped by a failed write (optqa.run.training.RunNotSaved) says how to continue it
        hint = f"; {continue_hint(argv)}" if getattr(exc, "resumable", False) else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_message(argv), file=sys.stderr)
        return 130


def interrupted_message(argv: list[str]) -> str:
    """What Ctrl-C prints: for training, the exact command that continues the run from its last saved state."""
    try:
        config = parse_args(argv)
    except (SystemExit, OptqaError):
        return "interrupted"
    if config.mode != "train":
        return "interrupted"
    config = config.resolved()
    from optqa.checkpoints.format import MANIFEST_NAME, RESUME_DIR_NAME

    state = Path(config.raw_delta_save_path) / RESUME_DIR_NAME
    if not (state / MANIFEST_NAME).is_file():
        return (f"interrupted before any resume state was saved in {state}; start again with the same command "
                f"(state is saved every --save_steps {config.save_steps} steps and at each epoch end)")
    return f"interrupted; {continue_hint(argv)}"


def continue_hint(argv: list[str]) -> str:
    """How a training run given ``argv`` continues: the exact ``--resume`` command once a resume state exists."""
    config = parse_args(argv).resolved()
    from optqa.checkpoints.format import MANIFEST_NAME, RESUME_DIR_NAME, resolve_folder

    if not (resolve_folder(Path(config.raw_delta_save_path) / RESUME_DIR_NAME) / MANIFEST_NAME).is_file():
        return "start again with the same command"
    again = argv if config.resume else [*argv, "--resume"]
    return f"continue from the last saved state with: python -m optqa {shlex.join(again)}"


def configure_logging() -> None:
    """Log lines on stderr, the libraries' own chatter off; in a multi-process run only the first process
    (RANK 0, set by torchrun and accelerate launch) logs below warnings: one log per run."""
    main_process = os.environ.get("RANK", "0") in ("", "0")
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    for noisy in ("transformers", "peft", "accelerate", "httpx", "httpx2", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # transformers' loading bars (which follow huggingface_hub's switch, read when transformers is imported)
    # would interleave with optqa's own bars and log lines; a user's own setting wins
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# ------------------------------------------------------------------------------------------ one per --mode

# what a fresh clone's delta_ckpts/ holds: files that keep the folder in git, not a checkpoint
PLACEHOLDERS = frozenset({"README.md", ".gitkeep"})


def no_delta_yet(config: Settings) -> None:
    """Refuse, saying what to do first, a mode that reads the default --delta_save_path before any delta was saved
    there: on a fresh clone ./delta_ckpts/ holds only its README, and "optqa_manifest.json is missing" would be
    true but tell a newcomer nothing.

    Raises:
        OptqaError: --delta_save_path was not typed (None) and its folder is missing or holds only
            ``PLACEHOLDERS``.
    """
    from optqa.checkpoints.format import MANIFEST_NAME, resolve_folder

    if config.delta_save_path is not None:
        return
    config = config.resolved()
    folder = resolve_folder(config.delta_save_path)
    if (folder / MANIFEST_NAME).is_file() or (folder.is_dir() and {p.name for p in folder.iterdir()} - PLACEHOLDERS):
        return  # a checkpoint, or files the loader names in its own refusal
    raise OptqaError(f"no delta in {config.delta_save_path} yet (the default --delta_save_path): train one first "
                     "(python -m optqa --mode train --plm_path facebook/opt-125m), or run the offline demo "
                     "(python -m optqa --mode demo) and pass the --delta_save_path it prints; or name a checkpoint "
                     "with --delta_save_path (a folder, a .optqa bundle or hf://OWNER/NAME)")


def training_config(config: Settings) -> RunConfig:
    """A training run's settings: the flags given; for the others the delta type's recipe on the backbone's
    family (its ``model_type``, read from the backbone's config before the weights load), else the defaults."""
    from optqa.config import RECIPE_KEYS
    from optqa.plm import backbone_model_type

    plain = RunConfig.of(config)
    model_type = backbone_model_type(plain.plm_path)
    run = RunConfig.of(config, model_type=model_type)
    taken = {k: getattr(run, k) for k in RECIPE_KEYS if getattr(run, k) != getattr(plain, k)}
    if taken:  # a default that differs from what --help shows first: say where it came from
        log.info("%s's recipe on a %s backbone: %s", run.delta_type, model_type,
                 " ".join(f"--{k} {v}" for k, v in taken.items()))
    return run


def train_mode(config: Settings) -> int:
    from optqa.run.training import train

    summary = train(training_config(config))
    if summary.main_process:  # one summary per run, however many processes trained
        print_summary(summary)
    return 0


def print_summary(summary) -> None:
    """What a finished training run prints (a ``TrainSummary``)."""
    size = summary.checkpoint_bytes
    print(f"best epoch {summary.best_epoch}: dev F1 {summary.dev_f1:.2f} EM {summary.dev_em:.2f} | "
          f"test F1 {summary.test_f1:.2f} EM {summary.test_em:.2f}")
    print(f"delta saved to {summary.delta_save_path}" + (f" ({size / 1e6:.2f} MB)" if size else "")
          + f"; results in {summary.run_dir}; wall time {summary.wall_time_s:.1f} s")
    cut = {split: n for split, n in summary.truncated.items() if n}
    if cut:
        print("examples whose question was cut to fit --max_seq_l: "
              + ", ".join(f"{split} {n}" for split, n in cut.items()))
    if summary.plot:
        print(f"learning curve: {summary.plot}")


def evaluate_mode(config: Settings) -> int:
    """Score a saved delta, the bare backbone (--no_delta), or a --predictions_file, on --split; --num_shots and
    --chat_template change how the model is prompted; --compare_file adds a question-by-question diff."""
    from optqa.data import load_split, split_files
    from optqa.run.folder import METRICS_NAME, RunFolder, compare_name
    from optqa.run.predictions import compare_rows, read_predictions, score_predictions

    settings = config.resolved()
    split = settings.split
    gold = str(split_files(settings)[split])
    if not Path(gold).is_file():
        what = "--predictions_file" if settings.predictions_file else "the model's answers"
        raise OptqaError(f"--mode evaluate scores {what} against the gold answers of --split {split}, and {gold} "
                         f"does not exist; name them with --{split}_file FILE (any jsonl with {settings.id_field!r}, "
                         f"{settings.question_field!r} and {settings.answers_field!r}) or --data_path FOLDER holding "
                         f"{split}.jsonl")
    examples = load_split(settings, split)
    # every file is read and matched to the gold ids before a model is loaded, so a bad file fails in seconds
    compared = (score_predictions(examples, read_predictions(settings.compare_file, settings.id_field),
                                  settings.compare_file, gold) if settings.compare_file else None)
    if settings.predictions_file:
        source = settings.predictions_file
        metrics, rows = score_predictions(examples, read_predictions(source, settings.id_field), source, gold)
    else:
        from optqa.run.evaluation import evaluate as score_model
        from optqa.run.evaluation import use_shots

        model, source, batch_size = _model_to_score(config)
        use_shots(model, settings)
        encoded = model.wrapper.encode_all(examples, desc=f"tokenising {split}")
        metrics, rows = score_model(model, encoded, batch_size, split)
        # which baseline (or delta) answered, and how it was prompted
        prompting = {"quantize": config.quantize, "no_delta": settings.no_delta, "num_shots": settings.num_shots,
                     "chat_template": model.wrapper.chat_template}
    run = RunFolder.create(settings.output_dir, "evaluate")
    run.write_config(RunConfig.of(config))  # with the --quantize applied
    path = run.write_predictions(split, rows)
    run.append(METRICS_NAME, [{"split": split, f"{split}_f1": metrics["f1"], f"{split}_em": metrics["em"],
                               "count": metrics["count"], "source": source,
                               **({} if settings.predictions_file else prompting)}])
    print(f"{split}: F1 {metrics['f1']:.2f} EM {metrics['em']:.2f} on {metrics['count']} questions from {source}; "
          f"predictions in {path}")
    if compared is not None:
        from optqa.run.folder import agreement_name, comparison_table, plot_agreement
        from optqa.run.predictions import AGREEMENT, RIGHT_F1, agreement

        metrics_b, rows_b = compared
        counts, changed = compare_rows(rows, rows_b)
        agreed = agreement(rows, rows_b)
        diff = run.write_rows(compare_name(split), changed)
        chart = plot_agreement(run.path / agreement_name(split), agreed, source, settings.compare_file, RIGHT_F1)
        run.append(METRICS_NAME, [{"split": split, "compare_file": settings.compare_file, "compare_f1": metrics_b["f1"],
                                   "compare_em": metrics_b["em"], **counts, **agreed}])
        print(comparison_table(source, settings.compare_file, metrics, metrics_b, counts, changed))
        print(f"questions with different predictions in {diff}")
        print(f"right (F1 > {RIGHT_F1:g}%): " + ", ".join(f"{AGREEMENT[k]} {v}" for k, v in agreed.items())
              + f"; chart in {chart}")
    return 0


def _model_to_score(config: Settings):
    """What ``--mode evaluate`` answers with: a checkpoint (``load_for_answering``), or with ``--no_delta`` the bare
    backbone through --template. Returns ``(model, source recorded with the scores, answering batch size)``; the
    --quantize applied is written into ``config.quantize``."""
    if not config.no_delta:
        from optqa.run.answering import load_for_answering

        no_delta_yet(config)
        model, manifest, saved = load_for_answering(config, quantize_default="none")
        pulled = manifest.get("pulled_from")
        # a Hub name's branch or tag can move: the scores are recorded against the commit that was answered
        source = f"hf://{pulled['repo_id']}@{pulled['commit']}" if pulled else config.resolved().delta_save_path
        return model, source, saved.eval_batch_size
    from optqa.answering import prepare_for_answering
    from optqa.hardware import configure_threads
    from optqa.run.evaluation import bare_model

    settings = RunConfig.of(config)  # the bare backbone: every setting typed or default, none from a checkpoint
    configure_threads(settings.num_threads)
    model = bare_model(settings)
    config.quantize = prepare_for_answering(model, settings, default="none")
    return model, f"{settings.plm_path} (no delta)", settings.eval_batch_size


def interactive_inference_mode(config: Settings) -> int:
    from optqa.answering import wait_until_ready
    from optqa.interactive import repl
    from optqa.run.answering import load_for_answering

    no_delta_yet(config)
    # int8 packing runs while the first prompt waits for a person to type (0.6 s for OPT-125m on 2 cores)
    model, manifest, saved = load_for_answering(config, quantize_default="auto", background=True)
    # the backbone actually loaded: --plm_path when given, else the checkpoint's
    log.info("delta %s on %s ready; type quit() to stop", manifest["delta"]["delta_type"], saved.plm_path)

    def answer(question: str) -> str:
        wait_until_ready(model)
        return answer_with_notes(model, question)

    try:
        repl(answer)
    finally:
        wait_until_ready(model)  # never leave the packing thread running into interpreter shutdown
    return 0


def answer_with_notes(model, question: str) -> str:
    """The REPL's answer to one question, saying so when the question was cut to fit the checkpoint's max_seq_l.

    Args:
        model: a ``PromptForGeneration`` (from ``load_trained``).
        question: the question as typed.
    Returns:
        The answer, followed by ``[question cut to its first N tokens to fit max_seq_l M]`` when it was cut.
    """
    from optqa.data import InputExample

    encoded = model.wrapper.encode(InputExample(text_a=question))  # once: it answers and says what was cut
    answer = model.answer_encoded([encoded])[0]
    if encoded.truncated:
        answer += (f"   [question cut to its first {encoded.question_tokens} tokens to fit max_seq_l "
                   f"{model.wrapper.max_seq_length}]")
    return answer


def demo_mode(config: Settings) -> int:
    from optqa.demo import run_demo

    run_demo(config)
    return 0


def download_mode(config: Settings) -> int:
    from optqa.download import download_arc_da, has_data

    config = config.resolved()
    target = Path(config.data_path)
    if has_data(target):
        print(f"ARC-DA already in {target}")
        return 0
    download_arc_da(target, url=config.data_url, allow_checksum_mismatch=config.allow_checksum_mismatch)
    print(f"ARC-DA v1.1 in {target} (train/dev/test.jsonl, checksums verified)")
    return 0


def inspect_mode(config: Settings) -> int:
    from optqa.checkpoints.inspect import inspect_checkpoint

    no_delta_yet(config)
    print("\n".join(inspect_checkpoint(config.resolved().delta_save_path)))
    return 0


def export_mode(config: Settings) -> int:
    from optqa.sharing.export import export_checkpoint

    no_delta_yet(config)
    settings = config.resolved()
    # --plm_path and --template not given (None): the checkpoint's
    for line in export_checkpoint(settings.delta_save_path, settings.export_path, peft=settings.export_peft,
                                  plm_path=config.plm_path, ignore_backbone_mismatch=settings.ignore_backbone_mismatch,
                                  template=config.template):
        print(line)
    return 0


def push_mode(config: Settings) -> int:
    from optqa.sharing.push import push as push_to_hub

    no_delta_yet(config)
    # --plm_path not given (None): the checkpoint's backbone
    for line in push_to_hub(dataclasses.replace(config.resolved(), plm_path=config.plm_path)):
        print(line)
    return 0


def import_opendelta_mode(config: Settings) -> int:
    from optqa.sharing.opendelta import import_opendelta as convert

    print(convert(RunConfig.of(config)))
    return 0


def serve_mode(config: Settings) -> int:
    """Verify every delta, load the backbone once, and answer over HTTP until Ctrl-C."""
    import os

    from optqa.hardware import configure_threads
    from optqa.serve import (
        LOOPBACK_HOSTS,
        allowed_hosts_for,
        api_key_from,
        bind,
        create_app,
        describe,
        load_served,
        parse_delta_specs,
        run_server,
        url_of,
    )

    if not config.deltas:  # --delta_save_path is served as "default"
        no_delta_yet(config)
    # --plm_path, --max_new_tokens and --precision not given (None): each checkpoint's
    given, config = config, config.resolved()
    deltas = parse_delta_specs(config.deltas, config.delta_save_path)
    api_key = api_key_from(config.api_key, os.environ)
    hosts = allowed_hosts_for(config.host, config.allowed_hosts)
    # bound before the slow loading, so a taken port fails at once and the printed port is the served one
    sock = bind(config.host, config.port)
    try:
        configure_threads(config.num_threads)
        overrides = {"max_new_tokens": given.max_new_tokens} if given.max_new_tokens is not None else {}
        served = load_served(deltas, plm_path=given.plm_path, ignore_backbone_mismatch=config.ignore_backbone_mismatch,
                             overrides=overrides, precision=given.precision, quantize=config.quantize)
        backbone = next(iter(served.values())).model.backbone  # one backbone, shared by every delta
        configure_threads(config.num_threads, hidden_size=backbone.config.hidden_size)
        app = create_app(served, api_key=api_key, batch_size=config.eval_batch_size, allowed_hosts=hosts)
        url = url_of(sock)
        log.info("%d delta(s) on one backbone:\n%s", len(served), "\n".join(describe(served)))
        if config.host not in LOOPBACK_HOSTS:
            log.warning("listening on %s: reachable from other machines%s; Host names served: %s", config.host,
                        "" if api_key else " by anyone (no --api_key)", ", ".join(hosts) if hosts else "any")
        # one line on stdout, flushed: scripts and the tests read the port from it
        print(f"serving {', '.join(served)} at {url}/ (API: {url}/v1; Ctrl-C stops)", flush=True)
        run_server(app, sock)
    finally:
        sock.close()
    return 0


# --mode's value -> the function that runs it
MODE_RUNNERS: dict[str, Callable[[Settings], int]] = {
    "train": train_mode, "evaluate": evaluate_mode, "interactive_inference": interactive_inference_mode,
    "demo": demo_mode, "inspect": inspect_mode, "export": export_mode, "push": push_mode,
    "download": download_mode, "import_opendelta": import_opendelta_mode, "serve": serve_mode}
assert set(MODE_RUNNERS) == set(MODES)
