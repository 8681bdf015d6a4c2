"""ARC-DA download against a throwaway HTTP server on the loopback interface."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import threading
import zipfile
from pathlib import Path

import pytest

from optqa.download import download_arc_da, ensure_data
from optqa.errors import OptqaError


def _jsonl(split: str, n: int) -> bytes:
    rows = [
        {
            "question_id": f"ARCDA_{split}_{i}",
            "question": f"Which gas do plants take in? ({split} {i})",
            "answers": ["carbon dioxide", "CO2"],
            "tag": "EASY-TRAIN",
        }
        for i in range(n)
    ]
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


CONTENTS = {"train.jsonl": _jsonl("train", 5), "dev.jsonl": _jsonl("dev", 3), "test.jsonl": _jsonl("test", 4)}
PINNED = {name: (data.count(b"\n"), hashlib.sha256(data).hexdigest()) for name, data in CONTENTS.items()}


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


GOOD_ZIP = _zip({f"ARC-DA-v1.1/{n}": d for n, d in CONTENTS.items()} | {"ARC-DA-v1.1/README.md": b"hi"})


class Server:
    """Serves ``routes[path] = (status, body, declared_length)``; counts hits per path."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, int | None]] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                status, body, declared = server.routes.get(self.path, (404, b"", None))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) if declared is None else declared))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, body: bytes, status: int = 200, declared: int | None = None) -> str:
        self.routes[path] = (status, body, declared)
        return self.url(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    # A proxy set in the environment must not intercept loopback requests.
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    s = Server()
    yield s
    s.close()


def _get(url, data_path, **kw):
    return download_arc_da(data_path, url=url, pinned=PINNED, timeout=5, **kw)


def _only_data_path_left(tmp_path: Path, data_path: Path) -> bool:
    """No staging folder or stray file next to data_path."""
    return [p.name for p in tmp_path.iterdir()] == ([data_path.name] if data_path.exists() else [])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_good_download_installs_files(server, tmp_path):
    data = tmp_path / "arc_da"
    assert _get(server.serve("/a.zip", GOOD_ZIP), data) == data
    assert _snapshot(data) == CONTENTS
    assert _only_data_path_left(tmp_path, data)


def test_second_call_does_not_download(server, tmp_path):
    data = tmp_path / "arc_da"
    url = server.serve("/a.zip", GOOD_ZIP)
    _get(url, data)
    _get(url, data)
    ensure_data(data, url=url)
    assert server.hits == {"/a.zip": 1}


def test_checksum_mismatch_refused(server, tmp_path):
    data = tmp_path / "arc_da"
    altered = dict(CONTENTS, **{"dev.jsonl": CONTENTS["dev.jsonl"] + b'{"x": 1}\n'})
    url = server.serve("/a.zip", _zip(altered))
    with pytest.raises(OptqaError) as err:
        _get(url, data)
    msg = str(err.value)
    assert "dev.jsonl" in msg and "--allow_checksum_mismatch" in msg and "train.jsonl" not in msg
    assert PINNED["dev.jsonl"][1] in msg and hashlib.sha256(altered["dev.jsonl"]).hexdigest() in msg
    assert "\n" not in msg
    assert not data.exists() and _only_data_path_left(tmp_path, data)


def test_checksum_mismatch_allowed(server, tmp_path, caplog):
    data = tmp_path / "arc_da"
    altered = dict(CONTENTS, **{"dev.jsonl": b'{"x": 1}\n'})
    with caplog.at_level(logging.WARNING, logger="optqa.download"):
        _get(server.serve("/a.zip", _zip(altered)), data, allow_checksum_mismatch=True)
    assert _snapshot(data) == altered
    assert any("dev.jsonl" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_corrupted_zip_refused(server, tmp_path):
    data = tmp_path / "arc_da"
    broken = bytearray(GOOD_ZIP)
    for i in range(40, len(broken) // 2):
        broken[i] ^= 0xFF
    with pytest.raises(OptqaError, match="not a valid zip"):
        _get(server.serve("/a.zip", bytes(broken)), data)
    assert not data.exists() and _only_data_path_left(tmp_path, data)


def test_truncated_transfer_refused(server, tmp_path):
    data = tmp_path / "arc_da"
    url = server.serve("/a.zip", GOOD_ZIP[: len(GOOD_ZIP) // 2], declared=len(GOOD_ZIP))
    with pytest.raises(OptqaError, match="truncated"):
        _get(url, data)
    assert not data.exists() and _only_data_path_left(tmp_path, data)


def test_server_error_is_one_line(server, tmp_path):
    data = tmp_path / "arc_da"
    with pytest.raises(OptqaError) as err:
        _get(server.serve("/a.zip", b"oops", status=500), data)
    msg = str(err.value)
    assert "HTTP 500" in msg and "\n" not in msg
    assert not data.exists() and _only_data_path_left(tmp_path, data)


def test_connection_refused_says_place_by_hand(tmp_path, closed_port):
    data = tmp_path / "arc_da"
    with pytest.raises(OptqaError) as err:
        _get(f"http://127.0.0.1:{closed_port}/a.zip", data)
    msg = str(err.value)
    assert "by hand" in msg and str(data) in msg and "--data_path" in msg and "\n" not in msg
    assert not data.exists() and _only_data_path_left(tmp_path, data)


def test_path_traversal_refused(server, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    data = root / "arc_da"
    evil = _zip(CONTENTS | {"../evil.jsonl": b"pwned\n", "../../evil.jsonl": b"pwned\n"})
    with pytest.raises(OptqaError, match="evil.jsonl"):
        _get(server.serve("/a.zip", evil), data)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["root"]


@pytest.mark.parametrize("name", ["/abs/train.jsonl", "C:/x/train.jsonl", "a\\..\\..\\train.jsonl"])
def test_unsafe_member_names_refused(server, tmp_path, name):
    data = tmp_path / "arc_da"
    with pytest.raises(OptqaError, match="outside the archive"):
        _get(server.serve("/a.zip", _zip(CONTENTS | {name: b"x\n"})), data)
    assert not data.exists() and _only_data_path_left(tmp_path, data)


def test_oversized_member_refused(server, tmp_path, monkeypatch):
    import optqa.download

    # a limit just under train.jsonl's size stands in for a zip bomb without unpacking gigabytes
    monkeypatch.setattr(optqa.download, "MAX_MEMBER_BYTES", len(CONTENTS["train.jsonl"]) - 1)
    data = tmp_path / "arc_da"
    with pytest.raises(OptqaError, match=r"train\.jsonl would unpack to \d+ bytes"):
        _get(server.serve("/a.zip", GOOD_ZIP), data)
    assert not data.exists() and _only_data_path_left(tmp_path, data)


def test_existing_folder_untouched_after_failed_download(server, tmp_path):
    # A complete folder is used as is, even when the server is broken.
    full = tmp_path / "full"
    full.mkdir()
    for name, body in CONTENTS.items():
        (full / name).write_bytes(body)
    url = server.serve("/broken.zip", b"not a zip")
    assert ensure_data(full, url=url) == full and server.hits == {}

    # A partial folder (say, an earlier hand copy) survives a failed attempt byte for byte.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train.jsonl").write_bytes(b"old\n")
    (partial / "notes.txt").write_bytes(b"mine\n")
    before = _snapshot(partial)
    with pytest.raises(OptqaError):
        _get(url, partial)
    assert _snapshot(partial) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "partial"]

    # ...and a later good download fills it in without removing the user's own file.
    _get(server.serve("/a.zip", GOOD_ZIP), partial)
    assert _snapshot(partial) == CONTENTS | {"notes.txt": b"mine\n"}


# ---- from the command line (in this process: no model is involved) ---------------------------------------


def _download_cli(capsys, *args: str) -> tuple[int, str, str]:
    from optqa.cli import main

    capsys.readouterr()
    code = main(["--mode", "download", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_offline_fails_in_one_line(tmp_path, capsys, closed_port):
    data = tmp_path / "arc_da"
    code, out, err = _download_cli(capsys, "--data_path", str(data), "--data_url",
                                   f"http://127.0.0.1:{closed_port}/a.zip")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: could not download ARC-DA") and f"in {data} by hand" in err
    assert not data.exists()


def test_cli_checksum_override_flag(server, tmp_path, capsys):
    # the test zip is not the real release, so the code's pinned values refuse it until the flag is given
    data = tmp_path / "arc_da"
    url = server.serve("/a.zip", GOOD_ZIP)
    code, out, err = _download_cli(capsys, "--data_path", str(data), "--data_url", url)
    assert code == 2 and "ARC-DA checksum mismatch" in err and "--allow_checksum_mismatch" in err
    assert not data.exists()
    code, out, err = _download_cli(capsys, "--data_path", str(data), "--data_url", url, "--allow_checksum_mismatch")
    assert code == 0 and _snapshot(data) == CONTENTS and out.startswith(f"ARC-DA v1.1 in {data}")
    code, out, err = _download_cli(capsys, "--data_path", str(data), "--data_url", url)
    assert code == 0 and out == f"ARC-DA already in {data}\n" and server.hits == {"/a.zip": 2}


def test_training_fetches_missing_data_unless_files_are_named(server, tmp_path):
    from optqa.config import RunConfig
    from optqa.run.training import ensure_training_data

    url = server.serve("/a.zip", GOOD_ZIP)
    own = tmp_path / "own.jsonl"
    own.write_bytes(CONTENTS["train.jsonl"])
    ensure_training_data(RunConfig(data_path=str(tmp_path / "unused"), train_file=str(own), dev_file=str(own),
                                   test_file=str(own), data_url=url))
    assert server.hits == {} and not (tmp_path / "unused").exists()
    data = tmp_path / "arc_da"
    ensure_training_data(RunConfig(data_path=str(data), data_url=url, allow_checksum_mismatch=True))
    assert _snapshot(data) == CONTENTS and server.hits == {"/a.zip": 1}
