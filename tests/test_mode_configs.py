"""One config per mode, built from the settings' sections: a mode's config holds only the settings it reads, a
flag not typed is None (so a checkpoint's recorded value wins over a default nobody typed), and a setting a
delta type's recipe gives takes the recipe's value unless typed; the manifest records the value used."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from conftest import train_in_process

from optqa import config as config_module
from optqa.cli import MODE_RUNNERS, parse_args
from optqa.config import MODE_CONFIGS, MODES, RECIPE_KEYS, REGISTRY, DeltaType, LoraConfig, RunConfig, shown_default
from optqa.errors import OptqaError
from optqa.options import MODE_FLAGS


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_a_modes_config_holds_only_what_it_reads():
    assert field_names(MODE_CONFIGS["inspect"]) == {"mode", "delta_save_path"}
    assert field_names(MODE_CONFIGS["download"]) == {"mode", "data_path", "data_url", "allow_checksum_mismatch"}
    assert field_names(MODE_CONFIGS["serve"]) == {
        "mode", "deltas", "host", "allowed_hosts", "port", "api_key", "delta_save_path", "plm_path",
        "ignore_backbone_mismatch", "max_new_tokens", "eval_batch_size", "precision", "quantize", "num_threads"}
    # the demo writes its own dev file, backbone and save folders
    demo = field_names(MODE_CONFIGS["demo"])
    assert {"dev_file", "plm_path", "delta_save_path", "raw_delta_save_path"}.isdisjoint(demo)
    for mode in MODES:
        assert MODE_FLAGS[mode] == field_names(MODE_CONFIGS[mode]) - {"mode"}
        assert MODE_CONFIGS[mode]().mode == mode and field_names(MODE_CONFIGS[mode]) <= field_names(RunConfig)
    assert set(MODE_RUNNERS) == set(MODES)


def test_a_flag_not_typed_is_none_until_resolved():
    config = parse_args(["--mode", "interactive_inference", "--max_new_tokens", "32"])
    assert type(config).__name__ == "InteractiveInferenceConfig"
    # 32 typed is the user's word (it replaces a checkpoint's 12); not typed, the checkpoint's value is used
    assert config.max_new_tokens == 32 and config.precision is None and config.plm_path is None
    assert config.given() == {"mode": "interactive_inference", "max_new_tokens": 32}
    resolved = config.resolved()
    assert (resolved.precision, resolved.merge_lora, resolved.delta_save_path) == ("auto", True, "./delta_ckpts/")
    with pytest.raises(OptqaError, match=r"^--lr does not apply to --mode interactive_inference \(it is read by "
                                         r"--mode train, --mode demo\); drop it$"):
        parse_args(["--mode", "interactive_inference", "--lr", "0.1"])


@pytest.mark.parametrize("mode", ["evaluate", "interactive_inference", "serve"])
def test_cpu_is_refused_where_the_model_is_always_on_the_cpu(mode):
    # only training places the model on a GPU (through accelerate); the answering modes load it on the CPU
    with pytest.raises(OptqaError, match=rf"^--cpu does not apply to --mode {mode} \(it is read by --mode train, "
                                         r"--mode demo\); drop it$"):
        parse_args(["--mode", mode, "--cpu"])


def test_a_library_config_resolves_every_setting():
    run = RunConfig(delta_type="prefix", modified_modules=["fc2"])
    assert None not in (run.lr, run.train_epochs, run.batch_size, run.plm_path, run.export_peft)
    assert run.modified_modules is None and run.export_peft is True and run.mode == "train"
    widened = RunConfig.of(parse_args(["--mode", "evaluate", "--num_shots", "2"]))
    assert (widened.mode, widened.num_shots, widened.lr, widened.split) == ("evaluate", 2, 1e-3, "test")


@pytest.fixture
def lora_recipe(monkeypatch):
    """LoRA's recipe set to lr 2e-2 and one epoch, on every family (the registry entry replaced for this test only)."""
    entry = dataclasses.replace(REGISTRY["lora"], recipe={"lr": 2e-2, "train_epochs": 1}, family_recipes={})
    monkeypatch.setitem(config_module.REGISTRY, "lora", entry)
    return entry


def test_a_setting_not_given_takes_the_delta_types_recipe(lora_recipe):
    assert (RunConfig(delta_type="lora").lr, RunConfig(delta_type="lora").train_epochs) == (2e-2, 1)
    assert (RunConfig(delta_type="adapter").lr, RunConfig(delta_type="adapter").train_epochs) == (1e-3, 1)
    assert RunConfig(delta_type="lora", lr=5e-3).lr == 5e-3  # typed wins
    assert RunConfig(delta_type="lora").warmup_steps == 0  # not in the recipe: the setting's own default
    assert MODE_CONFIGS["train"](delta_type="lora").resolved().lr == 2e-2
    assert MODE_CONFIGS["train"]().lr is None
    lr = next(f for f in dataclasses.fields(RunConfig) if f.name == "lr")
    assert shown_default(lr) == ("the delta type's recipe: adapter 0.001, lora 0.02, bitfit 0.001, "
                                 "soft_prompt 0.03, prefix 0.01")


def test_the_manifest_records_the_recipes_value(lora_recipe, tiny_opt, memory_data, tmp_path):
    summary = train_in_process(tiny_opt, memory_data, tmp_path, "--delta_type", "lora", "--precision", "fp32",
                               "--max_new_tokens", "3")
    manifest = json.loads((tmp_path / "delta_ckpts" / "optqa_manifest.json").read_text())
    assert (manifest["hyperparameters"]["lr"], manifest["hyperparameters"]["train_epochs"]) == (2e-2, 1)
    # one epoch was trained: one dev score in the run's metrics
    rows = [json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows if "train_loss" in row] == [1]


def test_a_recipe_sets_only_recipe_keys():
    assert RECIPE_KEYS == ("lr", "train_epochs", "warmup_steps", "max_new_tokens")
    with pytest.raises(AssertionError, match="a recipe sets only"):
        DeltaType(LoraConfig, "optqa.deltas:LoRA", "LoRA", "lora", ("lora_",), recipe={"batch_size": 4})
    with pytest.raises(AssertionError, match="a recipe sets only"):
        DeltaType(LoraConfig, "optqa.deltas:LoRA", "LoRA", "lora", ("lora_",), family_recipes={"llama": {"seed": 1}})


def test_a_family_recipe_replaces_the_delta_types_on_that_family_only():
    # measured (docs/recipes.md): LoRA on Gemma 3 270M 40.2 dev F1 at 1e-3, 36.7 at the Llama-chosen 2e-3
    assert REGISTRY["lora"].recipe_for("gemma3_text") == {"lr": 1e-3, "train_epochs": 1}
    assert REGISTRY["lora"].recipe_for("llama") == REGISTRY["lora"].recipe_for(None) == {"lr": 2e-3, "train_epochs": 1}

    def trained(*flags: str, model_type: str | None) -> tuple[float, int]:
        run = RunConfig.of(parse_args(["--mode", "train", *flags]), model_type=model_type)
        return run.lr, run.train_epochs

    assert trained("--delta_type", "lora", model_type="gemma3_text") == (1e-3, 1)
    assert trained("--delta_type", "lora", model_type="llama") == (2e-3, 1)
    assert trained("--delta_type", "lora", model_type=None) == (2e-3, 1)
    assert trained("--delta_type", "lora", "--lr", "2e-3", model_type="gemma3_text") == (2e-3, 1)  # typed wins
    assert trained("--delta_type", "bitfit", model_type="gemma3_text") == (1e-3, 3)  # no family entry: its recipe
    assert trained(model_type="gemma3_text") == (1e-3, 1)  # the default delta type, the adapter
    lr = next(f for f in dataclasses.fields(RunConfig) if f.name == "lr")
    assert "lora 0.002 (gemma3_text 0.001), bitfit" in shown_default(lr)


def test_a_training_run_reads_the_family_from_the_backbone_and_records_its_recipe(memory_data, tmp_path, caplog):
    from conftest import sample_texts

    from optqa.tiny import build_family

    gemma = build_family("gemma3_text", tmp_path / "gemma", sample_texts())
    with caplog.at_level(logging.INFO, logger="optqa"):
        train_in_process(gemma, memory_data, tmp_path, "--delta_type", "lora", "--precision", "fp32",
                         "--max_new_tokens", "3", "--max_steps", "1")
    assert "lora's recipe on a gemma3_text backbone: --lr 0.001" in caplog.messages
    manifest = json.loads((tmp_path / "delta_ckpts" / "optqa_manifest.json").read_text())
    assert manifest["backbone"]["model_type"] == "gemma3_text"
    assert (manifest["hyperparameters"]["lr"], manifest["hyperparameters"]["train_epochs"]) == (1e-3, 1)
