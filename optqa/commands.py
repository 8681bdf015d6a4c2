"""One function per --mode: each turns a RunConfig into calls to the library and prints the outcome."""
from __future__ import annotations

import logging
from pathlib import Path

from .config import RunConfig
from .errors import OptqaError

log = logging.getLogger("optqa")


def _load_for_inference(config: RunConfig, explicit: set[str], quantize_default: str, background: bool = False):
    """A checkpoint rebuilds everything; only flags the user typed override what it recorded.

    How to answer on this machine (--quantize, --merge_lora) is never taken from the checkpoint; the
    --quantize actually applied is written back into ``config`` (and so into the run folder's config.json).
    """
    from .build import load_trained
    from .quantize import prepare_for_answering
    from .runtime import configure_threads

    configure_threads(config.num_threads)
    overrides = {k: getattr(config, k) for k in ("max_new_tokens", "eval_batch_size", "precision")
                 if k in explicit}
    model, manifest, saved = load_trained(config.delta_save_path,
                                          plm_path=config.plm_path if "plm_path" in explicit else None,
                                          ignore_backbone_mismatch=config.ignore_backbone_mismatch,
                                          overrides=overrides,
                                          template=config.template if "template" in explicit else None)
    saved.quantize, saved.merge_lora = config.quantize, config.merge_lora
    config.quantize = prepare_for_answering(model, saved, default=quantize_default, background=background)
    return model, manifest, saved


def train(config: RunConfig, explicit: set[str]) -> int:
    from .trainer import train as run_training

    summary = run_training(config)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    size = summary.get("checkpoint_bytes")
    print(f"best epoch {summary['best_epoch']}: dev F1 {summary['dev_f1']:.2f} EM {summary['dev_em']:.2f} | "
          f"test F1 {summary['test_f1']:.2f} EM {summary['test_em']:.2f}")
    print(f"delta saved to {summary['delta_save_path']}" + (f" ({size / 1e6:.2f} MB)" if size else "")
          + f"; results in {summary['run_dir']}; wall time {summary['wall_time_s']:.1f} s")
    cut = {split: n for split, n in (summary.get("truncated") or {}).items() if n}
    if cut:
        print("examples whose question was cut to fit --max_seq_l: "
              + ", ".join(f"{split} {n}" for split, n in cut.items()))
    if summary.get("plot"):
        print(f"learning curve: {summary['plot']}")


def evaluate(config: RunConfig, explicit: set[str]) -> int:
    """Score a saved delta, or a --predictions_file, on --split; --compare_file adds a question-by-question diff."""
    from .data import load_split, split_files
    from .evaluation import compare_rows, read_predictions, score_predictions
    from .results import METRICS_NAME, RunFolder, compare_name

    split = config.split
    gold = str(split_files(config)[split])
    if not Path(gold).is_file():
        what = "--predictions_file" if config.predictions_file else "the model's answers"
        raise OptqaError(f"--mode evaluate scores {what} against the gold answers of --split {split}, and {gold} "
                         f"does not exist; name them with --{split}_file FILE (any jsonl with {config.id_field!r}, "
                         f"{config.question_field!r} and {config.answers_field!r}) or --data_path FOLDER holding "
                         f"{split}.jsonl")
    examples = load_split(config, split)
    # every file is read and matched to the gold ids before a model is loaded, so a bad file fails in seconds
    compared = (score_predictions(examples, read_predictions(config.compare_file, config.id_field),
                                  config.compare_file, gold) if config.compare_file else None)
    if config.predictions_file:
        source = config.predictions_file
        metrics, rows = score_predictions(examples, read_predictions(source, config.id_field), source, gold)
    else:
        from .evaluation import evaluate as score_model

        model, manifest, saved = _load_for_inference(config, explicit, quantize_default="none")
        pulled = manifest.get("pulled_from")
        # a Hub name's branch or tag can move: the scores are recorded against the commit that was answered
        source = f"hf://{pulled['repo_id']}@{pulled['commit']}" if pulled else config.delta_save_path
        encoded = model.wrapper.encode_all(examples, desc=f"tokenising {split}")
        metrics, rows = score_model(model, encoded, saved.eval_batch_size, split)
    run = RunFolder.create(config.output_dir, "evaluate")
    run.write_config(config)
    path = run.write_predictions(split, rows)
    run.append(METRICS_NAME, [{"split": split, f"{split}_f1": metrics["f1"], f"{split}_em": metrics["em"],
                               "count": metrics["count"], "source": source,
                               **({} if config.predictions_file else {"quantize": config.quantize})}])
    print(f"{split}: F1 {metrics['f1']:.2f} EM {metrics['em']:.2f} on {metrics['count']} questions from {source}; "
          f"predictions in {path}")
    if compared is not None:
        from .reports import comparison_table

        metrics_b, rows_b = compared
        counts, changed = compare_rows(rows, rows_b)
        diff = run.write_rows(compare_name(split), changed)
        run.append(METRICS_NAME, [{"split": split, "compare_file": config.compare_file, "compare_f1": metrics_b["f1"],
                                   "compare_em": metrics_b["em"], **counts}])
        print(comparison_table(source, config.compare_file, metrics, metrics_b, counts, changed))
        print(f"questions with different predictions in {diff}")
    return 0


def interactive_inference(config: RunConfig, explicit: set[str]) -> int:
    from .interactive import repl
    from .quantize import wait_until_ready

    # int8 packing runs while the first prompt waits for a person to type (about 2 s for OPT-125m)
    model, manifest, saved = _load_for_inference(config, explicit, quantize_default="auto", background=True)
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
        The answer, followed by ``[question cut: its last N tokens did not fit max_seq_l M]`` when it was cut.
    """
    from .data import InputExample

    answer = model.answer([question])[0]
    encoded = model.wrapper.encode(InputExample(text_a=question))
    if encoded.tokens_cut:
        answer += (f"   [question cut: its last {encoded.tokens_cut} tokens did not fit max_seq_l "
                   f"{model.wrapper.max_seq_length}]")
    return answer


def demo(config: RunConfig, explicit: set[str]) -> int:
    from .demo import run_demo

    run_demo(config, explicit)
    return 0


def download(config: RunConfig, explicit: set[str]) -> int:
    from .download import download_arc_da, has_data

    target = Path(config.data_path)
    if has_data(target):
        print(f"ARC-DA already in {target}")
        return 0
    download_arc_da(target, url=config.data_url, allow_checksum_mismatch=config.allow_checksum_mismatch)
    print(f"ARC-DA v1.1 in {target} (train/dev/test.jsonl, checksums verified)")
    return 0


def inspect(config: RunConfig, explicit: set[str]) -> int:
    from .sharing import inspect_checkpoint

    print("\n".join(inspect_checkpoint(config.delta_save_path)))
    return 0


def export(config: RunConfig, explicit: set[str]) -> int:
    from .sharing import export_checkpoint

    for line in export_checkpoint(config.delta_save_path, config.export_path, peft=config.export_peft,
                                  plm_path=config.plm_path if "plm_path" in explicit else None,
                                  ignore_backbone_mismatch=config.ignore_backbone_mismatch,
                                  template=config.template if "template" in explicit else None):
        print(line)
    return 0


def push(config: RunConfig, explicit: set[str]) -> int:
    from .hub import push as push_to_hub

    for line in push_to_hub(config, explicit):
        print(line)
    return 0


def import_opendelta(config: RunConfig, explicit: set[str]) -> int:
    from .opendelta_import import import_opendelta as convert

    print(convert(config, explicit))
    return 0


def serve(config: RunConfig, explicit: set[str]) -> int:
    """Verify every delta, load the backbone once, and answer over HTTP until Ctrl-C."""
    import os

    from .runtime import configure_threads
    from .serve import api_key_from, bind, create_app, describe, load_served, parse_delta_specs, run_server, url_of

    deltas = parse_delta_specs(config.deltas, config.delta_save_path)
    api_key = api_key_from(config.api_key, os.environ)
    # bound before the slow loading, so a taken port fails at once and the printed port is the served one
    sock = bind(config.host, config.port)
    try:
        configure_threads(config.num_threads)
        overrides = {k: getattr(config, k) for k in ("max_new_tokens",) if k in explicit}
        served = load_served(deltas, plm_path=config.plm_path if "plm_path" in explicit else None,
                             ignore_backbone_mismatch=config.ignore_backbone_mismatch, overrides=overrides,
                             precision=config.precision if "precision" in explicit else None,
                             quantize=config.quantize)
        app = create_app(served, api_key=api_key, batch_size=config.eval_batch_size)
        url = url_of(sock)
        log.info("%d delta(s) on one backbone:\n%s", len(served), "\n".join(describe(served)))
        if config.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s: reachable from other machines%s", config.host,
                        "" if api_key else " by anyone (no --api_key)")
        # one line on stdout, flushed: scripts and the tests read the port from it
        print(f"serving {', '.join(served)} at {url}/ (API: {url}/v1; Ctrl-C stops)", flush=True)
        run_server(app, sock)
    finally:
        sock.close()
    return 0
