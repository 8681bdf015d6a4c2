"""Importing genuine OpenDelta 0.3.2 checkpoints (tests/fixtures/opendelta-0.3.2) and refusing hostile pickles."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, run_cli

from optqa.cli import main
from optqa.config import REGISTRY

OPENDELTA = FIXTURES / "opendelta-0.3.2"
EXPECTED = json.loads((OPENDELTA / "expected.json").read_text(encoding="utf-8"))
BACKBONE = OPENDELTA / "tiny-opt"
DELTAS = ("adapter", "lora", "bitfit")
WEIGHTS = "pytorch_model.bin"


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    """Each OpenDelta fixture imported once, through the command line's entry point."""
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for delta in DELTAS:
        out[delta] = root / delta
        code = main(["--mode", "import_opendelta", "--import_path", str(OPENDELTA / f"opendelta-{delta}"),
                     "--plm_path", str(BACKBONE), "--delta_save_path", str(out[delta])])
        assert code == 0
    return out


def last_logits(path) -> torch.Tensor:
    """The logits at the last prompt position, computed the way expected.json's were (no template)."""
    from optqa.build import load_trained

    model, _, _ = load_trained(path)
    with torch.no_grad():
        return model.plm(input_ids=torch.tensor([EXPECTED["input_ids"]])).logits[0, -1]


@pytest.mark.parametrize("delta", DELTAS)
def test_import_reproduces_opendelta(imported, delta):
    expected = EXPECTED[delta]
    logits = last_logits(imported[delta])
    assert torch.allclose(logits[:8], torch.tensor(expected["last_logits_first8"]), atol=1e-5)
    assert logits.topk(5).indices.tolist() == expected["top5_ids"]
    manifest = json.loads((imported[delta] / "optqa_manifest.json").read_bytes())
    assert manifest["trainable_parameters"] == expected["trainable_params"]
    config = manifest["delta"]
    assert config["delta_type"] == delta
    assert not {"backbone_hash", "opendelta_version", "exclude_modules", "common_structure"} & set(config)
    # OpenDelta's "attn@" patterns are not optqa's; None means optqa's default (the same 16 biases)
    assert (config.get("modified_modules") is None) == (delta == "bitfit")
    # the manifest says the same thing twice (issue 13)
    assert manifest["hyperparameters"]["modified_modules"] == config.get("modified_modules")
    assert manifest["hyperparameters"]["delta_type"] == delta
    # the training settings recorded are the imported type's recipe (lora's lr is not the adapter's)
    recipe = REGISTRY[delta].recipe
    assert {k: manifest["hyperparameters"][k] for k in recipe} == recipe
    assert manifest["imported_from"]["format"] == "OpenDelta"
    assert manifest["imported_from"]["backbone_class"] == "OPTForCausalLM"


def test_bare_backbone_differs_from_every_import():
    # the fixtures move every delta weight, so matching expected.json cannot happen by accident
    from optqa.plm import load_plm

    plm, *_ = load_plm("opt", str(BACKBONE))
    with torch.no_grad():
        bare = plm(input_ids=torch.tensor([EXPECTED["input_ids"]])).logits[0, -1]
    for delta in DELTAS:
        assert (bare[:8] - torch.tensor(EXPECTED[delta]["last_logits_first8"])).abs().max() > 1e-3


def test_imported_adapter_exports_to_a_bundle_only(imported, tmp_path):
    from optqa.sharing.export import export_checkpoint

    lines = export_checkpoint(imported["adapter"], tmp_path / "adapter.optqa")
    assert any("PEFT has no adapter method" in line and "only the bundle was written" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.optqa"]
    assert torch.allclose(last_logits(tmp_path / "adapter.optqa")[:8],
                          torch.tensor(EXPECTED["adapter"]["last_logits_first8"]), atol=1e-5)


def test_inspect_names_the_opendelta_origin(imported, capsys):
    assert main(["--mode", "inspect", "--delta_save_path", str(imported["bitfit"])]) == 0
    out = capsys.readouterr().out
    assert "imported     from OpenDelta 0.3.0 checkpoint" in out and "opendelta-bitfit" in out
    assert "trainable    1,408 parameters" in out


class Payload:
    """Unpickling this calls open(marker, "w"): code that would run if the loader executed pickles."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_a_payload_is_refused_not_executed(tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    shutil.copy(OPENDELTA / "opendelta-lora" / "config.json", folder / "config.json")
    marker = tmp_path / "payload-ran"
    torch.save({"model.decoder.layers.0.self_attn.q_proj.lora.lora_A": torch.zeros(8, 64), "x": Payload(marker)},
               folder / "pytorch_model.bin")
    result = run_cli("--mode", "import_opendelta", "--import_path", str(folder), "--plm_path", str(BACKBONE),
                     "--delta_save_path", str(tmp_path / "out"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(folder / "pytorch_model.bin") in errors[0] and "refused" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # the payload is live: an unsafe loader would have run it
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_unsupported_and_incomplete_opendelta_folders(tmp_path, capsys):
    folder = tmp_path / "prefix"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"delta_type": "prefix", "prefix_token_num": 6}), encoding="utf-8")
    args = ["--mode", "import_opendelta", "--import_path", str(folder), "--plm_path", str(BACKBONE),
            "--delta_save_path", str(tmp_path / "out")]
    assert main(args) == 2
    assert f"not an OpenDelta checkpoint: {folder / 'pytorch_model.bin'} is missing" in capsys.readouterr().err
    torch.save({}, folder / "pytorch_model.bin")
    assert main(args) == 2
    assert "OpenDelta delta type 'prefix' cannot be imported" in capsys.readouterr().err


def _broken_pickles(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    """pytorch_model.bin files torch.load cannot read, with (a substring of) the one line each must give; the
    exception torch raises today is noted for each."""
    import io
    import pickle

    good = (OPENDELTA / "opendelta-lora" / WEIGHTS).read_bytes()
    marker = tmp_path / "payload-ran"
    legacy = io.BytesIO()
    torch.save({"x": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    unreadable = "not a readable torch checkpoint"
    return {
        "empty": (b"", f"{unreadable} (EOFError)"),  # torch: EOFError with no message
        "one_byte": (b"\x80", f"{unreadable} (IndexError"),  # the IndexError
        "truncated": (good[:len(good) // 2], f"{unreadable} (OSError"),
        "cut_at_the_end": (good[:-10], f"{unreadable} (OSError"),
        "text": (b"not a checkpoint\n" * 8, f"{unreadable} (UnpicklingError: Unsupported operand 110)"),
        "other_text": (b"hello\n", f"{unreadable} (KeyError"),
        "plain_pickle_of_an_int": (pickle.dumps(5), f"{unreadable} (RuntimeError: Invalid magic number"),
        "zip_without_a_pickle": (_zip_bytes({"archive/other.txt": b"x"}), f"{unreadable} (RuntimeError"),
        "legacy_pickle_carrying_code": (legacy.getvalue(), "refused, the pickle holds code or objects other than "
                                                           "tensors (io.open); it was not executed"),
        # protocol 4's FRAME opcode is one the weights-only unpickler does not read: refused before the payload
        "plain_pickle_carrying_code": (pickle.dumps({"x": Payload(marker)}),
                                       f"{unreadable} (UnpicklingError: Unsupported operand 149)"),
    }



def _zip_bytes(entries: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_unreadable_pytorch_model_bins_are_one_line(tmp_path, capsys):
    cases = _broken_pickles(tmp_path)
    folder = tmp_path / "od"
    folder.mkdir()
    shutil.copy(OPENDELTA / "opendelta-lora" / "config.json", folder / "config.json")
    for name, (data, expected) in cases.items():
        (folder / WEIGHTS).write_bytes(data)
        capsys.readouterr()
        code = main(["--mode", "import_opendelta", "--import_path", str(folder), "--plm_path", str(BACKBONE),
                     "--delta_save_path", str(tmp_path / "out")])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, (name, err[-2000:])
        assert errors[0].startswith(f"error: {folder / WEIGHTS}: {expected}"), (name, errors[0])
        assert "Traceback" not in err and "Warning" not in err, name
    assert not (tmp_path / "out").exists() and not (tmp_path / "payload-ran").exists()


def test_a_code_carrying_training_state_is_refused_in_one_line(tmp_path):
    # the resume state (training_state.pt) is a torch pickle too: the same reader refuses its payload
    from optqa.checkpoints.format import RESUME_STATE_NAME, load_pickled_tensors
    from optqa.errors import OptqaError

    path = tmp_path / RESUME_STATE_NAME
    torch.save({"train_state": {"epoch": 1}, "optimizer": Payload(tmp_path / "payload-ran")}, path)
    with pytest.raises(OptqaError) as refused:
        load_pickled_tensors(path)
    assert str(refused.value) == (f"{path}: refused, the pickle holds code or objects other than tensors (io.open); "
                                  "it was not executed")
    assert "\n" not in str(refused.value) and not (tmp_path / "payload-ran").exists()
