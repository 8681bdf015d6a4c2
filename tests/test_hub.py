"""Hugging Face Hub sharing: the push folder (dry run), pulls from a cache laid out as huggingface_hub lays it
out (offline), refusals in one line, plain PEFT adapters, and the versions a checkpoint records."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MEMORY_SET, REPO, run_cli, train_args

from optqa.checkpoints.format import MANIFEST_NAME, WEIGHTS_NAME, sha256_file
from optqa.errors import OptqaError

REPO_ID = "alice/tiny-lora"
TEMPLATE = (REPO / "templates" / "answer_template.txt").read_text(encoding="utf-8")
METRICS = {"dev": {"f1": 41.2, "em": 30.18, "count": 8}, "test": {"f1": 39.85, "em": 29.06, "count": 8}}
QUESTIONS = [q for q, _ in MEMORY_SET[:3]]
COMMIT_MAIN = "1" * 40
COMMIT_OLD = "a" * 40
# nothing in these tests may reach a network
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def _random_lora(tiny_opt: Path, out: Path, seed: int) -> Path:
    """A LoRA checkpoint with large random weights (answers long and question-dependent), saved as training does."""
    from optqa.build import build_model
    from optqa.checkpoints.format import build_manifest, save_checkpoint
    from optqa.config import RunConfig

    config = RunConfig(plm_path=str(tiny_opt), delta_type="lora", max_new_tokens=8,
                       modified_modules=["self_attn.q_proj", "self_attn.v_proj"])
    model, backbone = build_model(config)
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in model.delta_state_dict().items()}
    manifest = build_manifest(delta_config=model.delta.config.to_dict(), template_text=TEMPLATE, backbone=backbone,
                              hyperparameters=config.to_dict(), metrics=METRICS,
                              trainable_parameters=model.num_trainable_parameters())
    return save_checkpoint(out, state, manifest)


@pytest.fixture(scope="module")
def ckpts(tiny_opt, tmp_path_factory) -> tuple[Path, Path]:
    """Two different LoRA deltas: the current one (main) and an older revision."""
    root = tmp_path_factory.mktemp("hub-ckpts")
    return _random_lora(tiny_opt, root / "new", seed=0), _random_lora(tiny_opt, root / "old", seed=1)


@pytest.fixture(scope="module")
def dry_run(ckpts, tmp_path_factory) -> Path:
    """The folder ``--mode push --dry_run`` writes for the current delta."""
    import contextlib
    import io

    from optqa.cli import main

    target = tmp_path_factory.mktemp("dry") / "upload"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # in this process: the push test runs the same command as a user would
        code = main(["--mode", "push", "--delta_save_path", str(ckpts[0]), "--hub_repo", REPO_ID, "--dry_run",
                     "--export_path", str(target), "--base_model", "facebook/opt-125m"])
    assert code == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == f"dry run: nothing uploaded; the folder that would go to {REPO_ID} is {target}:"
    assert lines[1:] == [f"  {p.name}  {p.stat().st_size:,} bytes  sha256 {sha256_file(p)[:16]}"
                         for p in sorted(target.iterdir())]
    return target


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lay_out_cache(cache: Path, repo_id: str, commit: str, folder: Path, refs: tuple[str, ...] = ()) -> Path:
    """Put ``folder``'s files into ``cache`` the way huggingface_hub's snapshot_download leaves them
    (file_download.py): ``models--OWNER--NAME/blobs/<etag>`` (the sha256 for LFS files, which the Hub's
    .gitattributes makes of *.safetensors, the git blob sha1 for the rest), ``snapshots/<commit>/<file>`` as
    relative symlinks to the blobs, ``refs/<ref>`` holding the commit, and the tree listing
    ``trees/<commit>.json`` (_tree_cache.py) by which it checks that a cached snapshot is complete."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    tree = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        lfs = path.suffix == ".safetensors"
        etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        (storage / "blobs" / etag).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", etag), snapshot / path.name)
        tree[path.name] = {"size": len(data), "blob_id": _git_blob_sha1(data),
                           **({"lfs_sha256": etag, "lfs_size": len(data)} if lfs else {})}
    (storage / "trees").mkdir(exist_ok=True)
    (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as _cache_commit_hash_for_specific_revision
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(ckpts, dry_run, tmp_path_factory) -> Path:
    """A cache holding two commits of alice/tiny-lora: main (the pushed folder) and an older one tagged v1."""
    cache = tmp_path_factory.mktemp("hf-cache")
    lay_out_cache(cache, REPO_ID, COMMIT_MAIN, dry_run, refs=("main",))
    lay_out_cache(cache, REPO_ID, COMMIT_OLD, ckpts[1], refs=("v1",))
    return cache


def _offline(cache: Path) -> dict:
    return {**OFFLINE, "HF_HUB_CACHE": str(cache)}


def _one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    # log lines (e.g. which commit was pulled) may come first; the error itself is one line, no traceback
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


# ---------------------------------------------------------------------------------------------- push

def test_dry_run_writes_the_exact_upload(dry_run, ckpts):
    ckpt = ckpts[0]
    assert sorted(p.name for p in dry_run.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", WEIGHTS_NAME, MANIFEST_NAME,
        "optqa_template.txt"]
    # the checkpoint byte for byte, and every listed file's hash as the manifest says
    for name in (MANIFEST_NAME, WEIGHTS_NAME):
        assert (dry_run / name).read_bytes() == (ckpt / name).read_bytes()
    manifest = json.loads((dry_run / MANIFEST_NAME).read_bytes())
    assert {n: sha256_file(dry_run / n) for n in manifest["files"]} == {
        n: e["sha256"] for n, e in manifest["files"].items()}
    assert manifest["versions"]["optqa"] == "0.1.0" and manifest["versions"]["torch"] == torch.__version__

    card = (dry_run / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "facebook/opt-125m"
    assert front["library_name"] == "peft"
    assert {"optqa", "lora", "peft"} <= set(front["tags"])
    assert front["datasets"] == ["ARC-DA-v1.1"]
    scores = {(r["dataset"]["split"], m["type"]): m["value"]
              for r in front["model-index"][0]["results"] for m in r["metrics"]}
    assert scores == {("dev", "f1"): 41.2, ("dev", "exact_match"): 30.18, ("test", "f1"): 39.85,
                      ("test", "exact_match"): 29.06}
    assert TEMPLATE.strip() in card
    assert "\nWhich gas do plants take in from the air? Answer:\n" in card  # the exact prompt string
    assert f'PeftModel.from_pretrained(base, "{REPO_ID}")' in card
    assert f"--delta_save_path hf://{REPO_ID} --plm_path facebook/opt-125m" in card
    assert f"| peft | {__import__('peft').__version__} |" in card

    adapter = json.loads((dry_run / "adapter_config.json").read_bytes())
    assert adapter["peft_type"] == "LORA" and adapter["base_model_name_or_path"] == "facebook/opt-125m"
    assert (dry_run / "optqa_template.txt").read_text(encoding="utf-8") == TEMPLATE


def test_pushed_peft_files_alone_load_as_the_checkpoint(dry_run, ckpts, tiny_opt, tmp_path):
    """The upload's PEFT part on its own is a plain PEFT adapter: optqa finds the template beside it and, after
    the name check (the card named facebook/opt-125m, the test backbone is a local folder), answers as the
    checkpoint does."""
    import shutil

    from optqa.build import load_trained

    folder = tmp_path / "peft-only"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "optqa_template.txt"):
        shutil.copyfile(dry_run / name, folder / name)
    with pytest.raises(OptqaError, match="trained on backbone 'facebook/opt-125m', not"):
        load_trained(folder, plm_path=str(tiny_opt))
    model, manifest, _ = load_trained(folder, plm_path=str(tiny_opt), ignore_backbone_mismatch=True,
                                      overrides={"max_new_tokens": 8})
    assert manifest["template"] == TEMPLATE
    reference, _, _ = load_trained(ckpts[0])
    assert [model.answer([q])[0] for q in QUESTIONS] == [reference.answer([q])[0] for q in QUESTIONS]


def test_card_of_a_delta_peft_cannot_hold(tiny_opt, tmp_path):
    """An adapter delta on a backbone from a local folder: no base_model (a folder names nothing on the Hub),
    library optqa, and the card says why there is no PEFT adapter."""
    from optqa.build import build_model
    from optqa.checkpoints.format import build_manifest, save_checkpoint
    from optqa.config import RunConfig
    from optqa.sharing.push import build_upload_folder

    config = RunConfig(mode="push", plm_path=str(tiny_opt), delta_type="adapter",
                       delta_save_path=str(tmp_path / "adapter"), hub_repo="alice/tiny-adapter")
    model, backbone = build_model(config)
    save_checkpoint(tmp_path / "adapter", model.delta_state_dict(), build_manifest(
        delta_config=model.delta.config.to_dict(), template_text=TEMPLATE, backbone=backbone,
        hyperparameters=config.to_dict(), metrics={}, trainable_parameters=model.num_trainable_parameters()))
    folder = build_upload_folder(config, tmp_path / "upload")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", WEIGHTS_NAME, MANIFEST_NAME]
    card = (folder / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in front and "model-index" not in front
    assert front["library_name"] == "optqa" and "adapter" in front["tags"]
    assert "PEFT cannot load this delta: PEFT has no adapter method (optqa implements it itself)." in card
    assert "No scores were recorded with this delta." in card


def test_push_without_token_or_offline_fails_in_one_line(ckpts, tmp_path):
    base = ["--mode", "push", "--delta_save_path", str(ckpts[0]), "--hub_repo", REPO_ID]
    home = {"HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": ""}  # no login stored there
    line = _one_line_error(run_cli(*base, env={**home, "HF_HUB_OFFLINE": "0"}))
    assert line == ("error: no Hugging Face token found: run `hf auth login` (`huggingface-cli login` with older "
                    "huggingface_hub) or set HF_TOKEN (a token with write access)")
    line = _one_line_error(run_cli(*base, env={**home, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"}))
    assert line.startswith("error: HF_HUB_OFFLINE=1 is set: a push needs the network")
    line = _one_line_error(run_cli(*base[:-1], "not a repo", env=home))
    assert line.startswith("error: --hub_repo not a repo: a Hub repository is named OWNER/NAME")
    line = _one_line_error(run_cli(*base, "--dry_run", env=home))
    assert line == "error: --dry_run writes the folder it would upload to --export_path; pass --export_path DIR"


class FakeHub:
    """A local HTTP server answering the Hub API calls huggingface_hub makes for ``create_repo`` +
    ``upload_folder`` of small files (whoami, repo creation, YAML validation of the card, pre-upload, commit),
    recording what arrives. Every file is declared "regular" (inline in the commit), so the LFS/xet transfer of
    large files, which the real Hub asks for, is not exercised here."""

    def __init__(self):
        import base64
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.commits: list[tuple[dict, dict[str, bytes]]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                if self.path == "/api/whoami-v2":
                    if self.headers.get("Authorization") != "Bearer hf_test":
                        return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return self._reply(200, {"name": "alice", "type": "user"})
                if self.path.split("?")[0] == f"/api/models/{REPO_ID}/revision/main":
                    # huggingface_hub < 1.0 asks the repository's info (is xet storage on?) before uploading
                    return self._reply(200, {"id": REPO_ID, "sha": COMMIT_MAIN, "xetEnabled": False, "siblings": []})
                self._reply(404, {"error": "not found"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(("POST", self.path))
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    hub.created.append(request)
                    return self._reply(200, {"url": f"{hub.endpoint}/{request['organization']}/{request['name']}"})
                if self.path == "/api/validate-yaml":
                    text = json.loads(body)["content"]
                    front = yaml.safe_load(text.split("---\n")[1]) if text.startswith("---\n") else None
                    if not isinstance(front, dict):
                        return self._reply(400, {"errors": [{"message": "no YAML metadata"}]})
                    return self._reply(200, {"warnings": []})
                if self.path == f"/api/models/{REPO_ID}/preupload/main":
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                       for f in json.loads(body)["files"]]})
                if self.path == f"/api/models/{REPO_ID}/commit/main":
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                             for line in lines if line["key"] == "file"}
                    hub.commits.append((lines[0]["value"], files))
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{REPO_ID}/commit/{COMMIT_MAIN}",
                                             "commitOid": COMMIT_MAIN})
                self._reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_push_uploads_the_dry_run_folder_through_huggingface_hub(ckpts, dry_run, tmp_path):
    hub = FakeHub()
    try:
        refused = run_cli("--mode", "push", "--delta_save_path", str(ckpts[0]), "--hub_repo", REPO_ID,
                          env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_wrong"})
        result = run_cli("--mode", "push", "--delta_save_path", str(ckpts[0]), "--hub_repo", REPO_ID, "--private",
                         "--base_model", "facebook/opt-125m", "--commit_message", "first delta",
                         env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test",
                              "HF_HOME": str(tmp_path / "home")})
    finally:
        hub.close()
    line = _one_line_error(refused)
    assert line.startswith(f"error: the Hub at {hub.endpoint} did not accept the token (Invalid user token.")
    assert result.returncode == 0, result.stderr[-2000:]
    # huggingface_hub >= 1.0 says "visibility": "private", older releases "private": true
    created = [{k: v for k, v in r.items() if k not in ("private", "visibility")}
               | {"private": r.get("private", r.get("visibility") == "private")} for r in hub.created]
    assert created == [{"name": "tiny-lora", "organization": "alice", "private": True, "type": "model"}]
    [(header, files)] = hub.commits
    assert header["summary"] == "first delta"
    # exactly the folder the dry run wrote, byte for byte
    assert files == {p.name: p.read_bytes() for p in dry_run.iterdir()}
    lines = result.stdout.splitlines()
    assert lines[0] == (f"pushed 6 files to {REPO_ID} as alice (commit {COMMIT_MAIN}): "
                        f"{hub.endpoint}/{REPO_ID}/commit/{COMMIT_MAIN}")
    assert lines[-1] == f"pull it with --delta_save_path hf://{REPO_ID}@{COMMIT_MAIN}"


def test_push_and_pull_without_network_fail_fast(ckpts, tmp_path, closed_port):
    endpoint = f"http://127.0.0.1:{closed_port}"
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    start = time.monotonic()
    line = _one_line_error(run_cli("--mode", "push", "--delta_save_path", str(ckpts[0]), "--hub_repo", REPO_ID,
                                   env={**env, "HF_TOKEN": "hf_x"}))
    # the HTTP client's own class: httpx's ConnectError (huggingface_hub >= 1.0), requests' ConnectionError before
    assert re.match(rf"error: could not reach the Hub at {re.escape(endpoint)} \((ConnectError|ConnectionError): ", line)
    line = _one_line_error(run_cli("--mode", "inspect", "--delta_save_path", f"hf://{REPO_ID}@v2",
                                   env={**env, "HF_TOKEN": ""}))
    assert line == (f"error: hf://{REPO_ID}@v2 is not in the Hugging Face cache ({tmp_path / 'empty-cache'}) and "
                    f"the Hub at {endpoint} cannot be reached (127.0.0.1:{closed_port}: connection refused): pull it "
                    f"once with network access (python -m optqa "
                    f"--mode inspect --delta_save_path hf://{REPO_ID}@v2), or copy that cache folder from a machine "
                    "that has it")
    assert time.monotonic() - start < 20  # two interpreter start-ups; no retries with back-off


def test_a_hub_backbone_without_network_fails_at_once_or_loads_from_the_cache(tiny_opt, memory_data, tmp_path,
                                                                                closed_port):
    endpoint = f"http://127.0.0.1:{closed_port}"
    cache = tmp_path / "hub-cache"
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_CACHE": str(cache)}
    result = run_cli(*train_args(Path("facebook/opt-125m"), memory_data, tmp_path / "out"), env=env)
    # one probe instead of huggingface_hub's five retries per file (~50 s of "Retrying in 8s" lines before)
    assert "Retrying" not in result.stderr
    assert _one_line_error(result) == (
        f"error: backbone 'facebook/opt-125m' is not a local folder and not in the Hugging Face cache, and the Hub at "
        f"{endpoint} cannot be reached (127.0.0.1:{closed_port}: connection refused): pass --plm_path "
        "/path/to/local/opt-125m (a copy saved on a connected machine)")

    # the same name cached as huggingface_hub caches a download: it loads from there, without asking the Hub
    snapshot = cache / "models--tiny--opt" / "snapshots" / COMMIT_MAIN
    snapshot.mkdir(parents=True)
    for file in tiny_opt.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (cache / "models--tiny--opt" / "refs").mkdir()
    (cache / "models--tiny--opt" / "refs" / "main").write_text(COMMIT_MAIN)
    result = run_cli(*train_args(Path("tiny/opt"), memory_data, tmp_path / "out", "--max_steps", "1",
                                 "--train_epochs", "1", "--max_new_tokens", "2"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"the Hub at {endpoint} cannot be reached (127.0.0.1:{closed_port}: connection refused): loading "
            f"tiny/opt from the Hugging Face cache ({snapshot})") in result.stderr
    assert "Retrying" not in result.stderr


# ---------------------------------------------------------------------------------------------- pull

def test_pull_main_and_revisions_offline(hub_cache, ckpts):
    expected = {f"hf://{REPO_ID}": (COMMIT_MAIN, ckpts[0]), f"hf://{REPO_ID}@v1": (COMMIT_OLD, ckpts[1]),
                f"hf://{REPO_ID}@{COMMIT_OLD}": (COMMIT_OLD, ckpts[1])}
    for name, (commit, ckpt) in expected.items():
        result = run_cli("--mode", "inspect", "--delta_save_path", name, env=_offline(hub_cache))
        assert result.returncode == 0, result.stderr[-2000:]
        out = result.stdout
        snapshot = hub_cache / "models--alice--tiny-lora" / "snapshots" / commit
        assert f"pulled       {name} -> commit {commit} ({snapshot})\n" in out
        weights = json.loads((ckpt / MANIFEST_NAME).read_bytes())["files"][WEIGHTS_NAME]["sha256"]
        assert f"integrity    OK, SHA-256 verified: {WEIGHTS_NAME} {weights[:12]}\n" in out
        assert "[Hugging Face Hub snapshot]" in out and "saved with   optqa 0.1.0" in out


def test_pulled_delta_answers_as_the_local_one(hub_cache, ckpts, memory_data, tmp_path, monkeypatch):
    """Through the CLI's question loop, and in-process through load_trained (which records the commit) and
    --mode evaluate (whose metrics name the commit, not the movable tag)."""
    from huggingface_hub import constants

    from optqa.build import load_trained

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    local, _, _ = load_trained(ckpts[1])
    pulled, manifest, _ = load_trained(f"hf://{REPO_ID}@v1")
    assert manifest["pulled_from"] == {"repo_id": REPO_ID, "revision": "v1", "commit": COMMIT_OLD}
    expected = [local.answer([q])[0] for q in QUESTIONS]
    assert [pulled.answer([q])[0] for q in QUESTIONS] == expected
    assert len(set(expected)) == len(QUESTIONS) and all(expected)  # real, question-dependent answers

    from optqa.cli import main

    assert main(["--mode", "evaluate", "--delta_save_path", f"hf://{REPO_ID}@v1", "--data_path", str(memory_data),
                 "--output_dir", str(tmp_path), "--split", "dev"]) == 0
    [metrics] = tmp_path.glob("evaluate-*/metrics.jsonl")
    assert json.loads(metrics.read_text())["source"] == f"hf://{REPO_ID}@{COMMIT_OLD}"

    result = run_cli("--mode", "interactive_inference", "--delta_save_path", f"hf://{REPO_ID}@v1",
                     "--precision", "fp32", "--no-merge_lora", stdin="\n".join(QUESTIONS) + "\n",
                     env=_offline(hub_cache))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.split("Answer: ", 1)[1] for line in result.stdout.splitlines() if "Answer: " in line] == expected
    assert f"pulled hf://{REPO_ID}@v1: commit {COMMIT_OLD}" in result.stderr


def test_export_of_a_hub_name_writes_to_the_working_folder(hub_cache, ckpts, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from optqa.checkpoints.bundle import unpack_bundle
    from optqa.sharing.export import export_checkpoint

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    [line] = export_checkpoint(f"hf://{REPO_ID}", peft=False)
    assert line.startswith("bundle written: tiny-lora.optqa (")
    unpacked = unpack_bundle(tmp_path / "tiny-lora.optqa", tmp_path / "unpacked")
    for name in (MANIFEST_NAME, WEIGHTS_NAME):
        assert (unpacked / name).read_bytes() == (ckpts[0] / name).read_bytes()


def test_tampered_cache_and_unknown_revisions_refused(hub_cache, tmp_path, monkeypatch):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(hub_cache, cache, symlinks=True)
    storage = cache / "models--alice--tiny-lora"
    blob = (storage / "snapshots" / COMMIT_MAIN / WEIGHTS_NAME).resolve()
    assert blob.parent == storage / "blobs"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    line = _one_line_error(run_cli("--mode", "inspect", "--delta_save_path", f"hf://{REPO_ID}",
                                   env=_offline(cache)))
    assert line.startswith(f"error: integrity check failed: {storage / 'snapshots' / COMMIT_MAIN / WEIGHTS_NAME} "
                           "has SHA-256 ")
    assert line.endswith("(the file was modified)")

    from huggingface_hub import constants

    from optqa.checkpoints.hub import parse_hub_path, pull

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name in (f"hf://{REPO_ID}@v9", "hf://bob/nothing-here"):
        with pytest.raises(OptqaError) as caught:
            pull(parse_hub_path(name))
        assert str(caught.value).startswith(f"{name} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 "
                                            "is set: pull it once with network access")
    for bad in ("hf://alice", "hf://alice/x@", "hf://a/b/c"):
        with pytest.raises(OptqaError):
            parse_hub_path(bad)
    assert parse_hub_path("runs/delta_ckpts") is None and parse_hub_path(Path("hf:/a/b")) is None


def test_an_edited_manifest_in_the_cache_is_refused(hub_cache, tmp_path, monkeypatch):
    """huggingface_hub does not re-check cached blobs: a manifest blob edited after download (the issue's
    lora_alpha 16 -> 17, same size, valid JSON) is refused by the manifest's own SHA-256, through the CLI and
    the library; the weights blob is checked against the manifest (the test above)."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(hub_cache, cache, symlinks=True)
    snapshot = cache / "models--alice--tiny-lora" / "snapshots" / COMMIT_MAIN
    blob = (snapshot / MANIFEST_NAME).resolve()
    assert blob.parent.name == "blobs"
    data = blob.read_bytes()
    assert data.count(b'"lora_alpha": 16') == 2  # the delta config and the hyperparameters
    blob.write_bytes(data.replace(b'"lora_alpha": 16', b'"lora_alpha": 17', 1))
    expected = (f"error: integrity check failed: {snapshot / MANIFEST_NAME} has SHA-256 ")
    for mode in ("inspect", "interactive_inference"):
        line = _one_line_error(run_cli("--mode", mode, "--delta_save_path", f"hf://{REPO_ID}", stdin=QUESTIONS[0],
                                       env=_offline(cache)))
        assert line.startswith(expected) and line.endswith("(the manifest was modified)"), line

    from huggingface_hub import constants

    from optqa.build import load_trained

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OptqaError, match=r"\(the manifest was modified\)$"):
        load_trained(f"hf://{REPO_ID}")
    load_trained(f"hf://{REPO_ID}@v1")  # the other commit's blobs are untouched


# ---------------------------------------------------------------------------------------------- PEFT and versions

def test_plain_peft_lora_loads_and_answers_as_peft(tiny_opt, tmp_path):
    """A LoRA made and saved by PEFT itself, loaded by optqa with --template: same logits and answers as
    PeftModel.from_pretrained on the same backbone."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optqa.build import load_trained
    from optqa.sharing.card import prompt_preview

    base = AutoModelForCausalLM.from_pretrained(tiny_opt)
    made = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                     target_modules=["q_proj", "v_proj", "fc1"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in made.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    folder = tmp_path / "peft-lora"
    made.save_pretrained(folder)

    model, manifest, _ = load_trained(folder, template=TEMPLATE, overrides={"max_new_tokens": 8})
    assert manifest["delta"] == {"delta_type": "lora", "modified_modules": ["fc1", "q_proj", "v_proj"], "lora_r": 4,
                                 "lora_alpha": 8, "lora_dropout": 0.0}
    assert manifest["imported_from"]["format"] == "PEFT" and manifest["imported_from"]["path"] == str(folder)
    assert manifest["imported_from"]["adapter_model.safetensors_sha256"] == sha256_file(
        folder / "adapter_model.safetensors")
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_opt), folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_opt)
    for question in QUESTIONS:
        ids = tokenizer(prompt_preview(TEMPLATE, question), return_tensors="pt")
        with torch.no_grad():
            ours = model.delta.model(**ids).logits
            theirs = reference(**ids).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        generated = reference.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert model.answer([question])[0] == tokenizer.decode(generated, skip_special_tokens=True).strip()

    # inspect describes it without a backbone; export converts it into an optqa bundle that says where it came from
    from optqa.checkpoints.inspect import inspect_checkpoint
    from optqa.sharing.export import export_checkpoint

    shown = "\n".join(inspect_checkpoint(folder))
    assert f"checkpoint  {folder} [plain PEFT adapter, no optqa manifest]" in shown
    assert ('delta       lora {"modified_modules": ["fc1", "q_proj", "v_proj"], "lora_r": 4, "lora_alpha": 8, '
            '"lora_dropout": 0.0}') in shown
    lines = export_checkpoint(folder, tmp_path / "converted.optqa", template=TEMPLATE)
    assert lines[0].startswith(f"bundle written: {tmp_path / 'converted.optqa'} (")
    converted, bundled, _ = load_trained(tmp_path / "converted.optqa", overrides={"max_new_tokens": 8})
    assert bundled["imported_from"]["path"] == str(folder) and bundled["template"] == TEMPLATE
    assert [converted.answer([q])[0] for q in QUESTIONS] == [model.answer([q])[0] for q in QUESTIONS]
    shown = inspect_checkpoint(tmp_path / "converted.optqa")
    assert f"  from PEFT LORA adapter {folder} (peft {peft.__version__}, base model {tiny_opt}); not trained by " \
        "optqa" in "\n".join(line for line in shown if line.startswith("imported "))

    with pytest.raises(OptqaError, match="records no prompt format: pass --template"):
        load_trained(folder)
    with pytest.raises(OptqaError, match="was trained on backbone .* not 'other/opt-350m'"):
        load_trained(folder, plm_path="other/opt-350m", template=TEMPLATE)


def test_versions_recorded_and_old_checkpoints_still_load(ckpts, tmp_path):
    from optqa.build import load_trained
    from optqa.checkpoints.bundle import read_bundle_comment, write_bundle
    from optqa.checkpoints.format import library_versions, read_checkpoint, save_checkpoint

    _, manifest, state = read_checkpoint(ckpts[0])
    assert manifest["versions"] == library_versions()
    bundle = write_bundle(ckpts[0], tmp_path / "delta.optqa")
    assert read_bundle_comment(bundle) == {"exported_with": library_versions()}
    old = save_checkpoint(tmp_path / "old", state, {k: v for k, v in manifest.items() if k not in ("files", "versions")})
    model, loaded, _ = load_trained(old)
    assert "versions" not in loaded and model.answer([QUESTIONS[0]])[0]


@pytest.mark.parametrize("method", ["prefix", "prompt_tuning"])
def test_plain_peft_prompt_learning_loads_as_peft(tiny_opt, tmp_path, method):
    """Prefix and prompt tuning saved by PEFT: optqa's delta config, and the same logits and greedy answers
    (optqa's own decoder for these two) as PEFT's loader and generate. The logits are the decisive check: they
    differ from the bare backbone's, while on this random backbone greedy answers only repeat the prompt's last
    token whatever the prompt."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optqa.build import load_trained
    from optqa.sharing.card import prompt_preview

    config, expected = {
        "prefix": (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                   {"delta_type": "prefix", "prefix_token_num": 3, "init_text": ""}),
        "prompt_tuning": (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                          {"delta_type": "soft_prompt", "soft_token_num": 3, "init_text": ""}),
    }[method]
    made = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_opt), config)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in made.named_parameters():
            if "prompt_encoder" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    made.save_pretrained(tmp_path / method)
    model, manifest, _ = load_trained(tmp_path / method, template=TEMPLATE, overrides={"max_new_tokens": 6})
    assert manifest["delta"] == expected
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_opt), tmp_path / method)
    tokenizer = AutoTokenizer.from_pretrained(tiny_opt)
    bare = AutoModelForCausalLM.from_pretrained(tiny_opt).eval()
    for question in QUESTIONS:
        ids = tokenizer(prompt_preview(TEMPLATE, question), return_tensors="pt")
        with torch.no_grad():
            ours = model.delta.model(**ids).logits
            torch.testing.assert_close(ours, reference.eval()(**ids).logits, rtol=0, atol=1e-5)
            assert (ours[0, -1] - bare(**ids).logits[0, -1]).abs().max() > 0.1  # the loaded prompt acts
        generated = reference.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert model.answer([question])[0] == tokenizer.decode(generated, skip_special_tokens=True).strip()
