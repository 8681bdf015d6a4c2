"""Bad inputs to `--mode train` end in one `error:` line and exit status 2, before anything is written.

Most cases call ``optqa.cli.main`` in this process (the same code `python -m optqa` runs, without paying for
an interpreter start-up per case); one case runs the real command to pin down the process's exit status.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MEMORY_SET, run_cli, train_args, write_split

from optqa.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "data"
    for split in ("train", "dev", "test"):
        write_split(folder, MEMORY_SET, split)
    return folder


def fail(capsys, argv: list[str], out: Path) -> str:
    """Run the CLI, check it failed cleanly without writing outputs, and return the error message."""
    status = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2, err
    assert len(errors) == 1, err
    for folder in ("delta_ckpts", "raw_delta_ckpts", "runs"):
        assert not (out / folder).exists(), f"{folder} was written by a run that failed"
    return errors[0][len("error: "):]


def corrupt_line(path: Path, line_no: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[line_no - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_missing_data_file(capsys, tiny_opt, data, tmp_path):
    missing = tmp_path / "elsewhere" / "test.jsonl"
    message = fail(capsys, train_args(tiny_opt, data, tmp_path, "--test_file", str(missing)), tmp_path)
    assert message == f"data file not found: {missing}"


def test_partial_data_folder_is_reported_not_downloaded_over(capsys, tiny_opt, data, tmp_path, closed_port):
    (data / "test.jsonl").unlink()
    train_before = (data / "train.jsonl").read_bytes()
    # a closed local port: if a download is attempted it fails at once instead of fetching ARC-DA for real
    url = f"http://127.0.0.1:{closed_port}/ARC-DA.zip"
    message = fail(capsys, train_args(tiny_opt, data, tmp_path, "--data_url", url), tmp_path)
    assert (data / "train.jsonl").read_bytes() == train_before
    assert message == f"data file not found: {data / 'test.jsonl'}"


@pytest.mark.parametrize("split, line_no, text, words", [
    ("train", 3, '{"question_id": "x", "question": "What is ice?", "answers": ["ice"]',
     ["train.jsonl:3: not valid JSON"]),
    ("dev", 2, '["What is ice?", ["ice"]]', ["dev.jsonl:2: expected a JSON object, got list"]),
    ("train", 5, '{"question_id": "x", "question": "What is ice?"}',
     ["train.jsonl:5: missing field 'answers'", "needs gold answers"]),
    ("test", 1, '{"question_id": "x", "question": "What is ice?", "answers": []}',
     ["test.jsonl:1: field 'answers' must be a non-empty list"]),
    ("train", 8, '{"question_id": "x", "question": "What is ice?", "answers": ["ice", " "]}',
     ["train.jsonl:8: field 'answers' must hold only non-empty strings"]),
    ("dev", 4, '{"question_id": "x", "answers": ["ice"]}', ["dev.jsonl:4: missing field 'question'"]),
])
def test_bad_rows_name_file_and_line(capsys, tiny_opt, data, tmp_path, split, line_no, text, words):
    corrupt_line(data / f"{split}.jsonl", line_no, text)
    message = fail(capsys, train_args(tiny_opt, data, tmp_path), tmp_path)
    assert message.startswith(str(data / f"{split}.jsonl:{line_no}: "))
    for word in words:
        assert word in message


@pytest.mark.parametrize("plm", ["missing-folder/opt-125m", "facebook/opt-125m"])
def test_unavailable_hub_backbone_names_the_flag(capsys, data, tmp_path, plm):
    # the tests run with HF_HUB_OFFLINE=1 (conftest), like a machine without internet; a name of the form
    # owner/model may be either a hub name or a relative folder, and the message covers both
    message = fail(capsys, train_args(Path(plm), data, tmp_path), tmp_path)
    assert message == (f"backbone '{plm}' is not a local folder and not in the Hugging Face cache, and "
                       "HF_HUB_OFFLINE=1 is set: pass --plm_path /path/to/local/opt-125m (a copy saved on a "
                       "connected machine)")


def test_missing_backbone_folder_names_the_flag(capsys, data, tmp_path):
    folder = tmp_path / "models" / "opt-125m"
    message = fail(capsys, train_args(folder, data, tmp_path), tmp_path)
    assert message == f"backbone folder {folder} not found; pass --plm_path with the backbone's folder"


def test_folder_that_is_not_a_model(capsys, data, tmp_path):
    message = fail(capsys, train_args(data, data, tmp_path), tmp_path)
    assert message.startswith(f"could not load the backbone from {data} (--plm_path needs a Hugging Face model")


def test_missing_template_file(capsys, tiny_opt, data, tmp_path):
    message = fail(capsys, train_args(tiny_opt, data, tmp_path, "--template", "templates/no_such_template.txt"),
                   tmp_path)
    assert message.startswith("template file not found: templates/no_such_template.txt")


def test_an_inline_template_holding_an_undecodable_byte(capsys, tiny_opt, data, tmp_path):
    # `--template $'Q: \xff{"placeholder":"text_a"} {"mask"}'`: Python hands argv's undecodable byte over as a lone
    # surrogate, which the tokenizer refused with a TypeError
    message = fail(capsys, train_args(tiny_opt, data, tmp_path, "--template",
                                      'Q: \udcff{"placeholder":"text_a"} {"mask"}'), tmp_path)
    assert message == ('Q: \\udcff{"placeholder":"text_a"} {"mask"}: character 3 is not text (\'\\udcff\', a lone '
                       "surrogate); write the template in UTF-8")


def test_bad_inline_template(capsys, tiny_opt, data, tmp_path):
    message = fail(capsys, train_args(tiny_opt, data, tmp_path, "--template", '{"placeholder":"text_a"} A:'),
                   tmp_path)
    assert 'needs a {"mask"}' in message


def test_the_command_exits_2_with_one_error_line(tiny_opt, data, tmp_path):
    corrupt_line(data / "dev.jsonl", 6, json.dumps({"question_id": "q", "question": "Which is red?"})[:-1])
    result = run_cli(*train_args(tiny_opt, data, tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {data / 'dev.jsonl'}:6: not valid JSON")
    assert [line for line in result.stderr.splitlines() if "Traceback" in line] == []
    assert not (tmp_path / "delta_ckpts").exists() and not (tmp_path / "raw_delta_ckpts").exists()
