"""What one long question costs optqa's encoding (``LMTokenizerWrapper.encode``, shared by training, evaluate, the
question loop and serve), and how many characters the tokenizer is given.

    python benchmarks/question_cost.py [--max_seq_l 128] [--repeats 3] [--sizes 30 120 1000 5000]

Questions of 30 kB to 5 MB (ordinary English sentences), encoded as a prompt to answer and with a training
target, with the tiny test tokenizer (optqa.tiny, a byte-level BPE like OPT's; no download). The cost is meant
to stay flat: only the head of the question that can be kept is tokenised (``ManualTemplate.encode_head``), and
the cut is made once (``optqa.data._cut_to_budget``). ``--sizes`` picks the question sizes (kB), e.g. to time an
older optqa, whose cost grew with the square of the question, on the small ones only. The table also goes into its
section of ``benchmarks/RESULTS.md`` (``--results``), with the machine and the date.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: E402  (benchmarks/ is the script's folder)

REPO = Path(__file__).resolve().parents[1]
TITLE = "What one long question costs the encoding (`benchmarks/question_cost.py`)"
SENTENCE = "Sentence 7 says that green plants need light and water to grow. "


class CountingTokenizer:
    """The real tokenizer, counting calls and the characters they were given."""

    def __init__(self, tokenizer):
        self._tokenizer, self.calls, self.characters = tokenizer, 0, 0

    def __call__(self, text, **kwargs):
        self.calls += 1
        self.characters += len(text)
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_seq_l", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=float, nargs="+", default=[30, 120, 1000, 5000], help="question sizes, kB")
    common.add_results_option(parser)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from optqa.data import InputExample, LMTokenizerWrapper
    from optqa.template import ManualTemplate
    from optqa.tiny import build_opt

    texts = [json.loads(line)["question"] for line in (REPO / "data" / "sample" / "train.jsonl").read_text(
        encoding="utf-8").splitlines()] + [SENTENCE]
    folder = build_opt(Path(tempfile.mkdtemp(prefix="optqa-question-cost-")), texts, seed=0)
    tokenizer = CountingTokenizer(AutoTokenizer.from_pretrained(folder))
    template = ManualTemplate(tokenizer, text=(REPO / "templates" / "answer_template.txt").read_text(encoding="utf-8"))
    wrapper = LMTokenizerWrapper(tokenizer, template, max_seq_length=args.max_seq_l)
    info = common.machine()
    print(common.machine_markdown(info))
    lines = [f"max_seq_l {args.max_seq_l}; median of {args.repeats}. The peer: the same tokenizer given the whole "
             "question once, as `tokenizer(question, truncation=True, max_length=...)` does before it cuts", "",
             "| question | target | encode ms | tokenizer calls | characters tokenised | peer: whole question ms | "
             "peer / encode |", "| --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines))
    for size in (int(kb * 1000) for kb in args.sizes):
        question = (SENTENCE * (size // len(SENTENCE) + 1))[:size].strip()
        peer = _median_ms(lambda q=question: tokenizer(q, truncation=True, max_length=args.max_seq_l), args.repeats)
        for target in (None, "light"):
            tokenizer.calls = tokenizer.characters = 0
            ms = _median_ms(lambda q=question, t=target: wrapper.encode(InputExample(text_a=q), target=t), args.repeats)
            calls, characters = tokenizer.calls // args.repeats, tokenizer.characters // args.repeats
            lines.append(f"| {size / 1000:g} kB | {target or '-'} | {ms:.1f} | {calls} | {characters} | {peer:.1f} | "
                         f"{peer / ms:.0f}x |")
            print(lines[-1], flush=True)
    common.write_run(args, "question_cost", TITLE, "\n".join(lines), info)


def _median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


if __name__ == "__main__":
    main()
