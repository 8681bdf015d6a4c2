"""Issue 13, classes 1 and 4: every pair of options works or is refused before the backbone loads, and every flag
is honoured or refused in one line; the CLI and the library agree, and a manifest never contradicts itself."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
from conftest import train_args, train_in_process
from safetensors.torch import load_file

from optqa.checkpoints import format as ckpt
from optqa.cli import main
from optqa.config import REPO_ROOT, RunConfig
from optqa.deltas import AutoDeltaConfig, AutoDeltaModel
from optqa.errors import OptqaError
from optqa.options import COMBINATIONS, DELTA_FLAGS, MODE_FLAGS, combinations_table
from optqa.plm import load_plm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP32 = ("--precision", "fp32", "--max_new_tokens", "3")


def cli_error(capsys, caplog, argv: list[str]) -> str:
    """Run the CLI in this process: exit status 2, exactly one error line, no backbone loaded; the message."""
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1, err
    assert "loading backbone" not in caplog.text  # refused before the slow part
    return errors[0][len("error: "):]


# ---- class 1: pairs of options ---------------------------------------------------------------------------------

# for each refused row of the table, flags that ask for it (the paths come from train_args)
REFUSED_ARGV = {
    ("--delta_type prefix", "--gradient_checkpointing"): ["--delta_type", "prefix", "--gradient_checkpointing"],
    ("--precision fp16", "a CPU (no CUDA GPU, or --cpu)"): ["--precision", "fp16", "--cpu"],
    ("--quantize int8", "--precision bf16, fp16"): ["--quantize", "int8", "--precision", "bf16"],
    ("--quantize int8", "--fsdp"): ["--quantize", "int8", "--fsdp"],
}
# refused pairs of --mode evaluate's baselines (optqa/run/evaluation.py): whole command lines
EVALUATE_REFUSED_ARGV = {
    ("--no_delta", "--predictions_file"): ["--no_delta", "--predictions_file", "p.jsonl"],
    ("--num_shots", "--predictions_file"): ["--num_shots", "2", "--predictions_file", "p.jsonl"],
    ("--chat_template", "--predictions_file"): ["--chat_template", "--predictions_file", "p.jsonl"],
    ("--no_delta", "--delta_save_path"): ["--no_delta", "--delta_save_path", "elsewhere/"],
}
PREFIX_GC_LINE = ("--delta_type prefix cannot be combined with --gradient_checkpointing (transformers recomputes "
                  "the layers without the prefix positions); drop --gradient_checkpointing or choose another "
                  "--delta_type")


def test_every_refused_pair_has_a_test_case():
    refused = {(c.first, c.second) for c in COMBINATIONS if c.refused}
    assert refused == set(REFUSED_ARGV) | set(EVALUATE_REFUSED_ARGV) | {(c.first, c.second) for c in COMBINATIONS
                                                                        if c.refused and c.second == "2 processes"}


@pytest.mark.parametrize("pair", sorted(EVALUATE_REFUSED_ARGV), ids=lambda p: f"{p[0]} x {p[1]}")
def test_refused_evaluate_pairs_are_one_line(capsys, caplog, pair):
    [row] = [c for c in COMBINATIONS if (c.first, c.second) == pair]
    assert cli_error(capsys, caplog, ["--mode", "evaluate", *EVALUATE_REFUSED_ARGV[pair]]) == row.outcome


@pytest.mark.parametrize("pair", sorted(REFUSED_ARGV), ids=lambda p: f"{p[0]} x {p[1]}")
def test_refused_pairs_are_one_line_before_the_backbone_loads(capsys, caplog, tiny_opt, memory_data, tmp_path, pair):
    [row] = [c for c in COMBINATIONS if (c.first, c.second) == pair]
    message = cli_error(capsys, caplog, train_args(tiny_opt, memory_data, tmp_path, *REFUSED_ARGV[pair]))
    assert message == row.outcome
    assert not (tmp_path / "runs").exists()


def test_prefix_with_gradient_checkpointing_is_refused_with_its_line(capsys, caplog, tiny_opt, memory_data, tmp_path):
    # the example, word for word; the library (no typed flags) refuses it too
    argv = train_args(tiny_opt, memory_data, tmp_path, "--delta_type", "prefix", "--gradient_checkpointing")
    assert cli_error(capsys, caplog, argv) == PREFIX_GC_LINE
    with pytest.raises(OptqaError) as refused:
        train_in_process(tiny_opt, memory_data, tmp_path, "--delta_type", "prefix", "--gradient_checkpointing")
    assert str(refused.value) == PREFIX_GC_LINE


@pytest.mark.parametrize("mode, extra", [("evaluate", ["--predictions_file", "p.jsonl"]),
                                         ("interactive_inference", []), ("export", []), ("inspect", [])])
def test_single_process_modes_refuse_several_processes(capsys, caplog, monkeypatch, mode, extra):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun and accelerate launch set it
    assert cli_error(capsys, caplog, ["--mode", mode, *extra]) == (
        f"--mode {mode} runs in one process: start it with python -m optqa, not torchrun or accelerate launch "
        "(only --mode train and demo use several processes)")


def step_losses(summary: dict) -> list[float]:
    rows = (Path(summary.run_dir) / "train_loss.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in rows]


@pytest.mark.parametrize("extra", [("--delta_type", "lora"), ("--delta_type", "bitfit"), ("--delta_type", "soft_prompt"),
                                   ("--template", '{"soft"} {"placeholder":"text_a"} Answer: {"mask"}')],
                         ids=["lora", "bitfit", "soft_prompt", "soft-template"])
def test_gradient_checkpointing_keeps_the_losses(tiny_opt, memory_data, tmp_path, extra):
    flags = (*FP32, *extra, "--batch_size", "4", "--train_epochs", "1", "--lr", "2e-2")
    plain = train_in_process(tiny_opt, memory_data, tmp_path / "plain", *flags)
    recomputed = train_in_process(tiny_opt, memory_data, tmp_path / "gc", *flags, "--gradient_checkpointing")
    assert len(step_losses(plain)) == 2
    assert step_losses(recomputed) == pytest.approx(step_losses(plain), abs=1e-5)
    a = load_file(str(tmp_path / "plain" / "delta_ckpts" / ckpt.WEIGHTS_NAME))
    b = load_file(str(tmp_path / "gc" / "delta_ckpts" / ckpt.WEIGHTS_NAME))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_the_flags_page_holds_the_table_of_pairs():
    """docs/flags.md holds the table of option pairs, exactly as python -m optqa.options prints it."""
    page = (REPO_ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- combinations:start -->\n(.*?)\n<!-- combinations:end -->", page, re.S)
    assert table and table.group(1) == combinations_table()


# ---- class 4: a flag that does not apply ------------------------------------------------------------------------

def test_bitfit_honours_modified_modules_and_the_manifest_agrees(tiny_opt, memory_data, tmp_path):
    train_in_process(tiny_opt, memory_data, tmp_path, "--delta_type", "bitfit", "--modified_modules", "fc2",
                     *FP32, "--train_epochs", "1")
    manifest = json.loads((tmp_path / "delta_ckpts" / ckpt.MANIFEST_NAME).read_text())
    assert manifest["delta"] == {"delta_type": "bitfit", "modified_modules": ["fc2"]}
    assert manifest["hyperparameters"]["modified_modules"] == ["fc2"]
    weights = load_file(str(tmp_path / "delta_ckpts" / ckpt.WEIGHTS_NAME))
    # one bias per fc2 output (hidden 64) in each of the 2 layers, and nothing else
    assert sorted(weights) == [f"backbone.model.decoder.layers.{i}.fc2.bitfit_delta_bias" for i in range(2)]
    assert manifest["trainable_parameters"] == 2 * 64
    # the library, given the same config, builds the same delta
    plm, tokenizer, _, _ = load_plm("opt", str(tiny_opt))
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(manifest["delta"]), backbone_model=plm)
    assert sorted("backbone." + name for name in delta.delta_state_dict()) == sorted(weights)


def test_bitfit_without_modules_records_every_layer_in_both_places(tiny_opt, memory_data, tmp_path):
    train_in_process(tiny_opt, memory_data, tmp_path, "--delta_type", "bitfit", *FP32, "--train_epochs", "1")
    manifest = json.loads((tmp_path / "delta_ckpts" / ckpt.MANIFEST_NAME).read_text())
    assert manifest["delta"]["modified_modules"] is None is manifest["hyperparameters"]["modified_modules"]
    assert manifest["trainable_parameters"] == 2 * (4 * 64 + 256 + 64 + 2 * 64)


@pytest.mark.parametrize("delta_type", ["prefix", "soft_prompt"])
def test_modified_modules_refused_for_prompt_deltas_in_cli_and_library(capsys, caplog, tiny_opt, memory_data,
                                                                        tmp_path, delta_type):
    argv = train_args(tiny_opt, memory_data, tmp_path, "--delta_type", delta_type, "--modified_modules", "fc2")
    assert cli_error(capsys, caplog, argv) == (f"--modified_modules does not apply to --delta_type {delta_type} "
                                               "(only to adapter, lora, bitfit); drop it")
    with pytest.raises(OptqaError, match=f"^{delta_type} does not take modified_modules"):
        AutoDeltaConfig.from_dict({"delta_type": delta_type, "modified_modules": ["fc2"]})


# every delta-specific flag typed with every delta type that does not read it
MISAPPLIED = [(flag, delta_type) for flag, users in DELTA_FLAGS.items()
              for delta_type in ("adapter", "lora", "bitfit", "soft_prompt", "prefix") if delta_type not in users]
VALUES = {"modified_modules": ["fc2"], "soft_init_text": ["words"], "lora_dropout": ["0.1"]}


@pytest.mark.parametrize("flag, delta_type", MISAPPLIED, ids=lambda v: v)
def test_a_delta_flag_for_another_delta_type_is_refused(capsys, caplog, tiny_opt, memory_data, tmp_path, flag,
                                                        delta_type):
    argv = train_args(tiny_opt, memory_data, tmp_path, "--delta_type", delta_type, f"--{flag}",
                      *VALUES.get(flag, ["4"]))
    assert cli_error(capsys, caplog, argv) == (f"--{flag} does not apply to --delta_type {delta_type} (only to "
                                               f"{', '.join(DELTA_FLAGS[flag])}); drop it")


@pytest.mark.parametrize("argv, line", [
    (["--mode", "interactive_inference", "--lr", "0.1"],
     "--lr does not apply to --mode interactive_inference (it is read by --mode train, --mode demo); drop it"),
    (["--mode", "interactive_inference", "--delta_type", "lora"],
     "--delta_type does not apply to --mode interactive_inference (it is read by --mode train, --mode demo); drop it"),
    (["--mode", "demo", "--plm_path", "facebook/opt-125m"],
     "--plm_path does not apply to --mode demo (it is read by --mode train, --mode evaluate, "
     "--mode interactive_inference, --mode export, --mode push, --mode import_opendelta, --mode serve); drop it"),
    (["--mode", "interactive_inference", "--eval_batch_size", "4"],
     "--eval_batch_size does not apply to --mode interactive_inference (it is read by --mode train, --mode evaluate, "
     "--mode demo, --mode serve); drop it"),
    (["--mode", "inspect", "--fsdp"], "--fsdp does not apply to --mode inspect (it is read by --mode train, "
                                      "--mode demo); drop it"),
    (["--mode", "train", "--split", "dev"], "--split does not apply to --mode train (it is read by --mode evaluate); "
                                            "drop it"),
    (["--mode", "download", "--max_seq_l", "64"],
     "--max_seq_l does not apply to --mode download (it is read by --mode train, --mode evaluate, --mode demo, "
     "--mode import_opendelta); drop it"),
])
def test_a_flag_the_mode_does_not_read_is_refused(capsys, caplog, argv, line):
    assert cli_error(capsys, caplog, argv) == line


def test_every_flag_is_read_by_some_mode():
    read = set().union(*MODE_FLAGS.values())
    assert {f.name for f in dataclasses.fields(RunConfig)} - {"mode"} == read


def test_library_config_resolves_modified_modules_per_delta_type():
    assert RunConfig(delta_type="adapter").modified_modules == ["attn", "mlp_out"]
    assert RunConfig(delta_type="lora").delta_config()["modified_modules"] == ["attn", "mlp_out"]
    assert RunConfig(delta_type="bitfit").delta_config() == {"delta_type": "bitfit", "modified_modules": None}
    assert RunConfig(delta_type="prefix", modified_modules=["fc2"]).to_dict()["modified_modules"] is None


# ---- numbers out of range: one line, not a traceback in the first step -----------------------------------------

@pytest.mark.parametrize("flag, value, wanted", [
    ("batch_size", "0", "at least 1"), ("max_seq_l", "0", "at least 1"), ("train_epochs", "0", "at least 1"),
    ("gradient_accumulation_steps", "0", "at least 1"), ("eval_batch_size", "-2", "at least 1"),
    ("max_new_tokens", "0", "at least 1"), ("num_threads", "0", "at least 1"), ("warmup_steps", "-1", "at least 0"),
    ("lr", "-1", "more than 0"), ("lr", "0", "more than 0"), ("max_grad_norm", "-0.5", "at least 0"),
])
def test_a_number_out_of_range_is_refused(capsys, caplog, tiny_opt, memory_data, tmp_path, flag, value, wanted):
    argv = train_args(tiny_opt, memory_data, tmp_path, f"--{flag}", value)
    shown = float(value) if flag in ("lr", "max_grad_norm") else int(value)
    assert cli_error(capsys, caplog, argv) == f"--{flag} must be {wanted}, got {shown}"


def test_lora_dropout_must_be_a_probability(capsys, caplog, tiny_opt, memory_data, tmp_path):
    argv = train_args(tiny_opt, memory_data, tmp_path, "--delta_type", "lora", "--lora_dropout", "1")
    assert cli_error(capsys, caplog, argv) == "--lora_dropout must be at least 0 and less than 1, got 1.0"


def test_every_test_the_table_names_exists():
    named = re.findall(r"(tests/\w+\.py)::(\w+)", combinations_table())
    assert len(named) >= 8
    for path, name in named:
        assert f"def {name}(" in (REPO_ROOT / path).read_text(encoding="utf-8"), f"{path}::{name}"
