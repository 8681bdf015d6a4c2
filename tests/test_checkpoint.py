"""Checkpoint trust: every refusal with its message (library and CLI), backbone checks and the override,
relocatable and read-only folders, the fingerprint's definition, and saves killed at every point."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, MEMORY_SET, REPO, run_cli, train_args

from optqa.checkpoints import format as ckpt
from optqa.errors import OptqaError

QUESTIONS = [q for q, _ in MEMORY_SET[:3]]
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def trained(tiny_opt, memory_data, tmp_path_factory) -> Path:
    """A checkpoint written by the real trainer (in-process: one short epoch)."""
    from optqa.cli import parse_args
    from optqa.config import RunConfig
    from optqa.run.training import train

    out = tmp_path_factory.mktemp("trained")
    config = RunConfig.of(parse_args(train_args(tiny_opt, memory_data, out, "--train_epochs", "1", "--lr", "3e-2",
                                      "--template", str(REPO / "templates" / "answer_template.txt"))))
    train(config)
    return out / "delta_ckpts"


def _with_tokenizer_of(tiny_opt: Path, folder: Path) -> Path:
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_opt / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def backbones(tiny_opt, tmp_path_factory) -> dict[str, Path]:
    """Other backbones with the SAME tokenizer: other seed (same shape), other shape, other architecture."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from optqa.tiny import build_opt

    root = tmp_path_factory.mktemp("backbones")
    vocab = json.loads((tiny_opt / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    other_seed = build_opt(root / "other-seed", seed=1, vocab_size=vocab)
    other_shape = build_opt(root / "other-shape", seed=0, vocab_size=vocab, hidden_size=32, word_embed_proj_dim=32,
                            ffn_dim=128)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=2,
                               eos_token_id=2, pad_token_id=1)).save_pretrained(root / "gpt2")
    return {name: _with_tokenizer_of(tiny_opt, folder)
            for name, folder in (("weights", other_seed), ("shape", other_shape), ("architecture", root / "gpt2"))}


# ------------------------------------------------------------------------------------------------ refusals

def _flip_byte(folder: Path) -> None:
    path = folder / ckpt.WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(folder: Path) -> None:
    path = folder / ckpt.WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-16])


def _cut_manifest(folder: Path) -> None:
    path = folder / ckpt.MANIFEST_NAME
    path.write_bytes(path.read_bytes()[:200])


def _edit_manifest(folder: Path, edit, reseal: bool = False) -> None:
    """Change the parsed manifest with ``edit``; ``reseal``: recompute its own hash as well, as someone who edits
    it on purpose would (then only the value checks stand between the edit and a load)."""
    path = folder / ckpt.MANIFEST_NAME
    manifest = json.loads(path.read_bytes())
    edit(manifest)
    path.write_bytes(ckpt.encode_manifest(manifest) if reseal else json.dumps(manifest, indent=2).encode())


def _drop_template(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m.pop("template"), reseal=True)


def _set(section: str, key: str, value):
    return lambda folder: _edit_manifest(folder, lambda m: m[section].__setitem__(key, value), reseal=True)


# name -> (damage done to a copy of the checkpoint, the message's pattern)
DAMAGE = {
    "flipped byte": (_flip_byte, r"integrity check failed: .*delta_model\.safetensors has SHA-256 .* was modified"),
    "truncated": (_truncate, r"integrity check failed: .*delta_model\.safetensors has \d+ bytes, the manifest says"),
    "missing weights": (lambda f: (f / ckpt.WEIGHTS_NAME).unlink(),
                        r"integrity check failed: .*delta_model\.safetensors is missing"),
    "missing manifest": (lambda f: (f / ckpt.MANIFEST_NAME).unlink(), r"optqa_manifest\.json is missing"),
    "damaged manifest": (_cut_manifest, r"optqa_manifest\.json: damaged manifest, not valid JSON"),
    "manifest without template": (_drop_template,
                                  r"optqa_manifest\.json: damaged manifest, field 'template' is missing"),
    # the examples: lora_alpha 16 -> 17 and "Answer:" -> "Answer;" used to load and change every answer
    "edited setting": (lambda f: _edit_manifest(f, lambda m: m["delta"].__setitem__("bottleneck_dim", 25)),
                       r"integrity check failed: .*optqa_manifest\.json has SHA-256 [0-9a-f]{16}\.\.\. \(of its "
                       r"content\), it records [0-9a-f]{16}\.\.\. \(the manifest was modified\)$"),
    "edited template": (lambda f: _edit_manifest(f, lambda m: m.__setitem__("template", m["template"].replace(
        "Answer:", "Answer;"))), r"optqa_manifest\.json has SHA-256 .* \(the manifest was modified\)$"),
    "manifest without its hash": (lambda f: _edit_manifest(f, lambda m: m.pop(ckpt.MANIFEST_HASH_KEY)),
                                  r"optqa_manifest\.json: damaged manifest, it lacks its manifest_sha256 \(every "
                                  r"format version 2 manifest carries one\)$"),
    "downgraded to version 1": (lambda f: _edit_manifest(f, lambda m: m.__setitem__("format_version", 1)),
                                r"optqa_manifest\.json has SHA-256 .* \(the manifest was modified\)$"),
    "unknown field": (lambda f: _edit_manifest(f, lambda m: m.__setitem__("tempIate", "x"), reseal=True),
                      r"optqa_manifest\.json: damaged manifest, unknown field 'tempIate'$"),
    "manifest nested 100k deep": (lambda f: (f / ckpt.MANIFEST_NAME).write_bytes(
        b'{"format": "optqa-delta", "metrics": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                                  r"optqa_manifest\.json: damaged manifest, not valid JSON \(nested too deeply\)$"),
    "manifest with a 5000-digit number": (lambda f: (f / ckpt.MANIFEST_NAME).write_bytes(
        b'{"format": "optqa-delta", "trainable_parameters": ' + b"9" * 5000 + b"}"),
                                          r"optqa_manifest\.json: damaged manifest, not valid JSON \(a number with "
                                          r"more digits than Python reads\)$"),
    "file entry without a real hash": (_set("files", ckpt.WEIGHTS_NAME, {"sha256": "x", "bytes": 1}),
                                       r"damaged manifest, the entry for 'delta_model\.safetensors' lacks its sha256 "
                                       r"\(64 hex digits\) or byte count$"),
    "version 3": (lambda f: _edit_manifest(f, lambda m: m.__setitem__("format_version", 3), reseal=True),
                  r"optqa_manifest\.json: format version 3 is not supported \(this optqa reads versions 1 and 2\)$"),
    "missing folder": (shutil.rmtree, r"no checkpoint at .*: the folder does not exist"),
}
# resealed, consistent edits, which only the value checks refuse: name -> (section, key, value, the message after
# "<folder>/optqa_manifest.json: ")
BAD_VALUES = {
    "unknown activation": ("delta", "non_linearity", "felu_new", r"invalid delta config: adapter: non_linearity "
                           r"must be one of transformers' activations \(ACT2FN: .*gelu_new.*\), got 'felu_new'"),
    "delta option of the wrong type": ("delta", "bottleneck_dim", "24", r"invalid delta config: adapter: "
                                       r"bottleneck_dim must be a whole number, got '24'"),
    "unknown delta option": ("delta", "lora_alpha", 16, r"invalid delta config: adapter does not take lora_alpha "
                             r"\(it takes modified_modules, bottleneck_dim, non_linearity\)"),
    "precision not a choice": ("hyperparameters", "precision", "`uto",
                               r"hyperparameters\.precision must be one of auto, fp32, bf16, fp16, got '`uto'"),
    "quantize not a choice": ("hyperparameters", "quantize", "int4",
                              r"hyperparameters\.quantize must be one of none, int8, auto, got 'int4'"),
    "answer length out of range": ("hyperparameters", "max_new_tokens", 0,
                                   r"hyperparameters\.max_new_tokens must be at least 1, got 0"),
    "answer length of the wrong type": ("hyperparameters", "max_new_tokens", 8.5,
                                        r"hyperparameters\.max_new_tokens must be a whole number, got 8\.5"),
    "prompt length of the wrong type": ("hyperparameters", "max_seq_l", True,
                                        r"hyperparameters\.max_seq_l must be a whole number, got True"),
}
DAMAGE.update({name: (_set(section, key, value), r"optqa_manifest\.json: " + message + "$")
               for name, (section, key, value, message) in BAD_VALUES.items()})
# name -> (backbone, the message's pattern)
WRONG_BACKBONE = {
    "architecture": r"made for a OPTForCausalLM backbone, the loaded one is GPT2LMHeadModel",
    "shape": r"made for a backbone with ffn_dim=256, the loaded one has ffn_dim=128",
    "weights": r"weights differ from the loaded .*other-seed .*pass --ignore_backbone_mismatch",
}


def _damaged_copy(trained: Path, where: Path, damage) -> Path:
    folder = Path(shutil.copytree(trained, where / "ckpt"))
    damage(folder)
    return folder


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_is_refused(trained, tmp_path, case):
    from optqa.build import load_trained

    damage, message = DAMAGE[case]
    with pytest.raises(OptqaError, match=message):
        load_trained(_damaged_copy(trained, tmp_path, damage))


@pytest.mark.parametrize("case", sorted(WRONG_BACKBONE))
def test_delta_for_another_backbone_is_refused(trained, backbones, case):
    from optqa.build import load_trained

    with pytest.raises(OptqaError, match=WRONG_BACKBONE[case]):
        load_trained(trained, plm_path=str(backbones[case]))


def test_override_covers_the_weights_only(trained, backbones, caplog):
    from optqa.build import load_trained

    with caplog.at_level(logging.WARNING, logger="optqa.checkpoints.format"):
        model, _, _ = load_trained(trained, plm_path=str(backbones["weights"]), ignore_backbone_mismatch=True)
    assert "loading anyway (--ignore_backbone_mismatch)" in caplog.text
    assert len(model.answer(QUESTIONS)) == len(QUESTIONS)
    # a delta whose tensors cannot fit the backbone stays refused whatever the flag says
    for case in ("architecture", "shape"):
        with pytest.raises(OptqaError, match=WRONG_BACKBONE[case]):
            load_trained(trained, plm_path=str(backbones[case]), ignore_backbone_mismatch=True)


def _cli_load(path: Path, *extra: str):
    return run_cli("--mode", "interactive_inference", "--delta_save_path", str(path), *extra,
                   stdin=QUESTIONS[0] + "\nquit()\n")


def _library_refusal(path: Path, plm_path: str | None = None) -> str:
    from optqa.build import load_trained

    with pytest.raises(OptqaError) as refused:
        load_trained(path, plm_path=plm_path)
    return str(refused.value)


def test_cli_refusals_are_one_error_line_and_a_failing_exit(trained, backbones, tmp_path):
    """One real command per class of refusal (a damaged checkpoint, a delta for another backbone) and the
    override: each refusal's message is checked in process above, so here the command must show exactly the
    library's message as its one error line, exit with status 2 and answer nothing."""
    damaged = _damaged_copy(trained, tmp_path, DAMAGE["flipped byte"][0])
    other = str(backbones["weights"])
    runs = {"damaged": (damaged, ()), "backbone": (trained, ("--plm_path", other)),
            "override": (trained, ("--plm_path", other, "--ignore_backbone_mismatch"))}
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:  # a fresh interpreter each: start them together
        results = dict(zip(runs, pool.map(lambda args: _cli_load(args[0], *args[1]), runs.values())))
    expected = {"damaged": _library_refusal(damaged), "backbone": _library_refusal(trained, plm_path=other)}
    for name, message in expected.items():
        result = results[name]
        assert result.returncode == 2, (name, result.stderr[-1500:])
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [f"error: {message}"]
        assert "Answer:" not in result.stdout, name
    override = results["override"]
    assert override.returncode == 0, override.stderr[-1500:]
    assert "loading anyway (--ignore_backbone_mismatch)" in override.stderr
    assert "integrity check passed" in override.stderr and "Answer:" in override.stdout


# ------------------------------------------------------------------------------------------------ every bit

@pytest.fixture(scope="module")
def small(tiny_opt, tmp_path_factory) -> Path:
    """A soft prompt of 2 virtual tokens: a ~4 kB manifest and ~0.7 kB of weights, small enough to flip every
    bit of both."""
    from optqa.tiny import build_random_checkpoint

    return build_random_checkpoint(tiny_opt, tmp_path_factory.mktemp("small") / "ckpt", "soft_prompt",
                                   soft_token_num=2, max_new_tokens=4)


def _flips(data: bytes):
    """``(position, bit, data with that one bit flipped)`` for every bit of ``data``."""
    for position in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[position] ^= 1 << bit
            yield position, bit, bytes(flipped)


def test_every_flipped_bit_of_the_manifest_is_refused_or_changes_nothing(small):
    """32,000-odd single-bit flips of a real manifest, each through the function every load, inspect, export and
    push reads a manifest with: refused in one line naming the file, or parsed to exactly the original content
    (then nothing a load computes can differ: it reads the manifest only through that content). Measured: all
    are refused (JSON syntax, UTF-8, the manifest's own SHA-256, the version, a missing field)."""
    path = small / ckpt.MANIFEST_NAME
    data = path.read_bytes()
    original = ckpt.parse_manifest(data, path)
    refused, unchanged = 0, []
    for position, bit, flipped in _flips(data):
        try:
            manifest = ckpt.parse_manifest(flipped, path)
        except OptqaError as exc:
            message = str(exc)
            assert "\n" not in message and str(path) in message, (position, bit, message)
            refused += 1
            continue
        assert manifest == original, (position, bit)
        unchanged.append((position, bit))
    assert refused + len(unchanged) == 8 * len(data) > 30_000
    assert unchanged == []


def test_a_flipped_version_digit_never_turns_a_manifest_into_an_unhashed_version_1(small):
    """Version 1 manifests (no hash of their own) still load: no single flip may make a version-2 manifest one.
    The version's digit flips to 0, 3, 6 or a non-digit (never to 1, two bits away), and any flip that kept
    the hash key would fail the hash, which covers the version."""
    path = small / ckpt.MANIFEST_NAME
    data = path.read_bytes()
    digit = data.index(b'"format_version": 2') + len(b'"format_version": ')
    messages = set()
    for bit in range(8):
        flipped = bytearray(data)
        flipped[digit] ^= 1 << bit
        with pytest.raises(OptqaError) as refused:
            ckpt.parse_manifest(bytes(flipped), path)
        messages.add(str(refused.value).split(" (")[0])
    assert messages == {f"{path}: damaged manifest, not valid JSON"} | {
        f"{path}: format version {v} is not supported" for v in (0, 3, 6)}
    one = json.loads(data)
    one["format_version"] = 1  # what it would take, if some change made it 1: still the hash says no
    with pytest.raises(OptqaError, match=r"\(the manifest was modified\)$"):
        ckpt.parse_manifest(json.dumps(one).encode(), path)


def test_every_flipped_byte_of_the_weights_is_refused(small, tmp_path):
    """Every byte of the weights file XOR 0xff, and every single bit of its 8-byte header length and of every
    64th byte, through the check every load runs (on disk: a write per case)."""
    folder = Path(shutil.copytree(small, tmp_path / "ckpt"))
    _, manifest = ckpt.read_manifest(folder)
    weights = folder / ckpt.WEIGHTS_NAME
    data = weights.read_bytes()
    cases = [(position, 0xff) for position in range(len(data))] + [
        (position, 1 << bit) for position in (*range(8), *range(8, len(data), 64)) for bit in range(8)]
    for position, mask in cases:
        flipped = bytearray(data)
        flipped[position] ^= mask
        weights.write_bytes(flipped)
        with pytest.raises(OptqaError, match=r"^integrity check failed: .* \(the file was modified\)$"):
            ckpt.verify_files(folder, manifest)
    assert len(cases) > 700
    weights.write_bytes(data)
    ckpt.read_checkpoint(folder)  # the loop restored every byte


def test_a_format_version_1_checkpoint_loads_with_one_warning_and_its_answers(caplog):
    """A checkpoint written by optqa before manifests carried their own hash (tests/fixtures/optqa-format-v1):
    it loads with one warning line and answers exactly as that optqa did; inspect says what it could not verify."""
    from optqa.build import load_trained
    from optqa.checkpoints.inspect import inspect_checkpoint

    folder = FIXTURES / "optqa-format-v1" / "adapter"
    expected = json.loads((FIXTURES / "optqa-format-v1" / "expected.json").read_text(encoding="utf-8"))
    with caplog.at_level(logging.WARNING):
        model, manifest, _ = load_trained(folder, plm_path=str(FIXTURES / "opendelta-0.3.2" / "tiny-opt"),
                                          overrides=expected["overrides"])
    assert manifest["format_version"] == 1 and ckpt.MANIFEST_HASH_KEY not in manifest
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"{folder / ckpt.MANIFEST_NAME}: format version 1: the manifest itself is not covered by a hash (only the "
        "files it lists are), so an edit to its settings or template cannot be detected"]
    assert [model.answer([q])[0] for q in expected["questions"]] == expected["answers"]
    assert ("manifest     format version 1: not covered by a hash of its own (an edit to its settings or template "
            "cannot be detected); its delta config and recorded settings checked (types, choices, ranges)"
            ) in inspect_checkpoint(folder)


def test_inspect_says_what_it_verified_and_refuses_a_bad_value_in_one_line(trained, tmp_path):
    manifest = json.loads((trained / ckpt.MANIFEST_NAME).read_bytes())
    assert manifest["format_version"] == 2 and manifest[ckpt.MANIFEST_HASH_KEY] == ckpt.manifest_digest(manifest)
    bad = _damaged_copy(trained, tmp_path, _set("delta", "non_linearity", "felu_new"))
    with ThreadPoolExecutor(max_workers=2) as pool:  # a fresh interpreter each: start them together
        good, result = pool.map(lambda path: run_cli("--mode", "inspect", "--delta_save_path", str(path)),
                                (trained, bad))
    assert good.returncode == 0, good.stderr[-2000:]
    assert (f"manifest     OK, its own SHA-256 verified ({manifest[ckpt.MANIFEST_HASH_KEY][:12]}); its delta "
            "config and recorded settings checked (types, choices, ranges)\n") in good.stdout
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"error: {bad / ckpt.MANIFEST_NAME}: invalid delta config: adapter: non_linearity must be one of ")


# ------------------------------------------------------------------------------------------------ loading

def test_loading_logs_the_integrity_check_and_needs_no_other_flag(trained, caplog):
    from optqa.build import load_trained

    with caplog.at_level(logging.INFO, logger="optqa.checkpoints.format"):
        model, manifest, _ = load_trained(trained)
    assert "integrity check passed" in caplog.text and "backbone check passed" in caplog.text
    assert manifest["template"] == (REPO / "templates" / "answer_template.txt").read_text(encoding="utf-8")
    assert set(manifest["files"]) == {ckpt.WEIGHTS_NAME}
    entry = manifest["files"][ckpt.WEIGHTS_NAME]
    assert entry == {"sha256": ckpt.sha256_file(trained / ckpt.WEIGHTS_NAME),
                     "bytes": (trained / ckpt.WEIGHTS_NAME).stat().st_size}


def test_relocated_checkpoint_gives_the_same_answers(trained, tmp_path):
    from optqa.build import load_trained

    before = load_trained(trained)[0].answer(QUESTIONS)
    moved = Path(shutil.copytree(trained, tmp_path / "elsewhere" / "my delta"))
    hidden = trained.with_name("hidden-while-testing")
    trained.rename(hidden)  # nothing may still point at the original place
    try:
        assert load_trained(moved)[0].answer(QUESTIONS) == before
    finally:
        hidden.rename(trained)


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, ckpt.sha256_file(p)) for p in folder.iterdir()}


def test_read_only_checkpoint_loads_through_the_cli(trained, tmp_path):
    folder = Path(shutil.copytree(trained, tmp_path / "ro"))
    before = _snapshot(folder)
    for path in folder.iterdir():
        path.chmod(stat.S_IREAD)
    folder.chmod(stat.S_IREAD | stat.S_IEXEC)
    try:
        result = _cli_load(folder)
    finally:
        folder.chmod(stat.S_IRWXU)
        for path in folder.iterdir():
            path.chmod(stat.S_IREAD | stat.S_IWRITE)
    assert result.returncode == 0, result.stderr[-1500:]
    assert "integrity check passed" in result.stderr and "Answer:" in result.stdout
    # root ignores permission bits, so also check that loading wrote nothing
    assert _snapshot(folder) == before and not folder.with_name("ro" + ckpt.PARTIAL_SUFFIX).exists()


# ------------------------------------------------------------------------------------------------ fingerprint

@pytest.mark.parametrize("delta_type", ["adapter", "lora", "bitfit", "soft_prompt", "prefix"])
def test_fingerprint_ignores_the_attached_delta(tiny_opt, delta_type):
    from optqa.config import RunConfig
    from optqa.deltas import AutoDeltaConfig, AutoDeltaModel
    from optqa.plm import load_plm

    plm, tokenizer, _, _ = load_plm("opt", str(tiny_opt))
    before = ckpt.backbone_fingerprint(plm)
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(RunConfig(delta_type=delta_type).delta_config()),
                                       backbone_model=plm, tokenizer=tokenizer)
    assert ckpt.backbone_fingerprint(plm) == before
    assert ckpt.backbone_fingerprint(delta.model) == before  # what runs: PEFT's wrapper for three of the types


def test_fingerprint_tells_weights_apart_and_survives_bf16(tiny_opt, backbones):
    from optqa.plm import load_plm

    plm = load_plm("opt", str(tiny_opt))[0]
    reference = ckpt.backbone_fingerprint(plm)
    assert ckpt.backbone_fingerprint(load_plm("opt", str(backbones["weights"]))[0]) != reference
    assert ckpt.backbone_fingerprint(plm.to(torch.bfloat16)) == reference
    with torch.no_grad():  # one sampled value nudged by one bf16 step
        plm.model.decoder.layers[1].fc1.weight.view(-1)[0] *= 1.01
    assert ckpt.backbone_fingerprint(plm) != reference


def test_fingerprint_samples_stay_inside_large_tensors():
    n = 50272 * 768  # OPT's embedding: above 2**24, where float positions round past the end
    positions = ckpt._sample_positions(n)
    assert positions[0] == 0 and positions[-1] == n - 1 and len(set(positions.tolist())) == 256
    assert ckpt._sample_positions(3).tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ atomic writes

def save_tagged(folder: Path, tag: str, extra=None) -> Path:
    """A minimal valid checkpoint whose manifest and weights both say ``tag``."""
    backbone = {"name_or_path": "none", "architecture": "none", "config": {}, "fingerprint": "none"}
    manifest = ckpt.build_manifest(delta_config={"delta_type": "adapter"}, template_text="{\"mask\"}",
                                   backbone=backbone, hyperparameters={}, metrics={"tag": tag},
                                   trainable_parameters=4)
    return ckpt.save_checkpoint(folder, {"w": torch.full((4,), float(ord(tag)))}, manifest, extra)


def loaded_tag(folder: Path) -> str:
    _, manifest, state = ckpt.read_checkpoint(folder)
    assert state["w"].tolist() == [float(ord(manifest["metrics"]["tag"]))] * 4
    return manifest["metrics"]["tag"]


# Saves A, then dies while saving B at ``stage``: inside the write of <folder>.partial, after the old folder
# was renamed to <folder>.previous, after <folder>.partial became <folder>, or hangs in the write for the
# parent to kill it. os._exit, like a kill, skips every finally/except clean-up.
CHILD = r"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_checkpoint import ckpt, save_tagged

folder, stage = Path(sys.argv[1]), sys.argv[2]
save_tagged(folder, "A")
rename = Path.rename
def dying_rename(self, target):
    result = rename(self, target)
    if (stage == "between renames" and str(target).endswith(ckpt.PREVIOUS_SUFFIX)) or (
            stage == "before clean-up" and str(self).endswith(ckpt.PARTIAL_SUFFIX)):
        os._exit(9)
    return result
Path.rename = dying_rename
def extra(target):
    (target / "notes.txt").write_bytes(b"half of B")
    if stage == "writing":
        os._exit(9)
    if stage == "killed":
        print("saving", flush=True)
        time.sleep(120)
save_tagged(folder, "B", extra)
"""


@pytest.mark.parametrize("stage, survivor", [("writing", "A"), ("between renames", "A"), ("before clean-up", "B"),
                                             ("killed", "A")])
def test_a_save_killed_at_any_point_leaves_a_loadable_checkpoint(tmp_path, stage, survivor):
    folder = tmp_path / "ckpt"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), stage, str(REPO / "tests")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    if stage == "killed":
        assert child.stdout.readline().strip() == "saving", child.stderr.read()
        child.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no clean-up runs
    child.wait(timeout=120)
    assert child.returncode != 0, child.stderr.read()
    assert loaded_tag(folder) == survivor
    # the next save recovers from whatever the killed one left behind
    save_tagged(folder, "C")
    assert loaded_tag(folder) == "C"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_folder_that_is_not_a_checkpoint_is_never_replaced(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "thesis.tex").write_bytes(b"years of work")
    with pytest.raises(OptqaError, match=r"project already exists and is not an optqa checkpoint .*thesis\.tex"):
        save_tagged(project, "A")
    with pytest.raises(OptqaError, match="is not an optqa checkpoint"):
        ckpt.ensure_replaceable(project)
    assert (project / "thesis.tex").read_bytes() == b"years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_a_readme_in_the_save_folder_is_kept_and_never_read(tmp_path):
    # the repository's delta_ckpts/ holds a README.md: training into it must neither fail nor delete it
    folder = tmp_path / "delta_ckpts"
    folder.mkdir()
    (folder / "README.md").write_bytes(b"# delta_ckpts/")
    ckpt.ensure_replaceable(folder)
    for tag in "AB":
        save_tagged(folder, tag)
        assert loaded_tag(folder) == tag and (folder / "README.md").read_bytes() == b"# delta_ckpts/"
    assert "README.md" not in ckpt.read_manifest(folder)[1]["files"]


def test_a_bundle_of_a_resume_folder_carries_a_resealed_manifest(tmp_path):
    """A shared copy leaves the training state out, so its manifest lists one file fewer: re-written with its own
    hash recomputed (format version 2), or without one for a version-1 folder (sealing unverified content would
    vouch for it)."""
    from optqa.checkpoints.bundle import open_checkpoint, write_bundle

    folder = save_tagged(tmp_path / "resume", "R", lambda target: (target / ckpt.RESUME_STATE_NAME).write_bytes(b"x"))
    assert set(ckpt.read_manifest(folder)[1]["files"]) == {ckpt.WEIGHTS_NAME, ckpt.RESUME_STATE_NAME}
    with open_checkpoint(write_bundle(folder, tmp_path / "resume.optqa")) as opened:
        _, manifest = ckpt.read_manifest(opened)
        assert loaded_tag(opened) == "R"
    assert set(manifest["files"]) == {ckpt.WEIGHTS_NAME} and manifest["format_version"] == 2
    assert manifest[ckpt.MANIFEST_HASH_KEY] == ckpt.manifest_digest(manifest)

    old = json.loads((folder / ckpt.MANIFEST_NAME).read_bytes())
    old.pop(ckpt.MANIFEST_HASH_KEY)
    (folder / ckpt.MANIFEST_NAME).write_text(json.dumps({**old, "format_version": 1}), encoding="utf-8")
    with open_checkpoint(write_bundle(folder, tmp_path / "old.optqa")) as opened:
        _, manifest = ckpt.read_manifest(opened)
    assert manifest["format_version"] == 1 and ckpt.MANIFEST_HASH_KEY not in manifest
    assert set(manifest["files"]) == {ckpt.WEIGHTS_NAME}


def test_weights_are_read_in_name_order_in_every_process(tmp_path):
    # safetensors' own load gives a hash map's order, which changes from process to process: a test that noised
    # a checkpoint by walking it drew a different model each run (and now and then one its tolerance failed)
    from safetensors.torch import save_file

    names = [f"layer.{i}.weight" for i in range(24)]
    save_file({name: torch.full((2,), float(i)) for i, name in enumerate(reversed(names))},
              str(tmp_path / "w.safetensors"))
    code = ("import sys; from pathlib import Path; from optqa.checkpoints.format import load_safetensors; "
            "print(' '.join(load_safetensors(Path(sys.argv[1]))))")
    orders = {subprocess.run([sys.executable, "-c", code, str(tmp_path / "w.safetensors")], capture_output=True,
                             text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120).stdout
              for _ in range(3)}
    assert orders == {" ".join(sorted(names)) + "\n"}
