"""The typed configs: each delta default written once, values checked when a config is built, and what a resume
must keep read from field metadata."""
from __future__ import annotations

import dataclasses

import pytest

from optqa.config import (
    DELTA_CONFIGS,
    AdapterConfig,
    BitFitConfig,
    LoraConfig,
    PrefixConfig,
    RunConfig,
    SoftPromptConfig,
)
from optqa.deltas import AutoDeltaConfig
from optqa.errors import OptqaError


def test_the_cli_takes_each_delta_default_from_its_typed_config():
    run = RunConfig()
    assert (run.bottleneck_dim, run.lora_r, run.lora_alpha, run.lora_dropout) == (24, 8, 16, 0.0)
    assert (run.soft_token_num, run.soft_init_text, run.prefix_token_num) == (
        20, "Answer the science question briefly.", 6)
    assert AdapterConfig().bottleneck_dim == run.bottleneck_dim and SoftPromptConfig().init_text == run.soft_init_text
    # LoRA's one difference between the library and the command line is on LoraConfig's field, nowhere else
    # (family-neutral names: on OPT self_attn.q_proj + self_attn.v_proj, and self_attn + fc2)
    assert LoraConfig().modified_modules == ["attn_qv"]
    assert RunConfig(delta_type="lora").delta_config()["modified_modules"] == ["attn", "mlp_out"]
    assert [f.name for f in dataclasses.fields(LoraConfig) if "cli_default" in f.metadata] == ["modified_modules"]


@pytest.mark.parametrize("config, message", [
    ({"delta_type": "lora", "lora_r": 0}, "lora: lora_r must be a positive whole number, got 0"),
    ({"delta_type": "lora", "lora_dropout": 1.0}, r"lora: lora_dropout must be in \[0, 1\), got 1.0"),
    ({"delta_type": "adapter", "bottleneck_dim": 2.5}, "adapter: bottleneck_dim must be a whole number, got 2.5$"),
    ({"delta_type": "adapter", "bottleneck_dim": 0}, "adapter: bottleneck_dim must be a positive whole number"),
    ({"delta_type": "adapter", "modified_modules": "fc2"}, "adapter: modified_modules must be a list of strings, "
                                                           "got 'fc2'$"),
    ({"delta_type": "adapter", "modified_modules": [""]}, "adapter: modified_modules must be a non-empty list"),
    ({"delta_type": "adapter", "non_linearity": "felu_new"}, r"adapter: non_linearity must be one of transformers' "
                                                             r"activations \(ACT2FN: gelu, .*\), got 'felu_new'$"),
    ({"delta_type": "lora", "lora_dropout": "0.1"}, "lora: lora_dropout must be a finite number, got '0.1'$"),
    ({"delta_type": "lora", "lora_dropout": float("nan")}, "lora: lora_dropout must be a finite number, got nan$"),
    ({"delta_type": "soft_prompt", "init_text": None}, "soft_prompt: init_text must be a string, got None$"),
    ({"delta_type": "bitfit", "modified_modules": []}, "bitfit: modified_modules must be a non-empty list"),
    ({"delta_type": "soft_prompt", "soft_token_num": -1}, "soft_prompt: soft_token_num must be a positive"),
    ({"delta_type": "prefix", "prefix_token_num": True}, "prefix: prefix_token_num must be a whole number, got True$"),
    ({"delta_type": "prefix", "lora_r": 8}, r"prefix does not take lora_r \(it takes prefix_token_num, init_text\)"),
    ({"delta_type": "ia3"}, "unknown delta_type 'ia3'"),
])
def test_a_bad_delta_config_is_refused_when_built(config, message):
    with pytest.raises(OptqaError, match=message):
        AutoDeltaConfig.from_dict(config)


def test_from_dict_gives_the_typed_config_and_ignores_opendelta_run_keys():
    config = AutoDeltaConfig.from_dict({"delta_type": "bitfit", "backbone_class": "OPTForCausalLM",
                                        "opendelta_version": "0.3.2"})
    assert isinstance(config, BitFitConfig) and config.to_dict() == {"delta_type": "bitfit", "modified_modules": None}
    assert isinstance(AutoDeltaConfig.from_dict({"delta_type": "prefix"}), PrefixConfig)
    assert {cls().delta_type for cls in DELTA_CONFIGS.values()} == set(DELTA_CONFIGS)


def test_what_a_resume_must_keep_comes_from_the_fields():
    assert RunConfig(delta_type="lora").resume_settings() == (
        "data_path", "train_file", "plm_path", "delta_type", "modified_modules", "lora_r", "lora_alpha",
        "lora_dropout", "template", "max_seq_l", "chat_template", "batch_size", "lr", "weight_decay", "train_epochs",
        "warmup_steps", "max_grad_norm", "gradient_accumulation_steps", "train_targets", "group_by_length", "seed")
    # another delta type's options do not shape this delta, so they are not compared
    assert "lora_r" not in RunConfig(delta_type="prefix").resume_settings()
    assert "prefix_token_num" in RunConfig(delta_type="prefix").resume_settings()
    assert RunConfig.names_where("training") == ("max_seq_l", "chat_template", "batch_size", "lr", "weight_decay",
                                                 "train_epochs", "warmup_steps", "max_grad_norm",
                                                 "gradient_accumulation_steps", "train_targets", "seed", "precision")


def test_a_dropped_backbone_with_its_delta_is_freed(tiny_opt):
    """The backbone names its delta in its own __dict__ (a cycle the garbage collector frees), not in a module-level
    registry, which would keep every backbone ever given a delta alive."""
    import gc
    import weakref

    from optqa.deltas import AutoDeltaModel, attached_delta
    from optqa.plm import load_plm

    plm, _, _, _ = load_plm("opt", str(tiny_opt))
    delta = AutoDeltaModel.from_config({"delta_type": "lora"}, backbone_model=plm)
    assert attached_delta(plm) is delta
    gone = weakref.ref(plm)
    del plm, delta
    gc.collect()
    assert gone() is None
