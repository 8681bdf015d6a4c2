"""--quantize: int8 answers against fp32 for every delta type, a checkpoint answering alike on both backbones,
the refusal where the kernels are missing, and what the question loop imports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MEMORY_SET, REPO
from test_speed_paths import first_step_logits, make_model, train_a_little

from optqa import quantize, wrappers
from optqa.errors import OptqaError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = [q for q, _ in MEMORY_SET]
# int8 weights (per output row) and int8 activations (per call) move the first answer token's logits by at
# most this share of their largest magnitude (measured 1-5% on the tiny models below)
LOGIT_TOLERANCE = 0.08
# tiny_opt: 2 decoder layers x (q, k, v, out_proj, fc1, fc2) + the output head
TINY_LINEARS = 2 * 6 + 1
# how many steps and how fast each delta memorises MEMORY_SET on tiny_opt, where it can: BitFit's biases and
# a prefix barely move a random backbone's answers, so for them the logits are the measure
TRAINING = {"adapter": (100, 3e-2), "lora": (100, 3e-2), "bitfit": (40, 1e-1), "prefix": (40, 1e-1),
            "soft_prompt": (40, 1e-1)}


@pytest.mark.parametrize("delta", ["adapter", "lora", "bitfit", "prefix", "soft_prompt"])
def test_int8_answers_like_fp32_for_every_delta_type(tiny_opt, delta):
    model = make_model(tiny_opt, delta)
    steps, lr = TRAINING[delta]
    train_a_little(model, steps=steps, lr=lr)
    if delta == "lora":
        assert model.delta.merge_lora()  # as prepare_for_answering does before quantising
    delta_before = {k: v.clone() for k, v in model.delta_state_dict().items()}
    fp32_logits, fp32_answers = first_step_logits(model, QUESTIONS), model.answer(QUESTIONS)

    stats = quantize.quantize_int8(model.plm)
    assert stats["layers"] == TINY_LINEARS
    for wrapper in (m for m in model.plm.modules() if isinstance(m, quantize.Int8Linear)):
        # the Linear's own parameters under their names and nothing more: no delta hooks or extends a Linear
        assert {n: id(p) for n, p in wrapper.named_parameters()} == {
            n: id(p) for n, p in wrapper.base_layer.named_parameters()}
        assert not list(wrapper.children()) and not wrapper._forward_hooks and not wrapper.base_layer._forward_hooks
    int8_logits, int8_answers = first_step_logits(model, QUESTIONS), model.answer(QUESTIONS)

    error = (int8_logits - fp32_logits).abs().max() / fp32_logits.abs().max()
    assert 0 < error <= LOGIT_TOLERANCE  # int8 really ran, and stayed close
    assert torch.equal(int8_logits.argmax(-1), fp32_logits.argmax(-1))
    assert int8_answers == fp32_answers
    if delta in ("adapter", "lora"):  # memorised: the agreement is about real, distinct answers
        assert fp32_answers == [golds[0] for _, golds in MEMORY_SET]
    # the delta itself is untouched and stays fp32 and trainable; no delta module was quantised
    assert all(torch.equal(delta_before[k], v) and v.dtype == torch.float32
               for k, v in model.delta_state_dict().items())
    assert not any(isinstance(m, quantize.Int8Linear) for n, m in model.plm.named_modules()
                   if any(marker in n + "." for marker in ("lora_", ".adapter.", "prompt_encoder.")))

    # packing on one thread or several gives the same int8 model: the same logits, bit for bit
    quantize.dequantize(model.plm)
    quantize.quantize_int8(model.plm, workers=1)
    assert torch.equal(first_step_logits(model, QUESTIONS), int8_logits) and model.answer(QUESTIONS) == int8_answers

    quantize.dequantize(model.plm)
    assert torch.equal(first_step_logits(model, QUESTIONS), fp32_logits)  # back to exact fp32


def test_packing_is_bit_for_bit_torchs_dynamic_int8_linear(tiny_opt):
    """pack_int8 is a faster route to what torch's DynamicInt8Linear.from_float packs: the same int8 weights,
    scales and bias, and the same outputs, for every Linear (the head included, a row of zeros, and a row whose
    values fall on the halves between int8 steps, where the rounding mode decides)."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization.qconfig import per_channel_dynamic_qconfig

    model = make_model(tiny_opt, "adapter")
    layers = quantize.frozen_linears(model.plm)
    with torch.no_grad():
        layers[0][1].weight[3] = 0  # an all-zero row gets the observer's smallest scale, not a division by 0
        steps = torch.arange(layers[1][1].in_features) % 255 - 127  # -127 ... 127
        layers[1][1].weight[0] = (steps + 0.5) / 127.5  # scale 1/127.5: every value lands near k + 0.5
    quantize.quantize_int8(model.plm, workers=2)
    int8_layers = dict(model.plm.named_modules())
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, module in layers:
            module.qconfig = per_channel_dynamic_qconfig
            reference = DynamicInt8Linear.from_float(module)
            del module.qconfig
            int8 = int8_layers[name]  # in the Linear's place, holding its parameters
            assert isinstance(int8, quantize.Int8Linear) and int8.weight is module.weight, name
            ours = torch.ops.quantized.linear_unpack(int8.packed)
            theirs = torch.ops.quantized.linear_unpack(reference._packed_params._packed_params)
            assert torch.equal(ours[0].int_repr(), theirs[0].int_repr()), name
            assert torch.equal(ours[0].q_per_channel_scales(), theirs[0].q_per_channel_scales()), name
            assert (ours[1] is None and theirs[1] is None) or torch.equal(ours[1], theirs[1]), name
            hidden = torch.randn(2, 5, module.in_features)
            assert torch.equal(int8(hidden), reference(hidden)), name
    assert len(layers) == TINY_LINEARS


def test_the_output_head_is_quantised_through_its_tie(tiny_opt):
    model = make_model(tiny_opt, "adapter")
    head, embedding = model.plm.get_output_embeddings(), model.plm.get_input_embeddings()
    assert len(quantize.frozen_linears(model.plm, head=False)) == TINY_LINEARS - 1
    state_keys = set(model.backbone.state_dict())
    quantize.quantize_int8(model.plm)
    int8_head = model.plm.get_output_embeddings()
    assert isinstance(int8_head, quantize.Int8Linear) and int8_head.base_layer is head
    assert int8_head.weight is embedding.weight  # the tie is kept
    assert set(model.backbone.state_dict()) == state_keys and model.quantization == "int8"
    with pytest.raises(OptqaError, match="bfloat16 autocast does not apply"):
        model.autocast_dtype = torch.bfloat16
    quantize.dequantize(model.plm)
    assert model.plm.get_output_embeddings() is head and model.quantization == "none"


@pytest.mark.parametrize("delta", ["bitfit", "lora"])
def test_answering_sets_no_state_on_the_backbones_objects(tiny_opt, delta):
    """bf16 and int8 answering change how the frozen backbone computes only through optqa's wrapper modules in
    the Linear layers' places (optqa.wrappers): no transformers or PEFT module, and no tensor, gains an attribute
    or an assigned forward, and afterwards the module tree is the one it was, object for object."""
    model = make_model(tiny_opt, delta)
    modules, tensors = dict(model.plm.named_modules()), list(model.plm.parameters())
    attributes = {name: set(vars(module)) for name, module in modules.items()}
    marks = [set(vars(tensor)) for tensor in tensors]  # transformers' own (_is_hf_initialized)
    fp32 = model.answer(QUESTIONS[:4])
    model.autocast_dtype = torch.bfloat16
    model.answer(QUESTIONS[:4])
    assert isinstance(model.plm.get_output_embeddings(), wrappers.CastLinear)
    model.autocast_dtype = None
    model.answer(QUESTIONS[:4])  # the frozen weights back in fp32, the head back in its place
    quantize.quantize_int8(model.plm)
    assert model.answer(QUESTIONS[:4]) == fp32 and model.quantization == "int8"
    assert {name: set(vars(module)) for name, module in modules.items()} == attributes
    assert [set(vars(tensor)) for tensor in tensors] == marks
    quantize.dequantize(model.plm)
    assert dict(model.plm.named_modules()) == modules and model.quantization == "none"


# ------------------------------------------------------------------------------------------- resolution

def test_auto_is_int8_only_on_a_cpu_without_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(quantize, "cpu_has_native_bf16", lambda: False)
    assert quantize.resolve_quantize("auto", "auto", cpu) == "int8"
    assert quantize.resolve_quantize("auto", "bf16", cpu) == "none"  # an explicit precision is kept
    assert quantize.resolve_quantize("auto", "fp32", cpu) == "none"
    assert quantize.resolve_quantize("auto", "auto", cpu, sharded=True) == "none"
    assert quantize.resolve_quantize("auto", "auto", torch.device("cuda")) == "none"
    monkeypatch.setattr(quantize, "cpu_has_native_bf16", lambda: True)
    assert quantize.resolve_quantize("auto", "auto", cpu) == "none"
    assert quantize.resolve_quantize("int8", "auto", cpu) == "int8"
    with pytest.raises(OptqaError, match="cannot be combined with --precision bf16"):
        quantize.resolve_quantize("int8", "bf16", cpu)


def test_emulated_avx2_has_no_native_bf16(monkeypatch):
    from optqa import hardware as runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2": True, "avx512f": True, "avx512_bf16": True,
                                                        "amx": True, "vnni": True, "arm_bf16": False})
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert runtime.cpu_has_native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not runtime.cpu_has_native_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert not runtime.cpu_has_native_bf16()


def test_a_partial_kernel_cap_is_named_with_what_it_leaves_out(monkeypatch):
    from optqa import hardware

    for name in hardware.KERNEL_ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert hardware.describe_kernels() == "torch kernels AVX512"
    # the old emulation: ATen and oneDNN capped, fbgemm's int8 and MKL's fp32 matmuls still on AVX-512
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert hardware.describe_kernels() == ("torch kernels AVX2 (capped: ONEDNN_MAX_CPU_ISA=AVX2); not capped: "
                                           "ATEN_CPU_CAPABILITY, FBGEMM_ENABLE_INSTRUCTIONS, MKL_ENABLE_INSTRUCTIONS")


def test_benchmark_emulation_reruns_the_script_with_every_library_capped(tmp_path):
    """``--emulate avx2`` runs the script again in a process whose environment caps all four libraries (they read
    the caps when torch loads them), with the arguments and the exit status passed through."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
        "import common\n"
        "args = common.bench_parser('probe', 'quick', 'workdir').parse_args()\n"
        "common.emulate(args)\n"
        "from optqa.hardware import KERNEL_ISA_CAPS, describe_kernels\n"
        "print(json.dumps({'caps': {k: os.environ.get(k) for k in KERNEL_ISA_CAPS}, 'kernels': describe_kernels(),"
        " 'quick': args.quick}))\n"
        "sys.exit(3)\n")
    from optqa.hardware import KERNEL_ISA_CAPS

    env = {k: v for k, v in os.environ.items() if k not in KERNEL_ISA_CAPS}
    env["PYTHONPATH"] = str(REPO)
    for argv, capped in ((["--emulate", "avx2", "--quick"], True), (["--quick"], False)):
        done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env,
                              timeout=120, check=False)
        assert done.returncode == 3, done.stderr
        printed = json.loads(done.stdout.strip().splitlines()[-1])
        assert printed["quick"] is True
        if capped:
            assert printed["caps"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                       "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
            assert printed["kernels"] == ("torch kernels AVX2 (capped: ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA="
                                          "AVX2, FBGEMM_ENABLE_INSTRUCTIONS=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2)")
        else:
            assert set(printed["caps"].values()) == {None}
            assert "capped" not in printed["kernels"]


# ------------------------------------------------------------------------------------------- a checkpoint

def _trained_checkpoint(tiny_opt, folder: Path, delta: str) -> Path:
    """A delta that memorised MEMORY_SET, saved as a checkpoint by optqa's own writer."""
    from optqa.build import build_model
    from optqa.checkpoints.format import build_manifest, save_checkpoint
    from optqa.config import DELTA_CONFIGS, RunConfig

    torch.manual_seed(0)
    template = '{"placeholder":"text_a"} Answer: {"mask"}'
    # the library's default modules (LoRA: q_proj and v_proj), as make_model attaches them
    modules = DELTA_CONFIGS[delta]().to_dict()["modified_modules"]
    config = RunConfig(plm_path=str(tiny_opt), delta_type=delta, max_new_tokens=6, max_seq_l=64, eval_batch_size=8,
                       modified_modules=modules)
    model, backbone = build_model(config, template=template)
    train_a_little(model, steps=100, lr=3e-2)
    assert model.answer(QUESTIONS) == [golds[0] for _, golds in MEMORY_SET]  # real, distinct answers
    manifest = build_manifest(delta_config=model.delta.config.to_dict(), template_text=template, backbone=backbone,
                              hyperparameters=config.to_dict(), metrics={},
                              trainable_parameters=model.num_trainable_parameters())
    return save_checkpoint(folder / "delta_ckpts", model.delta_state_dict(), manifest)


@pytest.fixture(scope="module")
def checkpoints(tiny_opt, lively_opt, tmp_path_factory):
    """delta type -> its checkpoint, each built once, when a test first asks for it: an adapter or LoRA that
    memorised MEMORY_SET (``_trained_checkpoint``), or a soft prompt or prefix of random values on lively_opt
    (they barely train on a random backbone; these move its answers)."""
    from optqa.tiny import build_random_checkpoint

    built: dict[str, Path] = {}

    def checkpoint(delta: str) -> Path:
        if delta not in built:
            folder = tmp_path_factory.mktemp(f"int8-{delta}-ckpt")
            built[delta] = (_trained_checkpoint(tiny_opt, folder, delta) if delta in ("adapter", "lora") else
                            build_random_checkpoint(lively_opt, folder, delta, seed=3, max_new_tokens=6))
        return built[delta]
    return checkpoint


@pytest.fixture(scope="module")
def adapter_checkpoint(checkpoints):
    return checkpoints("adapter")


def _evaluate(checkpoint, memory_data, out, *extra):
    from optqa.cli import main

    assert main(["--mode", "evaluate", "--delta_save_path", str(checkpoint), "--data_path", str(memory_data),
                 "--output_dir", str(out), *extra]) == 0
    run = next(out.iterdir())
    rows = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    return [r["prediction"] for r in rows], metrics, json.loads((run / "config.json").read_text())


def test_a_checkpoint_answers_alike_on_int8_and_fp32_backbones(adapter_checkpoint, memory_data, tmp_path):
    fp32, metrics, config = _evaluate(adapter_checkpoint, memory_data, tmp_path / "fp32", "--precision", "fp32")
    assert metrics["quantize"] == config["quantize"] == "none"  # evaluate's default: the score is not the CPU's
    int8, metrics8, config8 = _evaluate(adapter_checkpoint, memory_data, tmp_path / "int8", "--quantize", "int8")
    assert metrics8["quantize"] == config8["quantize"] == "int8"
    assert fp32 == int8 == [golds[0] for _, golds in MEMORY_SET]
    assert metrics8["test_f1"] == metrics["test_f1"] == 100.0


def test_int8_refused_in_one_line_without_kernels(adapter_checkpoint, memory_data, tmp_path, monkeypatch, capsys):
    from optqa.cli import main

    monkeypatch.setattr(quantize, "_supported_engines", lambda: ["qnnpack"])
    code = main(["--mode", "evaluate", "--delta_save_path", str(adapter_checkpoint), "--data_path",
                 str(memory_data), "--output_dir", str(tmp_path), "--quantize", "int8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == ("error: --quantize int8: this PyTorch build has no int8 CPU kernels (quantized engines: "
                       "qnnpack; needs one of x86, fbgemm, onednn); use --quantize none")
    assert not list(tmp_path.iterdir())  # refused before any run folder was written
    monkeypatch.setattr(quantize, "cpu_has_native_bf16", lambda: False)
    assert quantize.resolve_quantize("auto", "auto", torch.device("cpu")) == "none"  # auto just stays fp32


QUESTION_LOOP = """
import io, json, sys
sys.stdin = io.StringIO(sys.argv[2])
from optqa.cli import main
code = main(["--mode", "interactive_inference", "--delta_save_path", sys.argv[1], "--quantize", "int8",
             "--num_threads", "1"])
print(json.dumps({"code": code, "loaded": sorted(m for m in ("peft", "optqa.run.training", "optqa.run.evaluation")
                                                 if m in sys.modules)}))
"""


@pytest.mark.parametrize("delta", ["adapter", "lora", "soft_prompt", "prefix"])
def test_question_loop_answers_on_int8_without_peft(delta, checkpoints):
    # accelerate is not in the list: transformers 5.24 imports it itself while loading any model, whenever it
    # is installed (transformers.integrations.accelerate), so it is part of the import-and-load floor. A LoRA
    # checkpoint is merged into the backbone without PEFT (deltas.fold_lora), a soft prompt or prefix is read
    # into a plain table (deltas.attach_prompt_table): each answers as the model built through PEFT does.
    from optqa.build import load_trained

    checkpoint = checkpoints(delta)
    with_peft = load_trained(checkpoint)[0]
    quantize.quantize_int8(with_peft.plm)
    expected = [with_peft.answer([question])[0] for question in QUESTIONS[:3]]  # one at a time, as the loop
    if delta in ("adapter", "lora"):
        assert expected == [golds[0] for _, golds in MEMORY_SET[:3]]
    assert all(expected) and len(set(expected)) == 3  # distinct answers: the comparison below means something
    questions = "\n".join(QUESTIONS[:3]) + "\nquit()\n"
    done = subprocess.run([sys.executable, "-c", QUESTION_LOOP, str(checkpoint), questions],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line for line in lines if line.startswith("Answer:")] == [f"Answer: {a}" for a in expected]
    assert json.loads(lines[-1]) == {"code": 0, "loaded": []}
    assert "Warning" not in done.stderr  # nothing but optqa's own lines
    assert "quantize int8: int8 backbone (13 Linear layers" in done.stderr
    if delta == "lora":  # q_proj and v_proj of 2 layers
        assert "LoRA merged into the backbone weights for answering (4 Linear layers)" in done.stderr


def test_training_scores_on_int8_only_when_asked(tiny_opt, memory_data, tmp_path):
    from conftest import train_in_process

    flags = ("--train_epochs", "2", "--lr", "3e-2", "--max_new_tokens", "3", "--eval_batch_size", "8")
    runs = {q: train_in_process(tiny_opt, memory_data, tmp_path / q, *flags, *(("--quantize", q) if q else ()))
            for q in ("", "int8")}
    for q, summary in runs.items():
        final = json.loads((Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()[-1])
        assert final["quantize"] == (q or "none")
        assert summary.best_epoch in (1, 2)
    # scoring on int8 after epoch 1 left training exactly as it was: the same loss at every step
    losses = [(Path(s.run_dir) / "train_loss.jsonl").read_text() for s in runs.values()]
    assert losses[0] == losses[1] and len(losses[0].splitlines()) == 2


def test_background_quantisation_answers_as_the_synchronous_one(adapter_checkpoint):
    from optqa.answering import prepare_for_answering, wait_until_ready
    from optqa.build import load_trained
    from optqa.config import RunConfig

    answers = {}
    for background in (False, True):
        model, _, _ = load_trained(adapter_checkpoint)
        assert prepare_for_answering(model, RunConfig(quantize="int8"), background=background) == "int8"
        wait_until_ready(model)
        assert model.quantization == "int8" and quantize.is_quantized(model.plm)
        answers[background] = model.answer(QUESTIONS)
    assert answers[True] == answers[False] == [golds[0] for _, golds in MEMORY_SET]


def test_packing_runs_on_as_many_threads_as_torch(tiny_opt, monkeypatch):
    # --num_threads 1 (configure_threads) keeps packing on one core too; by default torch has every usable CPU
    pack_all, workers = quantize._pack_all, []
    monkeypatch.setattr(quantize, "_pack_all", lambda tensors, n: workers.append(n) or pack_all(tensors, n))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        quantize.quantize_int8(make_model(tiny_opt, "adapter").plm)
    torch.set_num_threads(1)  # this module's setting (one_torch_thread)
    assert workers == [1, 2]


def test_served_deltas_share_one_int8_backbone(adapter_checkpoint):
    from optqa.serve import load_served

    served = load_served({"a": str(adapter_checkpoint), "b": str(adapter_checkpoint)}, quantize="int8")
    first, second = (s.model for s in served.values())
    assert first.quantization == second.quantization == "int8"
    packed = [[m.packed for m in s.model.plm.modules() if isinstance(m, quantize.Int8Linear)] for s in served.values()]
    assert len(packed[0]) == TINY_LINEARS and all(a is b for a, b in zip(*packed))  # packed once, used by both
    assert first.answer(QUESTIONS) == second.answer(QUESTIONS) == [golds[0] for _, golds in MEMORY_SET]
