"""Every delta type on every backbone family of ``optqa.families``, with default flags (no --modified_modules).

Each case builds a tiny random model of the family from its transformers config (``optqa.tiny.build_family``:
grouped-query attention for Llama, Mistral, Qwen and Phi-3, multi-query attention with a set head size for
Gemma, Conv1D for GPT-2), trains the delta, saves it, noises the saved weights (a briefly trained delta changes
few answers, so a delta dropped on reload would go unnoticed), reloads it from the checkpoint alone, and checks
that the batched KV-cache answers (left padded, one batch) equal the reference that runs the full forward pass
without a cache, one question at a time (``tests/test_reference_decoder.py``), also on the answering path
without PEFT (merged LoRA, plain prompt table). Where PEFT has the method, the PEFT export answers the same in
PEFT's own forward pass and imports back.

The full matrix is marked ``families``: ``python -m pytest -m families tests/test_families.py``. By default a
slice runs: Llama (grouped-query) and GPT-2 (Conv1D) with all five types, every other family with the type that
meets its odd part.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import sample_texts, train_in_process
from test_reference_decoder import QUESTIONS, decode, reference_answer

from optqa.config import DELTA_TYPES
from optqa.data import InputExample, collate_for_generation
from optqa.families import FAMILIES, FAMILY_NAMES, family_of, kv_layout
from optqa.tiny import FAMILY_SHAPES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the default slice: each family with the delta type that meets its odd part
SLICE = {("llama", d) for d in DELTA_TYPES} | {("gpt2", d) for d in DELTA_TYPES} | {
    ("mistral", "prefix"),        # grouped-query attention in the prefix's cache
    ("qwen2", "adapter"),         # biased q/k/v projections, adapter on attn and mlp.down_proj
    ("qwen3", "bitfit"),          # per-head q_norm / k_norm RMSNorms get biases of the head size
    ("gemma2", "soft_prompt"),    # embeddings scaled inside the embedding module
    ("gemma3_text", "prefix"),    # multi-query attention, head size set apart from hidden / heads
    ("phi3", "lora"),             # fused qkv_proj
    ("gpt_neox", "lora"),         # fused query_key_value, partial rotary
}
CASES = [pytest.param(f, d, marks=() if (f, d) in SLICE else pytest.mark.families, id=f"{f}-{d}")
         for f in FAMILY_SHAPES for d in DELTA_TYPES]
PEFT_METHODS = ("lora", "soft_prompt", "prefix")
_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """``model_type -> folder`` of its tiny random model, each built once when first asked for."""
    from optqa.tiny import build_family

    def get(model_type: str) -> Path:
        if model_type not in _BUILT:
            _BUILT[model_type] = build_family(model_type, tmp_path_factory.mktemp(model_type), sample_texts())
        return _BUILT[model_type]
    return get


# Gemma's tiny model (its embeddings scaled, four norms per layer) is fragile: a few steps at 1e-2 or the full
# noise of tests/test_reference_decoder.py on an adapter or BitFit make it answer every question alike
LR = {"gemma2": "1e-3", "gemma3_text": "1e-3"}
NOISE = {"gemma2": 0.05, "gemma3_text": 0.05}


def noise_checkpoint(folder: Path, scale: float) -> None:
    """Re-save the checkpoint with its delta weights noised (as tests/test_reference_decoder.py noises them, times
    ``scale``)."""
    from optqa.checkpoints.format import read_checkpoint, save_checkpoint

    folder, manifest, state = read_checkpoint(folder)
    generator = torch.Generator().manual_seed(0)
    noised = {k: v + torch.randn(v.shape, generator=generator) * (0.5 if v.dim() > 1 else 0.2) * scale
              for k, v in state.items()}
    save_checkpoint(folder, noised, {k: v for k, v in manifest.items() if k != "files"})


def first_step_logits(model, batch) -> torch.Tensor:
    """``(batch, vocab)`` logits of the first answer token, from optqa's batched, cached pass over the prompts."""
    with torch.no_grad(), model.running():
        inputs = model.backbone_inputs(batch["input_ids"], batch["attention_mask"], use_cache=True,
                                       soft_index=batch["soft_index"])
        return model.backbone(**inputs, logits_to_keep=1).logits[:, -1].float()


def batched_answers(model) -> list[str]:
    """All of QUESTIONS in one left-padded batch, through optqa's KV-cache decoder."""
    encoded = [model.wrapper.encode(InputExample(guid=i, text_a=q), i) for i, q in enumerate(QUESTIONS)]
    batch = collate_for_generation(encoded, model.tokenizer.pad_token_id)
    answers = dict(zip(batch["index"], model.generate_answers(batch)))
    return [answers[i] for i in range(len(QUESTIONS))]


@pytest.mark.parametrize("model_type,delta", CASES)
def test_every_delta_type_trains_reloads_and_answers_as_the_reference(backbones, memory_data, tmp_path, model_type,
                                                                      delta):
    from optqa.build import load_trained

    backbone = backbones(model_type)
    summary = train_in_process(backbone, memory_data, tmp_path, "--delta_type", delta, "--precision", "fp32",
                               "--lr", LR.get(model_type, "1e-2"), "--batch_size", "4", "--train_epochs", "3", "--max_new_tokens", "5")
    losses = [json.loads(line)["train_loss"] for line in (Path(summary.run_dir) / "metrics.jsonl").read_text()
              .splitlines() if '"epoch"' in line]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and min(losses[1:]) < losses[0], losses

    checkpoint = tmp_path / "delta_ckpts"
    noise_checkpoint(checkpoint, NOISE.get(model_type, 1.0))
    model, manifest, _ = load_trained(checkpoint)
    assert manifest["delta"]["delta_type"] == delta and model.max_new_tokens == 5
    reference = [reference_answer(model, q) for q in QUESTIONS]
    expected = [decode(model, ids) for ids, _ in reference]
    assert batched_answers(model) == expected
    assert sum(bool(a) for a in expected) >= len(QUESTIONS) // 2, expected
    # the answers depend on the question (most families: several distinct answers; Gemma's fragile tiny model
    # may give one answer to all, but not one distribution), so the comparisons below bite
    firsts = torch.stack([logits for _, logits in reference])
    assert (firsts - firsts[0]).abs().amax() > 0.1
    assert model_type in NOISE or len(set(expected)) > 3, expected
    # step 1's logits of the batched, cached pass against the reference's
    encoded = [model.wrapper.encode(InputExample(guid=i, text_a=q), i) for i, q in enumerate(QUESTIONS)]
    batch = collate_for_generation(encoded, model.tokenizer.pad_token_id)
    first = first_step_logits(model, batch)
    for row, index in enumerate(batch["index"]):
        torch.testing.assert_close(first[row], reference[index][1], rtol=1e-3, atol=1e-3)

    # the answering path without PEFT (LoRA merged into the weights, a soft prompt or prefix as a plain table)
    fast, _, _ = load_trained(checkpoint, merge_lora=True, answer_only=True)
    assert batched_answers(fast) == expected
    assert_int8_answers(fast)

    if delta in PEFT_METHODS:
        assert_peft_round_trip(checkpoint, backbone, model, reference, expected, tmp_path)


def assert_int8_answers(model) -> None:
    """The int8 backbone (optqa.quantize) answers: every frozen nn.Linear runs on int8 (GPT-2's Conv1D layers
    stay float) and changes the logits, and undoing it gives fp32's back exactly. (How close int8 stays to fp32
    is measured on OPT in tests/test_quantize.py: these random large-weight models amplify any rounding.)"""
    from optqa import quantize

    encoded = [model.wrapper.encode(InputExample(guid=i, text_a=q), i) for i, q in enumerate(QUESTIONS[:8])]
    batch = collate_for_generation(encoded, model.tokenizer.pad_token_id)
    fp32 = first_step_logits(model, batch)
    linears = [m for m in model.plm.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    assert quantize.quantize_int8(model.plm)["layers"] == len(linears) > 0
    int8 = first_step_logits(model, batch)
    assert torch.isfinite(int8).all() and not torch.equal(int8, fp32)
    assert len(batched_answers(model)) == len(QUESTIONS)
    quantize.dequantize(model.plm)
    assert torch.equal(first_step_logits(model, batch), fp32)


def assert_peft_round_trip(checkpoint: Path, backbone: Path, model, reference, expected: list[str],
                           tmp_path: Path) -> None:
    """The PEFT export computes the same logits in PEFT's own forward pass, and imports back to the same answers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from optqa.build import load_trained
    from optqa.sharing.export import export_checkpoint

    export_checkpoint(checkpoint, tmp_path / "shared.optqa")
    folder = tmp_path / "shared-peft"
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone), folder).eval()
    for question, (_, first_logits) in list(zip(QUESTIONS, reference))[:4]:
        ids = model.wrapper.encode(InputExample(guid=0, text_a=question)).prompt_ids
        with torch.no_grad():
            logits = theirs(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            use_cache=False).logits[0, -1].float()
        torch.testing.assert_close(logits, first_logits, rtol=1e-4, atol=1e-4)
    imported, manifest, _ = load_trained(folder, plm_path=str(backbone), overrides={"max_new_tokens": 5})
    assert manifest["imported_from"]["peft_type"] and batched_answers(imported) == expected


@pytest.mark.parametrize("model_type", list(FAMILY_SHAPES))
def test_the_family_table_names_modules_the_model_has(backbones, model_type):
    """Every name the table gives exists in the family's model, and the neutral names resolve as it says."""
    from transformers import AutoModelForCausalLM

    from optqa.deltas import resolve_modules

    plm = AutoModelForCausalLM.from_pretrained(backbones(model_type))
    family = family_of(plm)
    assert family is FAMILIES[model_type]
    modules = dict(plm.named_modules())
    layers = plm.config.get_text_config().num_hidden_layers
    assert len(modules[family.layers]) == layers
    inner = (family.attn, family.mlp_out, *family.projections, *family.qv, *family.norms)
    assert all(f"{family.layers}.{i}.{name}" in modules for i in range(layers) for name in inner)
    for name in FAMILY_NAMES:
        assert resolve_modules(plm, [name]) == [f"{family.layers}.{i}.{inner}" for inner in family.neutral(name)
                                                for i in range(layers)]
    # all_linear is every projection in the decoder layers (PEFT's all-linear), nothing left out
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D)
    linear = {n for n, m in modules.items() if n.startswith(family.layers + ".") and isinstance(m, kinds)}
    assert set(resolve_modules(plm, ["all_linear"])) == linear
    assert len(linear) == layers * len(family.neutral("all_linear"))
    # and LoRA takes them all (GPT-2's are all Conv1D, so PEFT's one fan_in_fan_out fits), then runs
    from optqa import AutoDeltaConfig, AutoDeltaModel

    before = plm(input_ids=torch.tensor([[2, 5, 6]])).logits
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": "lora", "modified_modules":
                                                                  ["all_linear"]}), backbone_model=plm)
    wrapped = {name.split(".lora_A.")[0].removeprefix("base_model.model.") for name in delta.delta_state_dict()
               if ".lora_A." in name}
    assert wrapped == linear
    with torch.no_grad():  # B starts at zero: the same logits until it trains
        torch.testing.assert_close(delta.backbone_model(input_ids=torch.tensor([[2, 5, 6]])).logits, before)
    # the KV cache's layout is the one the prefix fills: run the model once and look
    with torch.no_grad():
        cache = plm(input_ids=torch.tensor([[2, 5, 6]]), use_cache=True).past_key_values
    count, kv_heads, head_dim = kv_layout(plm.config)
    assert (len(cache.layers), *cache.layers[0].keys.shape[1:2], cache.layers[0].keys.shape[-1]) == (
        count, kv_heads, head_dim)


def test_a_neutral_name_on_a_family_outside_the_table_is_refused_in_one_line(tmp_path):
    from transformers import AutoModelForCausalLM, BloomConfig

    from optqa.deltas import bitfit_module_names, resolve_modules
    from optqa.errors import OptqaError

    plm = AutoModelForCausalLM.from_config(BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(OptqaError, match=re.escape(
            "modified_modules: 'mlp_out' is a family-neutral name and backbone type 'bloom' is not in optqa's family "
            "table (opt, gpt2, llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gemma3, phi3, gpt_neox); pass module names "
            "instead (names inside a layer: ")) as error:
        resolve_modules(plm, ["mlp_out"])
    assert "dense_4h_to_h" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(OptqaError, match=r"^bitfit: backbone type 'bloom' is not in optqa's family table .* pass "
                                         r"--modified_modules \(names inside a layer: .*self_attention"):
        bitfit_module_names(plm, None)
    assert resolve_modules(plm, ["self_attention"]) == ["transformer.h.0.self_attention"]  # short names still work


def test_the_families_page_holds_the_family_table():
    """docs/deltas.md holds the family table between its markers, exactly as optqa.families renders it."""
    from optqa.families import markdown_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "deltas.md").read_text(encoding="utf-8")
    table = page.split("<!-- families:start -->\n", 1)[1].split("<!-- families:end -->", 1)[0].strip()
    assert table == markdown_table().strip(), "paste the output of python -m optqa.families into docs/deltas.md"


def test_lora_on_gpt2s_conv1d_folds_as_pefts_merge(backbones):
    """fold_lora on Conv1D targets (weight stored (in, out)) gives PEFT's merged weights bit for bit."""
    from transformers import AutoModelForCausalLM

    from optqa.config import LoraConfig
    from optqa.deltas import AutoDeltaModel, fold_lora

    config = LoraConfig(modified_modules=["attn", "mlp_out"])
    plm = AutoModelForCausalLM.from_pretrained(backbones("gpt2"))
    delta = AutoDeltaModel.from_config(config, plm)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in delta.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    state = {name: param.detach().clone() for name, param in delta.named_parameters()}
    delta.model.merge_adapter()
    merged = {n: p.detach().clone() for n, p in delta.model.get_base_model().named_parameters() if "lora_" not in n}
    fresh = AutoModelForCausalLM.from_pretrained(backbones("gpt2"))
    fold_lora(config, fresh, state)
    ours = dict(fresh.named_parameters())
    names = [n.replace(".base_layer", "") for n in merged]
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"} <= set(names)
    for name, (_, weight) in zip(names, merged.items()):
        assert torch.equal(ours[name], weight), name
    assert not torch.equal(ours["transformer.h.0.attn.c_attn.weight"],
                           dict(AutoModelForCausalLM.from_pretrained(backbones("gpt2")).named_parameters())[
                               "transformer.h.0.attn.c_attn.weight"])


def test_every_delta_type_is_served_on_a_grouped_query_backbone(backbones, tmp_path):
    """``--mode serve`` with the five delta types on one Llama (grouped-query) backbone: the official openai client
    gets each delta's answers as ``load_trained`` gives them alone."""
    import openai
    from test_serve import start_cli_server

    from optqa.build import load_trained
    from optqa.tiny import build_random_checkpoint

    backbone = backbones("llama")
    paths = {delta: build_random_checkpoint(backbone, tmp_path / delta, delta, seed=1, max_new_tokens=5)
             for delta in DELTA_TYPES}
    process, url = start_cli_server("--deltas", *(f"{d}={p}" for d, p in paths.items()), "--precision", "fp32",
                                    "--quantize", "none")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        for delta, path in paths.items():
            alone = load_trained(path)[0].answer(QUESTIONS[:4])
            served = client.completions.create(model=delta, prompt=QUESTIONS[:4])
            assert [c.text for c in sorted(served.choices, key=lambda c: c.index)] == alone and any(alone), delta
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "Traceback" not in process.stderr.read()


def test_soft_tokens_start_from_the_embedding_modules_output_on_gemma(backbones):
    """Gemma scales its embedding rows by sqrt(hidden_size) inside the embedding module: a soft prompt's init text
    and a template's {"soft"} tokens start from that output (what they replace), not from the raw rows."""
    from optqa.config import SoftPromptConfig
    from optqa.deltas import AutoDeltaModel
    from optqa.plm import load_plm
    from optqa.template import ManualTemplate

    plm, tokenizer, _, _ = load_plm("gemma3_text", str(backbones("gemma3_text")))
    embedding = plm.get_input_embeddings()
    ids = tokenizer("Question:", add_special_tokens=False)["input_ids"]
    scaled = embedding(torch.tensor(ids)).detach()
    assert not torch.allclose(scaled, embedding.weight[ids])  # Gemma's scale is not 1
    template = ManualTemplate(tokenizer, '{"soft":"Question:"} {"placeholder":"text_a"} {"mask"}', embedding=embedding)
    assert torch.equal(template.soft_embeds.detach(), scaled)
    delta = AutoDeltaModel.from_config(SoftPromptConfig(soft_token_num=len(ids), init_text="Question:"), plm, tokenizer)
    assert torch.equal(delta.model.prompt_encoder["default"].embedding.weight.detach(), scaled)


@pytest.mark.parametrize("model_type", ["opt", "llama", "gpt2"])
def test_a_prefix_from_text_is_that_text_written_before_the_prompt(backbones, tiny_opt, model_type):
    """Li and Liang's init: the prefix holds the keys and values the backbone computes for the init text, so the
    first answer step with that prefix sees what the bare backbone sees with the text before the prompt."""
    from optqa.config import PrefixConfig
    from optqa.deltas import AutoDeltaModel
    from optqa.model import PromptForGeneration
    from optqa.plm import load_plm
    from optqa.template import ManualTemplate

    folder = tiny_opt if model_type == "opt" else backbones(model_type)
    plm, tokenizer, _, _ = load_plm(model_type, str(folder))
    init = tokenizer(" the sun is hot", add_special_tokens=False)["input_ids"]
    prompt = tokenizer(" What is ice?", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        alone = plm(input_ids=torch.tensor([init + prompt])).logits[0, -1]
    AutoDeltaModel.from_config(PrefixConfig(prefix_token_num=len(init), init_text=" the sun is hot"), plm, tokenizer)
    model = PromptForGeneration(plm, ManualTemplate(tokenizer, '{"placeholder":"text_a"}{"mask"}')).eval()
    with torch.no_grad():
        inputs = model.backbone_inputs(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), True)
        prefixed = model.backbone(**inputs).logits[0, -1]
    torch.testing.assert_close(prefixed, alone, atol=1e-4, rtol=1e-4)


def test_multimodal_gemma3_resolves_to_its_text_stack_only():
    """A Gemma 3 checkpoint with its vision tower (model_type gemma3): the neutral names and BitFit's default
    stay in the language model's layers (OpenDelta's short name self_attn would also match the vision tower's),
    and the KV layout is the text config's."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    from optqa.deltas import bitfit_module_names, resolve_modules

    text = {**FAMILY_SHAPES["gemma3_text"], "vocab_size": 300}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    plm = AutoModelForCausalLM.from_config(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    assert family_of(plm) is FAMILIES["gemma3"]
    assert resolve_modules(plm, ["attn", "mlp_out"]) == [f"model.language_model.layers.{i}.{name}"
                                                         for name in ("self_attn", "mlp.down_proj") for i in range(2)]
    assert any("vision_tower" in name for name in resolve_modules(plm, ["self_attn"]))
    assert all(name.startswith("model.language_model.layers.") for name in bitfit_module_names(plm, None))
    assert kv_layout(plm.config) == (2, 1, 32)
    # the length budget reads the position limit from the text config, where a multimodal config keeps it
    from optqa.plm import max_positions_of

    assert "max_position_embeddings" not in plm.config.to_dict()
    assert max_positions_of(plm.config.to_dict()) == plm.config.text_config.max_position_embeddings == 256
