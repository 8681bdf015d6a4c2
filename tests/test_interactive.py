"""The REPL loop itself, in-process: quitting, re-asking, and output encodings a Windows pipe may have."""
from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from optqa.interactive import PROMPT, one_line, repl


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


# ---- a terminal: prompt_toolkit's line editing and history (issue 13, class 6) ---------------------------------

LEFT, UP, ENTER, CTRL_C, CTRL_D = "\x1b[D", "\x1b[A", "\r", "\x03", "\x04"


def test_binary_junk_piped_in_is_skipped_line_by_line(capsys):
    # bytes that are not UTF-8 between two questions: each such line is skipped with one message, the loop goes on
    junk = bytes(range(128, 256)) + b"\xff\xfe\x00 \xc3\x28"
    stdin = io.TextIOWrapper(io.BytesIO(b"first\n" + junk + b"\n" + junk[::-1] + b"\nsecond\n"), encoding="utf-8")
    stdout = io.StringIO()
    assert repl(lambda q: q.upper(), stdin=stdin, stdout=stdout) == 2
    assert [line for line in stdout.getvalue().split("\n") if line.startswith("Answer:")] == [
        "Answer: FIRST", "Answer: SECOND"]
    assert capsys.readouterr().err == "skipped: that line is not UTF-8 text\n" * 2


def terminal_repl(typed: list[str], history_file: Path) -> tuple[int | str, list[str]]:
    """The real loop reading keys as a terminal sends them; (answered, or "Ctrl-C" where Ctrl-C ended it, stdout
    lines).

    ``typed[0]`` is typed at the first prompt, ``typed[i]`` while the i-th answer is being made (before the next
    prompt), as a user types ahead.
    """
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from optqa.interactive import terminal_session

    stdout = io.StringIO()
    pending = list(typed)
    with create_pipe_input() as keyboard:
        keyboard.send_text(pending.pop(0))

        def answer(question: str) -> str:
            if pending:
                keyboard.send_text(pending.pop(0))
            return f"line one\nline two: {question}"

        session = terminal_session(history_file, input=keyboard, output=DummyOutput())
        try:
            answered = repl(answer, stdout=stdout, session=session)
        except KeyboardInterrupt:  # the command line ends with status 130 (tests/test_exits.py)
            answered = "Ctrl-C"
    return answered, stdout.getvalue().split("\n")


def test_arrow_keys_edit_and_up_recalls_the_history(tmp_path):
    history = tmp_path / "history"
    answered, lines = terminal_repl([f"abc{LEFT}{LEFT}X{ENTER}", f"{UP}{ENTER}", CTRL_D], history)
    # Left moved the cursor (no ^[[D in the question), Up brought back the first question; one line per answer
    assert answered == 2
    assert lines == ["Answer: line one line two: aXbc", "Answer: line one line two: aXbc", ""]
    # prompt_toolkit keeps a question repeated at once a single time
    assert [line for line in history.read_text().splitlines() if line.startswith("+")] == ["+aXbc"]
    # a new session starts with the saved history: Up recalls the last question of the previous one
    answered, lines = terminal_repl([f"{UP}{ENTER}", CTRL_C], history)
    assert (answered, lines) == ("Ctrl-C", ["Answer: line one line two: aXbc", ""])


def test_quit_and_ctrl_c_end_the_terminal_loop(tmp_path):
    assert terminal_repl([f"quit(){ENTER}"], tmp_path / "h") == (0, [""])
    assert terminal_repl([f"half typed{CTRL_C}"], tmp_path / "h") == ("Ctrl-C", [""])


def test_answers_are_folded_onto_one_line():
    assert one_line("carbon\ndioxide\r\n and  water\u2028too ") == "carbon dioxide and  water too"


def test_folding_keeps_runs_of_spaces_without_breaks():
    # a long run of spaces that ends in no line break: the one-pattern fold backtracked over it (quadratic)
    spaces = " " * 20_000
    assert one_line(f"a{spaces}b\n{spaces}c{spaces}") == f"a{spaces}b c"
    assert one_line(" \n\n a \r\n\u2029 \n") == "a" and one_line(spaces) == ""


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
@pytest.mark.parametrize("ending", ["C-d", "C-c"])
def test_a_real_terminal_edits_recalls_and_ends_on_a_fresh_line(tmp_path, ending):
    """The loop in a real terminal (tmux): keys as a user types them, the screen as a user sees it."""
    # the command line's question loop (its exits and status) with a stand-in for the model
    program = tmp_path / "loop.py"
    program.write_text("import sys\nfrom optqa import cli\nfrom optqa.interactive import repl\n\n"
                       "def loop(config):\n    repl(lambda q: 'line one\\nline two: ' + q)\n\n"
                       "cli.MODE_RUNNERS['interactive_inference'] = loop\n"
                       "sys.exit(cli.main(['--mode', 'interactive_inference']))\n")
    script = tmp_path / "run.sh"
    script.write_text(f"{shlex.quote(sys.executable)} {shlex.quote(str(program))}\necho STATUS $?\n"
                      "echo SHELL-PROMPT\nsleep 30\n")
    server = ["tmux", "-L", f"optqa-{os.getpid()}-{ending}"]
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    subprocess.run([*server, "new-session", "-d", "-s", "t", "-x", "100", "-y", "12", f"sh {script}"], env=env,
                   check=True)
    try:
        def screen() -> list[str]:
            return subprocess.run([*server, "capture-pane", "-p", "-t", "t"], capture_output=True, text=True,
                                  check=True).stdout.rstrip("\n").split("\n")

        def wait_until(shown) -> None:
            deadline = time.monotonic() + 30
            while not shown([line.rstrip() for line in screen() if line.strip()]):
                assert time.monotonic() < deadline, screen()
                time.sleep(0.1)

        def wait_for(text: str) -> None:
            wait_until(lambda lines: any(text in line for line in lines))

        def keys(*sequence: str) -> None:
            subprocess.run([*server, "send-keys", "-t", "t", *sequence], check=True)

        wait_for(PROMPT)
        keys("abc", "Left", "Left", "X", "Enter")
        wait_for("Answer: line one line two: aXbc")
        keys("Up", "Enter")
        # the second answer is printed and the loop waits at a fresh prompt: keys sent earlier may be lost
        wait_until(lambda lines: lines.count("Answer: line one line two: aXbc") == 2 and lines[-1] == PROMPT)
        keys(ending)
        wait_for("SHELL-PROMPT")
        lines = [line.rstrip() for line in screen() if line.strip()]
        ended = ["STATUS 0"] if ending == "C-d" else ["interrupted", "STATUS 130"]
        assert lines == [f"{PROMPT} aXbc", "Answer: line one line two: aXbc", f"{PROMPT} aXbc",
                         "Answer: line one line two: aXbc", PROMPT, *ended, "SHELL-PROMPT"]
        assert "+aXbc" in (tmp_path / ".optqa" / "question_history").read_text()
    finally:
        subprocess.run([*server, "kill-server"], capture_output=True)
