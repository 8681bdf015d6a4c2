"""Issue 27, item 4: GGUF files as backbones. A tiny random Llama (grouped-query attention) with a BPE tokenizer is
written as GGUF with the ``gguf`` package's writer, the way llama.cpp's converter writes one; optqa loads it through
transformers' GGUF support, dequantised once into a cache folder, trains on it, and refuses another file."""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import MEMORY_SET, sample_texts, train_args

import optqa.gguf
from optqa.checkpoints import format as ckpt
from optqa.cli import main
from optqa.errors import OptqaError
from optqa.gguf import CACHE_ENV, readable_architectures
from optqa.plm import backbone_max_positions, load_plm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256}
CONTROL, NORMAL = 3, 1  # llama.cpp's token types


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each head's q/k rows (rotary halves interleaved); transformers undoes it."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(model, tokenizer_folder: Path, path: Path) -> Path:
    """``model`` (a LlamaForCausalLM) and its byte-level BPE tokenizer as an F32 GGUF file, keyed as
    transformers' ``integrations/ggml.py`` and ``integrations/gguf/gguf_tokenizer_mapping.py`` read them."""
    import gguf

    config = model.config
    vocab = json.loads((tokenizer_folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [line for line in (tokenizer_folder / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#")]
    tokens = sorted(vocab, key=vocab.get)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(path.stem)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if token in ("<s>", "<pad>", "</s>", "<unk>") else NORMAL for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["</s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_pad_token_id(vocab["<pad>"])
    writer.add_unk_token_id(vocab["<unk>"])
    writer.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        weights = tensor.numpy()
        if name.endswith("q_proj.weight"):
            weights = llama_cpp_permute(weights, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weights = llama_cpp_permute(weights, config.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(module)}.{kind}", np.ascontiguousarray(weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(vocab: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), bos_token_id=vocab["</s>"], eos_token_id=vocab["</s>"],
                         pad_token_id=vocab["<pad>"], tie_word_embeddings=False, **TINY_LLAMA)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """tiny.gguf and other.gguf: the same tiny Llama shape and tokenizer, random weights of seeds 0 and 1."""
    from optqa.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("gguf")
    tokenizer = build_tokenizer(sample_texts(), folder / "tokenizer")
    vocab = json.loads((tokenizer / "vocab.json").read_text(encoding="utf-8"))
    source, other = tiny_llama(vocab, seed=0), tiny_llama(vocab, seed=1)
    return SimpleNamespace(tokenizer=tokenizer, source=source, path=write_gguf(source, tokenizer, folder / "tiny.gguf"),
                           other=write_gguf(other, tokenizer, folder / "other.gguf"))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "gguf-cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


@pytest.fixture
def calls(monkeypatch) -> dict:
    """How often the file is hashed and dequantised."""
    counted = {"hashed": 0, "dequantised": 0}

    def counting(name, key):
        real = getattr(optqa.gguf, name)

        def wrapper(*args, **kwargs):
            counted[key] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(optqa.gguf, name, wrapper)
    counting("file_sha256", "hashed")
    counting("dequantize", "dequantised")
    return counted


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_gguf_file_loads_with_the_source_weights_and_tokenizer(ggufs, cache):
    from transformers import AutoTokenizer

    plm, tokenizer, model_config, _ = load_plm("llama", str(ggufs.path))
    assert (type(plm).__name__, model_config.num_key_value_heads) == ("LlamaForCausalLM", 2)
    expected = ggufs.source.state_dict()
    loaded = plm.state_dict()
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)  # exact, q/k un-permuted
    # the file's 1000 tokens and no more (transformers' GPT-2 default <|endoftext|> dropped): no embedding resize
    assert len(tokenizer) == plm.get_input_embeddings().num_embeddings == 1000
    reference = AutoTokenizer.from_pretrained(ggufs.tokenizer)
    for text in sample_texts()[:20]:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "</s>", "<pad>")
    folder = cache / sha256_of(ggufs.path)
    assert sorted(p.name for p in cache.iterdir()) == sorted([folder.name, "index"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "optqa_gguf.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "optqa_gguf.json").read_text()) == {
        "file": "tiny.gguf", "size": ggufs.path.stat().st_size, "sha256": folder.name, "architecture": "llama"}


def test_the_second_load_reads_the_cache_without_hashing_or_dequantising(ggufs, cache, calls):
    load_plm("llama", str(ggufs.path))
    assert calls == {"hashed": 1, "dequantised": 1}
    folder = cache / sha256_of(ggufs.path)
    written = folder.stat().st_mtime_ns
    load_plm("llama", str(ggufs.path))
    assert calls == {"hashed": 1, "dequantised": 1}  # the recorded (path, size, mtime, inode) -> SHA-256
    assert folder.stat().st_mtime_ns == written
    # a touched file is hashed again; same bytes, same cache folder
    stat = ggufs.path.stat()
    os.utime(ggufs.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_plm("llama", str(ggufs.path))
    assert calls == {"hashed": 2, "dequantised": 1}
    assert sorted(p.name for p in cache.iterdir()) == sorted([folder.name, "index"])  # no partial folder left


def test_an_interrupted_dequantisation_leaves_no_cache(ggufs, cache, monkeypatch):
    real = optqa.gguf.dequantize

    def interrupted(path, architecture, folder):
        real(path, architecture, folder)  # the model and tokenizer are written, the rename is not reached
        raise KeyboardInterrupt
    monkeypatch.setattr(optqa.gguf, "dequantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_plm("llama", str(ggufs.path))
    assert [p.name for p in cache.iterdir()] == ["index"]
    monkeypatch.setattr(optqa.gguf, "dequantize", real)
    plm, _, _, _ = load_plm("llama", str(ggufs.path))
    assert torch.equal(plm.lm_head.weight, ggufs.source.lm_head.weight)


def test_the_position_limit_is_read_from_the_header_before_any_dequantisation(ggufs, cache, calls, tmp_path):
    assert backbone_max_positions(str(ggufs.path)) == 256
    assert calls == {"hashed": 0, "dequantised": 0} and not cache.exists()
    load_plm("llama", str(ggufs.path))
    assert backbone_max_positions(str(ggufs.path)) == 256  # now from the cache folder's config.json
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model\n")
    assert backbone_max_positions(str(not_gguf)) is None  # the load then says why


def refusal(*argv: str, capsys) -> str:
    """The one error line ``python -m optqa`` prints for ``argv`` (exit status 2)."""
    assert main(list(argv)) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_file_that_is_not_gguf_is_refused_in_one_line(memory_data, tmp_path, capsys):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model\n")
    assert refusal(*train_args(not_gguf, memory_data, tmp_path), capsys=capsys) == (
        f"error: {not_gguf.resolve()} is not a GGUF file (it does not start with the GGUF magic bytes); --plm_path "
        "takes a Hugging Face model folder, a hub id or a .gguf file")


def test_an_architecture_transformers_cannot_read_is_refused_in_one_line(memory_data, tmp_path, capsys):
    import gguf
    import transformers

    path = tmp_path / "pythia.gguf"
    writer = gguf.GGUFWriter(path, "gptneox")  # llama.cpp's name for GPT-NeoX (Pythia); no GGUF reader in transformers
    writer.add_name("pythia")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    readable = readable_architectures()
    assert "llama" in readable and "gptneox" not in readable
    assert refusal(*train_args(path, memory_data, tmp_path), capsys=capsys) == (
        f"error: {path.resolve()}: GGUF architecture 'gptneox' is not one transformers {transformers.__version__} "
        f"reads ({', '.join(readable)})")


def test_trains_and_answers_from_the_cli_and_refuses_another_gguf_file(ggufs, memory_data, tmp_path, cache, capsys,
                                                                       caplog, monkeypatch):
    from optqa.build import load_trained

    # python -m optqa's main, in this process (no interpreter start-up)
    assert main(train_args(ggufs.path, memory_data, tmp_path, "--delta_type", "lora", "--modified_modules",
                           "self_attn.q_proj", "self_attn.v_proj", "--train_epochs", "1", "--lr", "3e-2",
                           "--max_new_tokens", "4", "--precision", "fp32")) == 0
    checkpoint = tmp_path / "delta_ckpts"
    manifest = json.loads((checkpoint / ckpt.MANIFEST_NAME).read_text())
    sha = sha256_of(ggufs.path)
    assert manifest["backbone"]["gguf"] == {"file": "tiny.gguf", "sha256": sha}
    assert manifest["backbone"]["name_or_path"] == str(ggufs.path.resolve())
    assert [p.name for p in cache.iterdir() if p.name != "index"] == [sha]
    capsys.readouterr()
    assert main(["--mode", "inspect", "--delta_save_path", str(checkpoint)]) == 0
    assert [line.split(None, 2)[2] for line in capsys.readouterr().out.splitlines()
            if line.startswith("gguf file ")] == [f"tiny.gguf (SHA-256 {sha})"]

    question = MEMORY_SET[2][0]
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(question + "\nquit()\n"))
    assert main(["--mode", "interactive_inference", "--delta_save_path", str(checkpoint), "--precision", "fp32"]) == 0
    model, _, _ = load_trained(checkpoint, overrides={"precision": "fp32"})
    expected = model.answer([question])[0]
    assert f"Answer: {expected}" in capsys.readouterr().out.splitlines()

    other = sha256_of(ggufs.other)
    message = (f"this delta was made for GGUF file tiny.gguf (SHA-256 {sha[:12]}), the loaded backbone is another "
               f"GGUF file, other.gguf (SHA-256 {other[:12]})")
    assert refusal("--mode", "interactive_inference", "--delta_save_path", str(checkpoint), "--plm_path",
                   str(ggufs.other), capsys=capsys) == f"error: {message}; pass --ignore_backbone_mismatch to load it anyway"
    # --ignore_backbone_mismatch overrides it as it overrides another fingerprint: loaded, with the reason logged
    with pytest.raises(OptqaError, match="another GGUF file"):
        load_trained(checkpoint, plm_path=str(ggufs.other))
    model, _, config = load_trained(checkpoint, plm_path=str(ggufs.other), ignore_backbone_mismatch=True)
    assert config.plm_path == str(ggufs.other)
    assert f"{message}; loading anyway (--ignore_backbone_mismatch)" in caplog.messages


def test_the_header_reads_alike_with_the_gguf_packages_reader(ggufs, monkeypatch):
    """transformers before 5.25 has no header reader of its own: the gguf package's GGUFReader reads the same."""
    from optqa.gguf import read_header

    assert read_header(ggufs.path) == ("llama", 1000)
    monkeypatch.setitem(sys.modules, "transformers.integrations.gguf", None)  # its import now fails
    assert read_header(ggufs.path) == ("llama", 1000)
