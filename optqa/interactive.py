"""The question-answering REPL: ``Input a question:`` -> ``Answer: ...`` until quit(), EOF or Ctrl-C."""
from __future__ import annotations

import sys
from typing import TextIO

PROMPT = "Input a question:"
QUIT_WORDS = {"quit()", "quit", "exit()", "exit"}


def repl(answer_fn, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Answer questions one line at a time; returns how many were answered.

    A terminal gets the prompt on the input line; piped input gets it on a line of its own, so a transcript
    reads question by question.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if hasattr(stdout, "reconfigure"):
        # a Windows pipe or legacy console encodes in cp1252: a character it lacks must not end the session
        stdout.reconfigure(errors="backslashreplace")
    interactive = stdin.isatty() and stdout.isatty()
    answered = 0
    try:
        while True:
            if interactive:
                try:
                    line = input(PROMPT + " ")
                except EOFError:
                    break
            else:
                print(PROMPT, file=stdout, flush=True)
                line = stdin.readline()
                if not line:
                    break
            question = line.strip()
            if question in QUIT_WORDS:
                break
            if not question:
                continue  # ask again
            print(f"Answer: {answer_fn(question)}", file=stdout, flush=True)
            answered += 1
    except KeyboardInterrupt:
        print(file=stdout)
    return answered
