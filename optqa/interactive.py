"""The question-answering REPL: ``Input a question:`` -> ``Answer: ...`` until quit(), EOF or Ctrl-C (which the
command line ends with ``interrupted`` and status 130, the shells' convention for SIGINT).

In a terminal the question is read by prompt_toolkit (line editing with the arrow keys, history kept in a file
and recalled with Up, on Linux, macOS and the Windows console alike); piped input is read line by line as
before, so a transcript can be scripted.
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

PROMPT = "Input a question:"
QUIT_WORDS = {"quit()", "quit", "exit()", "exit"}
# where typed questions are remembered between sessions (Up recalls them)
HISTORY_PATH = Path("~/.optqa/question_history")
# every character a terminal (or str.splitlines) starts a new line at
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with its line breaks, and the white space around them, folded to single spaces: one printed line
    per answer. Split and stripped: one pattern with ``\\s*`` on both sides of the breaks backtracks over every
    run of spaces that ends in no break, quadratic in its length."""
    return " ".join(part for part in (part.strip() for part in _LINE_BREAKS.split(text)) if part)


def is_text(line: str) -> bool:
    """Whether ``line`` is text: undecodable bytes read with ``surrogateescape`` (or a JSON ``\\ud800`` escape)
    leave lone surrogates, which no tokenizer and no UTF-8 file takes."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def terminal_session(history_path: Path = HISTORY_PATH, **session_options):
    """A prompt_toolkit ``PromptSession`` with the question history in ``history_path`` (in memory where it cannot
    be written, e.g. a read-only home folder); ``session_options`` go to ``PromptSession`` (e.g. ``input`` and
    ``output``)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    path = history_path.expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        history = FileHistory(str(path))
    except OSError as exc:
        log.warning("question history not kept (%s: %s)", path, exc.strerror)
        history = InMemoryHistory()
    return PromptSession(history=history, **session_options)


def repl(answer_fn, stdin: TextIO | None = None, stdout: TextIO | None = None, session=None) -> int:
    """Answer questions one line at a time.

    Args:
        answer_fn: question (str) -> answer (str).
        stdin, stdout: the streams (default: the process's).
        session: a prompt_toolkit ``PromptSession`` to read questions with; by default one is made when stdin
            and stdout are both terminals, and piped input is read line by line.
    Returns:
        How many questions were answered (after quit() or the end of input).
    Raises:
        KeyboardInterrupt: Ctrl-C, at the prompt or while answering, once the terminal's line is ended.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if hasattr(stdout, "reconfigure"):
        # a Windows pipe or legacy console encodes in cp1252: a character it lacks must not end the session
        stdout.reconfigure(errors="backslashreplace")
    if hasattr(stdin, "reconfigure"):
        # bytes that are not UTF-8 (binary junk piped in) arrive as lone surrogates, and that line is skipped below,
        # instead of a decoding error ending the session
        stdin.reconfigure(errors="surrogateescape")
    if session is None and stdin.isatty() and stdout.isatty():
        session = terminal_session()
    answered = 0
    prompting = False
    try:
        while True:
            if session is not None:
                prompting = True
                try:
                    line = session.prompt(PROMPT + " ")
                except EOFError:  # Ctrl-D on an empty line; prompt_toolkit has ended the line
                    break
                prompting = False
            else:
                # piped: the prompt on a line of its own, so a transcript reads question by question
                print(PROMPT, file=stdout, flush=True)
                line = stdin.readline()
                if not line:
                    break
            question = line.strip()
            if question in QUIT_WORDS:
                break
            if not question:
                continue  # ask again
            if not is_text(question):
                print("skipped: that line is not UTF-8 text", file=sys.stderr, flush=True)
                continue
            print(f"Answer: {one_line(answer_fn(question))}", file=stdout, flush=True)
            answered += 1
    except KeyboardInterrupt:
        # the shell's prompt comes back on a fresh line, not after the terminal's ^C (prompt_toolkit, reading a
        # question, has already ended its line)
        if not prompting:
            print(file=stdout, flush=True)
        raise
    return answered
