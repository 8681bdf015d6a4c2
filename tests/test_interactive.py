"""The REPL loop itself, in-process: quitting, re-asking, and output encodings a Windows pipe may have."""
from __future__ import annotations

import io

from optqa.interactive import PROMPT, repl


def test_an_answer_the_output_encoding_lacks_does_not_end_the_session():
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="cp1252")  # a Windows pipe's default encoding
    stdin = io.StringIO("first\n\nsecond\nquit()\nnever asked\n")
    answered = repl(lambda q: f"{q} \u2603", stdin=stdin, stdout=stdout)
    stdout.flush()
    lines = raw.getvalue().decode("cp1252").split("\n")
    assert answered == 2
    assert [line for line in lines if line.startswith("Answer:")] == ["Answer: first \\u2603", "Answer: second \\u2603"]
    assert lines.count(PROMPT) == 4  # asked again after the empty line, and once more before quit()
