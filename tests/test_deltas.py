"""Each delta type on the tiny OPT: parameter count by formula, frozen backbone, falling loss, faithful reload;
LoRA and the adapter memorise a tiny set; OpenDelta-style configuration errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from conftest import MEMORY_SET

from optqa.build import build_model, load_trained
from optqa.checkpoints.format import MANIFEST_NAME
from optqa.config import RunConfig
from optqa.data import InputExample, collate_for_training
from optqa.deltas import AutoDeltaConfig, AutoDeltaModel, is_delta_parameter, resolve_modules
from optqa.errors import OptqaError
from optqa.metrics import score
from optqa.plm import load_plm
from optqa.run import training as trainer
from optqa.run.folder import STEPS_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DELTA_TYPES = ("adapter", "lora", "bitfit", "soft_prompt", "prefix")
# the adapter plus a template's own {"soft":"..."} tokens, which train and save with the delta
SOFT_TEMPLATE = "templates/soft_answer_template.txt"
SOFT_TEMPLATE_WORDS = ("Answer the science question.", "Answer:")
QUESTIONS = [q for q, _ in MEMORY_SET]
GOLDS = [answers for _, answers in MEMORY_SET]


def expected_trainable(delta_type: str, shape: dict) -> int:
    """The hand formula for each delta type with its default settings (RunConfig's defaults)."""
    h, ffn, layers = shape["hidden_size"], shape["ffn_dim"], shape["num_hidden_layers"]
    if delta_type == "adapter":
        # bottleneck b=24 on the outputs of self_attn and fc2 (width h each): down h*b + b, up b*h + h
        b = 24
        return layers * 2 * (h * b + b + b * h + h)
    if delta_type == "lora":
        # rank r=8, A is r x in and B is out x r per Linear. The run uses --modified_modules' default
        # (self_attn fc2): q, k, v, out_proj (h -> h) and fc2 (ffn -> h)
        r = 8
        return layers * (4 * r * (h + h) + r * (ffn + h))
    if delta_type == "bitfit":
        # one bias per output unit of every Linear and LayerNorm inside a decoder layer:
        # q, k, v, out_proj (h each) + fc1 (ffn) + fc2 (h) + self_attn_layer_norm and final_layer_norm (h each)
        return layers * (4 * h + ffn + h + 2 * h)
    if delta_type == "soft_prompt":
        # 20 virtual tokens at the input embedding width (word_embed_proj_dim; = h for this shape)
        return 20 * shape["word_embed_proj_dim"]
    # prefix: 6 virtual key and value positions per layer, h wide each (PEFT's count without projection)
    return 6 * layers * 2 * h


@pytest.fixture(scope="module")
def shape(tiny_opt):
    return json.loads((tiny_opt / "config.json").read_text(encoding="utf-8"))


def run_config(tiny_opt, data, out, **values) -> RunConfig:
    settings = dict(plm_path=str(tiny_opt), data_path=str(data), delta_save_path=str(out / "delta_ckpts"),
                    raw_delta_save_path=str(out / "raw_delta_ckpts"), output_dir=str(out / "runs"),
                    precision="fp32", max_new_tokens=6, eval_batch_size=8, save_steps=0)
    return RunConfig(**{**settings, **values})


def backbone_tensors(model) -> dict[str, torch.Tensor]:
    state = {f"param:{n}": p for n, p in model.named_parameters() if not is_delta_parameter(n)}
    state.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    return {n: t.detach().clone() for n, t in state.items()}


@pytest.fixture(scope="module", params=DELTA_TYPES + ("adapter+soft_template",))
def trained(request, one_torch_thread, tiny_opt, memory_data, tmp_path_factory):
    """A real trainer.train() run per delta type, with the model it built captured for inspection."""
    delta_type, _, soft = request.param.partition("+")
    template = {"template": SOFT_TEMPLATE} if soft else {}
    out = tmp_path_factory.mktemp(f"train-{request.param}")
    captured = {}

    def capturing_build_model(config, *args, **kwargs):
        model, backbone = build_model(config, *args, **kwargs)
        captured.update(model=model, backbone=backbone_tensors(model),
                        delta={n: t.clone() for n, t in model.delta_state_dict().items()})
        return model, backbone

    # one optimiser step per epoch on the same 8 questions, so step losses are comparable; soft prompts and
    # prefixes need a larger step to move the loss within 4 steps
    config = run_config(tiny_opt, memory_data, out, delta_type=delta_type, batch_size=8, train_epochs=4,
                        lr=1e-1 if delta_type in ("soft_prompt", "prefix") else 1e-2, **template)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "build_model", capturing_build_model)
        summary = trainer.train(config)
    return {"type": delta_type, "soft_template": bool(soft), "config": config, "summary": summary, **captured}


def test_trainable_parameters_match_the_formula(trained, shape):
    model = trained["model"]
    expected = expected_trainable(trained["type"], shape)
    if trained["soft_template"]:
        # one input-width row per token of each {"soft":"..."} piece's words
        tokens = sum(len(model.tokenizer(words, add_special_tokens=False)["input_ids"])
                     for words in SOFT_TEMPLATE_WORDS)
        assert model.template.num_soft_tokens == tokens
        expected += tokens * shape["word_embed_proj_dim"]
    assert model.num_trainable_parameters() == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    soft_rows = model.template.num_soft_tokens * shape["word_embed_proj_dim"]
    assert model.delta.num_trainable_parameters() + soft_rows == expected
    manifest = json.loads((Path(trained["summary"].delta_save_path) / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["trainable_parameters"] == expected


def test_only_the_delta_changes(trained, tiny_opt):
    from safetensors.torch import load_file

    model = trained["model"]
    after = backbone_tensors(model)
    assert after.keys() == trained["backbone"].keys()
    changed = [n for n, t in after.items() if not torch.equal(t, trained["backbone"][n])]
    assert changed == [], f"backbone tensors changed by training: {changed[:5]}"
    # and against the weights on disk, so attaching the delta did not touch them either (PEFT renames a
    # wrapped Linear's weight to base_layer.weight)
    pristine = load_file(str(tiny_opt / "model.safetensors"))
    live = {n.replace("base_layer.", ""): t for n, t in model.backbone.state_dict().items()}
    assert pristine.keys() <= live.keys()
    assert [n for n, t in pristine.items() if not torch.equal(t, live[n])] == []
    delta_after = model.delta_state_dict()
    assert delta_after.keys() == trained["delta"].keys() and delta_after
    unchanged = [n for n, t in delta_after.items() if torch.equal(t, trained["delta"][n])]
    assert unchanged == [], f"delta tensors that training did not move: {unchanged[:5]}"


def test_loss_goes_down(trained):
    lines = (Path(trained["summary"].run_dir) / STEPS_NAME).read_text(encoding="utf-8").splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == 4
    # every step lowers the loss on the (same) batch; soft prompts and prefixes on a random backbone move it
    # slowest, by ~3% in these 3 steps
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.98 * losses[0], losses


def test_reloaded_delta_gives_identical_tensors_and_answers(trained):
    model = trained["model"]
    reloaded, manifest, _ = load_trained(trained["summary"].delta_save_path)
    assert manifest["delta"]["delta_type"] == trained["type"]
    saved, own = reloaded.delta_state_dict(), model.delta_state_dict()
    assert saved.keys() == own.keys()
    assert all(torch.equal(saved[n], own[n]) for n in own)
    model.eval()
    assert reloaded.answer(QUESTIONS) == model.answer(QUESTIONS)


def memorise(tiny_opt, steps: int, lr: float, **delta) -> tuple[dict, list[str]]:
    """Full-batch AdamW on MEMORY_SET through the library API, clipped and decayed like the trainer's (which
    makes the outcome stable across seeds); returns the scores and the answers."""
    set_seed(0)
    model, _ = build_model(run_config(tiny_opt, "unused", tiny_opt, lr=lr, **delta))
    examples = [InputExample(guid=i, text_a=q, tgt_text=a) for i, (q, a) in enumerate(MEMORY_SET)]
    batch = collate_for_training(model.wrapper.encode_all(examples, targets="first"), model.tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    for _ in range(steps):
        model(batch).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    answers = model.answer(QUESTIONS)
    return score(answers, GOLDS), answers


@pytest.mark.parametrize("steps, lr, delta", [
    (150, 2e-2, dict(delta_type="adapter", modified_modules=["self_attn", "fc1", "fc2"])),
    (150, 1e-2, dict(delta_type="lora", modified_modules=["self_attn", "fc1", "fc2"])),
], ids=["adapter", "lora"])
def test_memorises_a_tiny_set(tiny_opt, steps, lr, delta):
    scores, answers = memorise(tiny_opt, steps, lr, **delta)
    assert scores["f1"] >= 80, answers


@pytest.fixture(scope="module")
def fresh_plm(tiny_opt):
    def load():
        plm, tokenizer, _, _ = load_plm("opt", str(tiny_opt))
        return plm, tokenizer
    return load


def test_short_module_names_resolve_like_opendelta(fresh_plm):
    plm, _ = fresh_plm()
    layers = [f"model.decoder.layers.{i}" for i in range(2)]
    assert resolve_modules(plm, ["self_attn", "fc2"]) == (
        [f"{l}.self_attn" for l in layers] + [f"{l}.fc2" for l in layers])
    # a dotted short name matches on its last components; a full name matches itself
    assert resolve_modules(plm, ["self_attn.q_proj"]) == [f"{l}.self_attn.q_proj" for l in layers]
    assert resolve_modules(plm, ["model.decoder.layers.1.fc1"]) == ["model.decoder.layers.1.fc1"]
    # "self_attn" is not a suffix match of "self_attn_layer_norm"
    assert not any(n.endswith("layer_norm") for n in resolve_modules(plm, ["self_attn"]))


def test_library_defaults_per_delta_type(fresh_plm, shape):
    """AutoDeltaConfig's own defaults (LoraConfig): LoRA on q_proj and v_proj, r=8."""
    plm, tokenizer = fresh_plm()
    delta = AutoDeltaModel.from_config({"delta_type": "lora"}, backbone_model=plm, tokenizer=tokenizer)
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    assert delta.num_trainable_parameters() == layers * 2 * 8 * (h + h)


def test_lora_on_a_block_targets_the_linears_inside_it(fresh_plm):
    plm, tokenizer = fresh_plm()
    delta = AutoDeltaModel.from_config({"delta_type": "lora", "modified_modules": ["self_attn"], "lora_r": 4},
                                       backbone_model=plm, tokenizer=tokenizer)
    targets = sorted({n.split(".lora_A")[0].split("layers.0.")[1] for n in delta.delta_state_dict()
                      if "layers.0." in n and "lora_A" in n})
    assert targets == ["self_attn.k_proj", "self_attn.out_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert delta.num_trainable_parameters() == 2 * 4 * 4 * (64 + 64)


def test_unknown_module_lists_the_valid_names(fresh_plm):
    plm, tokenizer = fresh_plm()
    with pytest.raises(OptqaError) as info:
        AutoDeltaModel.from_config({"delta_type": "adapter", "modified_modules": ["attention"]}, backbone_model=plm,
                                   tokenizer=tokenizer)
    message = str(info.value)
    assert "'attention' matches no module" in message
    for name in ("self_attn", "q_proj", "v_proj", "fc1", "fc2", "final_layer_norm"):
        assert name in message


def test_unknown_module_lists_names_for_other_layouts_too():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32))
    with pytest.raises(OptqaError) as info:
        resolve_modules(gpt2, ["self_attn"])
    for name in ("attn", "c_attn", "c_proj", "mlp", "ln_1"):
        assert name in str(info.value)


def test_delta_config_errors():
    with pytest.raises(OptqaError, match=r"lora does not take bottleneck_dim \(it takes modified_modules, lora_r"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "bottleneck_dim": 8})
    with pytest.raises(OptqaError, match=r"unknown delta_type 'compacter' \(choose from adapter, lora"):
        AutoDeltaConfig.from_dict({"delta_type": "compacter"})
    with pytest.raises(OptqaError, match="needs 'delta_type'"):
        AutoDeltaConfig.from_dict({"lora_r": 8})
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 4, "opendelta_version": "0.3.2"})
    assert (config.lora_r, config.lora_alpha, config.modified_modules) == (4, 16, ["attn_qv"])


def test_the_neutral_defaults_are_the_homeworks_modules_on_opt(fresh_plm):
    """attn, mlp_out and attn_qv resolve on OPT to exactly the modules the defaults named before
    (self_attn, fc2, self_attn.q_proj + self_attn.v_proj): OPT's parameter names and answers stay as they were."""
    from optqa.deltas import resolve_modules

    plm, _ = fresh_plm()
    assert resolve_modules(plm, ["attn", "mlp_out"]) == resolve_modules(plm, ["self_attn", "fc2"]) == [
        f"model.decoder.layers.{i}.{name}" for name in ("self_attn", "fc2") for i in range(2)]
    assert resolve_modules(plm, ["attn_qv"]) == resolve_modules(plm, ["self_attn.q_proj", "self_attn.v_proj"])


def test_a_backbone_takes_one_delta(fresh_plm):
    plm, tokenizer = fresh_plm()
    AutoDeltaModel.from_config({"delta_type": "bitfit"}, backbone_model=plm, tokenizer=tokenizer)
    with pytest.raises(OptqaError, match="already carries a delta"):
        AutoDeltaModel.from_config({"delta_type": "lora"}, backbone_model=plm, tokenizer=tokenizer)


def _foreign_state(module: torch.nn.Module) -> dict:
    """What a module holds besides its submodules: attribute names and hooks by kind."""
    return {key: (len(value) if "hooks" in key else None) for key, value in vars(module).items() if key != "_modules"}


@pytest.mark.parametrize("delta", [{"delta_type": "adapter"}, {"delta_type": "bitfit"},
                                   {"delta_type": "adapter", "modified_modules": ["layers.0"]}])
def test_adapter_and_bitfit_are_wrapper_modules_that_keep_every_name(fresh_plm, delta):
    """No attribute, method or hook goes onto a backbone module: each modified module sits, unchanged, as the
    ``base_layer`` of an optqa wrapper in its place; the state dict's keys and order are those before wrapping
    plus the delta's, and it loads back."""
    from optqa.deltas import DELTA_ATTRIBUTE, DeltaAnchor, DeltaWrapper, attached_delta

    plm, tokenizer = fresh_plm()
    bare, _ = fresh_plm()
    before = list(plm.state_dict())
    originals = dict(plm.named_modules())
    model = AutoDeltaModel.from_config(delta, backbone_model=plm, tokenizer=tokenizer)
    wrappers = {n: m for n, m in plm.named_modules() if isinstance(m, DeltaWrapper)}
    assert wrappers and all(m.base_layer is originals[n] for n, m in wrappers.items())
    assert attached_delta(plm) is model and isinstance(getattr(plm, DELTA_ATTRIBUTE), DeltaAnchor)
    expected = {n: _foreign_state(m) for n, m in bare.named_modules()}
    for name, module in plm.named_modules():
        if not isinstance(module, (DeltaWrapper, DeltaAnchor)) and ".adapter." not in name + ".":
            assert _foreign_state(module) == expected[name.replace(".base_layer", "")], name
    assert list(dict(plm.named_children())) == [*dict(bare.named_children()), DELTA_ATTRIBUTE]
    state = plm.state_dict()
    assert [k for k in state if not is_delta_parameter(k)] == before
    assert sorted("backbone." + k for k in state if is_delta_parameter(k)) == sorted(
        n for n, _ in model.named_parameters())
    with torch.no_grad():
        for param in plm.parameters():
            param.add_(1.0)
    plm.load_state_dict(state)  # strict: every key finds its tensor again
    assert all(torch.equal(plm.state_dict()[k], v) for k, v in state.items())
    for wrapper in wrappers.values():  # what the backbone reads on the module it calls (fc2.weight) is the base's
        assert all(getattr(wrapper, n) is p for n, p in wrapper.base_layer.named_parameters(recurse=False))


def test_a_module_inside_another_cannot_both_carry_an_adapter(fresh_plm):
    plm, tokenizer = fresh_plm()
    with pytest.raises(OptqaError, match="modified_modules: 'model.decoder.layers.0.self_attn' lies inside "
                                         "'model.decoder.layers.0'; name one of them, not both"):
        AutoDeltaModel.from_config({"delta_type": "adapter", "modified_modules": ["layers.0", "self_attn"]},
                                   backbone_model=plm, tokenizer=tokenizer)


@pytest.mark.parametrize("delta_type", DELTA_TYPES)
def test_a_dropped_backbone_and_delta_are_freed(fresh_plm, delta_type):
    """The backbone keeps its delta alive (an optqa submodule), and nothing else keeps either."""
    import gc
    import weakref

    plm, tokenizer = fresh_plm()
    AutoDeltaModel.from_config({"delta_type": delta_type}, backbone_model=plm, tokenizer=tokenizer)
    from optqa.deltas import attached_delta

    delta = weakref.ref(attached_delta(plm))
    backbone = weakref.ref(plm)
    gc.collect()
    assert delta() is not None  # nobody holds the delta but its backbone
    del plm
    gc.collect()
    assert backbone() is None and delta() is None


def test_bitfit_from_opendelta_subtracts_the_wrapped_modules_own_bias(fresh_plm):
    from optqa.config import REGISTRY

    plm, tokenizer = fresh_plm()
    AutoDeltaModel.from_config({"delta_type": "bitfit"}, backbone_model=plm, tokenizer=tokenizer)
    own = plm.model.decoder.layers[0].fc1.base_layer.bias
    with torch.no_grad():
        own.fill_(0.25)
    trained = torch.full_like(own, 1.0)
    key, value = REGISTRY["bitfit"].implementation().from_opendelta(
        "model.decoder.layers.0.fc1.bias", trained, dict(plm.named_parameters()))
    assert key == "model.decoder.layers.0.fc1.bitfit_delta_bias" and torch.equal(value, torch.full_like(own, 0.75))
