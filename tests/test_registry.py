"""The delta-type registry: a delta type is described in one place. Every registered type is complete (its config,
its method, its parameter names), and adding one, here (IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning"), takes one entry, its config class and its method
class, in a copy of the package: the command line, training, the checkpoint, inspect and answering then know it."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import MEMORY_SET, REPO, run_cli, train_args

from optqa.config import DELTA_CONFIGS, DELTA_TYPES, REGISTRY, RunConfig, flags_of
from optqa.deltas import DELTA_MARKERS, DeltaMethod
from optqa.families import FAMILIES
from optqa.options import DELTA_FLAGS

IA3_CONFIG = '''
@dataclass
class IA3Config(DeltaConfig):
    """(IA)^3: a learned vector rescales the output of each modified module."""

    delta_type: ClassVar[str] = "ia3"
    modified_modules: list[str] = _opt(["attn", "mlp_out"], "modules whose output is rescaled")
    ia3_init: float = _opt(1.0, "the scales' initial value")

    def _check(self) -> None:
        _module_names(self, allow_none=False)


'''
IA3_ENTRY = '    DeltaType(IA3Config, "optqa.deltas:IA3", "(IA)^3", "ia3", ("ia3_scale",)),\n'
IA3_METHOD = '''

class IA3Scale(nn.Module):
    """One learned scale per output feature."""

    def __init__(self, width: int, init: float):
        super().__init__()
        self.ia3_scale = nn.Parameter(torch.full((width,), float(init)))


class IA3Wrapper(DeltaWrapper):
    """A module whose output ``ia3`` rescales, in that module's place (as adapter and BitFit wrap theirs)."""

    def __init__(self, base_layer: nn.Module, scale: IA3Scale):
        super().__init__(base_layer)
        self.ia3 = scale

    def delta_output(self, hidden):
        return hidden * self.ia3.ia3_scale.to(hidden.dtype)


class IA3(DeltaMethod):
    @staticmethod
    def attach(config, plm, tokenizer):
        wrap_modules(plm, resolve_modules(plm, config.modified_modules),
                     lambda module: IA3Wrapper(module, IA3Scale(_output_width(module, plm), config.ia3_init)))
        return plm
'''


def test_every_registered_type_is_complete():
    assert DELTA_TYPES == ("adapter", "lora", "bitfit", "soft_prompt", "prefix")
    for name, entry in REGISTRY.items():
        assert DELTA_CONFIGS[name] is entry.config and entry.config.delta_type == name
        assert issubclass(entry.implementation(), DeltaMethod)
        assert entry.parameters and all(marker in DELTA_MARKERS for marker in entry.parameters)
        # each option is a RunConfig field and a flag that only this type (and those sharing it) reads
        for flag in flags_of(name):
            assert flag in {f.name for f in dataclasses.fields(RunConfig)} and name in DELTA_FLAGS[flag]
        assert (entry.virtual_tokens is None) == (entry.virtual_place is None)
        if entry.virtual_tokens:
            assert entry.virtual_tokens in flags_of(name) and entry.peft_type
        # a family recipe names a family optqa knows (a misspelt model_type would never apply)
        assert set(entry.family_recipes) <= set(FAMILIES), sorted(set(entry.family_recipes) - set(FAMILIES))


@pytest.fixture(scope="module")
def with_ia3(tmp_path_factory) -> Path:
    """A copy of the package (and its templates) with (IA)^3 added: one config class and one registry entry in
    config.py, one method class in deltas.py."""
    root = tmp_path_factory.mktemp("ia3")
    shutil.copytree(REPO / "optqa", root / "optqa", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "templates", root / "templates")
    config = (root / "optqa" / "config.py").read_text(encoding="utf-8")
    marker = "# " + "-" * 84 + " the delta-type registry"
    assert config.count(marker) == 1 and config.count("\n)}\n") == 1
    config = config.replace(marker, IA3_CONFIG + marker).replace("\n)}\n", "\n" + IA3_ENTRY + ")}\n")
    (root / "optqa" / "config.py").write_text(config, encoding="utf-8")
    with (root / "optqa" / "deltas.py").open("a", encoding="utf-8") as deltas:
        deltas.write(IA3_METHOD)
    return root


def test_a_new_delta_type_is_one_entry(with_ia3, tiny_opt, memory_data, tmp_path):
    env = {"PYTHONPATH": str(with_ia3)}
    help_text = run_cli("--help", env=env, cwd=with_ia3).stdout
    assert "soft_prompt,prefix,ia3}" in help_text and "--ia3_init IA3_INIT" in help_text
    assert "ia3: the scales' initial value (default: 1.0)" in " ".join(help_text.split())

    trained = run_cli(*train_args(tiny_opt, memory_data, tmp_path, "--delta_type", "ia3", "--lr", "1e-2",
                                  "--train_epochs", "2", "--max_new_tokens", "4"), env=env, cwd=with_ia3)
    assert trained.returncode == 0, trained.stderr[-3000:]
    folder = tmp_path / "delta_ckpts"
    manifest = json.loads((folder / "optqa_manifest.json").read_text())
    assert manifest["delta"] == {"delta_type": "ia3", "modified_modules": ["attn", "mlp_out"], "ia3_init": 1.0}
    from safetensors.torch import load_file

    state = load_file(str(folder / "delta_model.safetensors"))
    # OPT's two layers: self_attn and fc2 each get one scale per hidden feature (the tiny OPT is 64 wide)
    assert sorted(state) == [f"backbone.model.decoder.layers.{i}.{m}.ia3.ia3_scale" for i in (0, 1)
                             for m in ("fc2", "self_attn")]
    assert all(tuple(v.shape) == (64,) for v in state.values()) and manifest["trainable_parameters"] == 4 * 64
    assert any(not bool((v == 1.0).all()) for v in state.values())  # it trained

    inspected = run_cli("--mode", "inspect", "--delta_save_path", str(folder), env=env, cwd=with_ia3)
    assert inspected.returncode == 0 and 'ia3 {"modified_modules": ["attn", "mlp_out"], "ia3_init": 1.0}' in \
        inspected.stdout
    question = MEMORY_SET[0][0]
    asked = run_cli("--mode", "interactive_inference", "--delta_save_path", str(folder), stdin=question + "\n",
                    env=env, cwd=with_ia3)
    predictions = [json.loads(line) for line in next((tmp_path / "runs").glob("train-*")).joinpath(
        "predictions_test.jsonl").read_text().splitlines()]
    expected = next(row["prediction"] for row in predictions if row["question"] == question)
    assert asked.returncode == 0 and f"Answer: {expected}\n" in asked.stdout

    refused = run_cli(*train_args(tiny_opt, memory_data, tmp_path / "x", "--delta_type", "ia3", "--lora_r", "4"),
                      env=env, cwd=with_ia3)
    assert refused.stderr.strip().splitlines()[-1] == ("error: --lora_r does not apply to --delta_type ia3 (only "
                                                      "to lora); drop it")
    assert sys.modules["optqa.config"].DELTA_TYPES == DELTA_TYPES  # the copy never touched this process
