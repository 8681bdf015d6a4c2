"""GGUF files (llama.cpp, Ollama) as backbones: read by transformers' GGUF support, dequantised once into a cache.

transformers reads a ``.gguf`` file with ``from_pretrained(folder, gguf_file=name)``, dequantising every tensor on
each load (tens of seconds for a 135M-parameter model on two cores). optqa does that once per file content: the
dequantised model is written as a normal Hugging Face folder (safetensors, config, tokenizer) under
``<cache root>/<sha256 of the file>/``, so every later start loads that folder like any other backbone.

The cache root is ``$OPTQA_GGUF_CACHE`` if set, else ``$XDG_CACHE_HOME/optqa/gguf`` (``~/.cache/optqa/gguf``).
A cache folder appears only complete: it is written under a temporary name beside it and renamed into place, so
an interrupted dequantisation leaves no half cache (at most a ``.partial-*`` folder, never read, safe to delete).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

from optqa.errors import OptqaError

log = logging.getLogger(__name__)

CACHE_ENV = "OPTQA_GGUF_CACHE"
GGUF_MAGIC = b"GGUF"
# what the cache folder records about its source file (beside the model's own files)
SOURCE_RECORD = "optqa_gguf.json"
# hashing a file this small takes less time than drawing a progress bar for it
PROGRESS_FROM_BYTES = 16 << 20


def is_gguf_path(model_path: str | Path) -> bool:
    """Whether ``--plm_path`` names a local file (a GGUF file or meant as one) rather than a folder or hub id.

    Any existing file counts: a Hugging Face backbone is a folder, so a file is either GGUF or refused as not GGUF.
    """
    return Path(model_path).expanduser().is_file()


def cache_root() -> Path:
    """``$OPTQA_GGUF_CACHE``, else ``$XDG_CACHE_HOME/optqa/gguf``, else ``~/.cache/optqa/gguf``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "optqa" / "gguf"


def readable_architectures() -> list[str]:
    """The GGUF ``general.architecture`` values the installed transformers reads (its config mappings)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # sections of its mapping, not models
    try:  # transformers >= 5.25 rebuilds some configs on a second path
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
        names |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def check_magic(path: Path) -> None:
    """Raises OptqaError unless ``path`` starts with GGUF's magic bytes (read before hashing any other file)."""
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise OptqaError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); --plm_path "
                             "takes a Hugging Face model folder, a hub id or a .gguf file")


def read_header(path: Path) -> tuple[str, int]:
    """The file's ``general.architecture`` and how many tokens its vocabulary lists, read from its header alone.

    transformers >= 5.25 has a header reader that counts string arrays without decoding them (50 ms for
    SmolLM2's 49,152 tokens); older versions get the ``gguf`` package's ``GGUFReader``, which decodes them all (5 s).

    Raises:
        OptqaError: the file is not GGUF (no ``GGUF`` magic bytes) or its header cannot be read.
    """
    check_magic(path)
    try:
        architecture, tokens = _header_fields(path)
    except (ValueError, OSError, IndexError, struct.error) as exc:  # a truncated or damaged header
        raise OptqaError(f"{path}: unreadable GGUF header ({exc})") from None
    if not isinstance(architecture, str):
        raise OptqaError(f"{path}: the GGUF header names no general.architecture")
    return architecture, tokens


def _header_fields(path: Path) -> tuple[str | None, int]:
    try:
        from transformers.integrations.gguf import read_gguf_metadata
    except ImportError:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        architecture, tokens = fields.get("general.architecture"), fields.get("tokenizer.ggml.tokens")
        return (architecture.contents() if architecture else None), len(tokens.data) if tokens else 0
    metadata, _ = read_gguf_metadata(str(path))
    tokens = metadata.get("tokenizer.ggml.tokens", 0)
    return metadata.get("general.architecture"), len(tokens) if isinstance(tokens, list) else int(tokens)


def file_sha256(path: Path) -> str:
    """The SHA-256 of ``path``, with a progress bar for files of 16 MiB and more.

    Args:
        path: the file.
    Returns:
        Lowercase hex digest.
    """
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle, tqdm(total=size, unit="B", unit_scale=True, desc=f"hashing {path.name}",
                                         leave=False, disable=size < PROGRESS_FROM_BYTES) as bar:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _stat_key(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _index_file(path: Path) -> Path:
    return cache_root() / "index" / f"{hashlib.sha256(str(path).encode()).hexdigest()}.json"


def gguf_sha256(path: str | Path) -> str:
    """The SHA-256 of a GGUF file, hashed once per version of the file.

    Hashing a file of hundreds of MB on every start would cost what the cache saves, so the digest is recorded
    under the file's absolute path with its size, modification time (ns) and inode, and reused while all four
    are unchanged: writers (downloads, copies, llama.cpp's quantiser) change the mtime or replace the inode, so
    only a deliberate rewrite that restores size, mtime and inode would be missed (make's and rsync's quick
    check rest on the same assumption).

    Args:
        path: the GGUF file.
    Returns:
        The file's SHA-256, lowercase hex.
    """
    path = Path(path).expanduser().resolve()
    sha = _recorded_sha256(path)
    if sha is None:
        sha = file_sha256(path)
        _write_atomically(_index_file(path), json.dumps({**_stat_key(path), "sha256": sha}))
    return sha


def _recorded_sha256(path: Path) -> str | None:
    """The digest recorded for this version of ``path`` (see ``gguf_sha256``); None: none, stale or damaged."""
    key = _stat_key(path)
    try:
        recorded = json.loads(_index_file(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    sha = recorded.get("sha256") if isinstance(recorded, dict) else None
    return sha if isinstance(sha, str) and {k: recorded.get(k) for k in key} == key else None


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(temp, path)


def gguf_identity(path: str | Path) -> dict:
    """What a checkpoint records about a GGUF backbone file: ``{"file": name, "sha256": digest}``."""
    return {"file": Path(path).name, "sha256": gguf_sha256(path)}


def dequantized_folder(path: str | Path) -> Path:
    """The Hugging Face folder holding ``path``'s dequantised model, written on first use.

    Args:
        path: a GGUF file.
    Returns:
        ``<cache root>/<sha256>``: config.json, model.safetensors (float32), tokenizer files and
        ``optqa_gguf.json`` (the source file's name, size, SHA-256 and architecture).
    Raises:
        OptqaError: the file is not GGUF, or transformers cannot read its architecture or tokenizer.
    """
    path = Path(path).expanduser().resolve()
    check_magic(path)
    folder = cache_root() / gguf_sha256(path)
    if (folder / SOURCE_RECORD).is_file():  # only a GGUF file's folder is ever written: no header to read again
        log.info("GGUF %s: dequantised copy found in %s", path.name, folder)
        return folder
    architecture, tokens = read_header(path)
    log.info("GGUF %s (%s): dequantising once into %s", path.name, architecture, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        dequantize(path, architecture, partial)
        keep_the_files_vocabulary(partial, tokens)
        (partial / SOURCE_RECORD).write_text(json.dumps(
            {"file": path.name, "size": path.stat().st_size, "sha256": folder.name, "architecture": architecture},
            indent=2), encoding="utf-8")
        try:
            partial.rename(folder)
        except OSError:
            if not (folder / SOURCE_RECORD).is_file():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone after the rename; removed on any failure
    return folder


def dequantize(path: Path, architecture: str, folder: Path) -> None:
    """Read a GGUF file with transformers (config, tokenizer, weights) and save it into ``folder`` as safetensors.

    Weights are dequantised to float32 (every GGUF block type's values are exact there). Progress: transformers'
    own bar over the file's tensors.

    Raises:
        OptqaError: transformers does not read this architecture, or cannot read the file's config or tokenizer.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    try:
        config = AutoConfig.from_pretrained(**where)
    except ValueError as exc:
        readable = readable_architectures()
        if architecture not in readable:
            raise OptqaError(f"{path}: GGUF architecture {architecture!r} is not one transformers "
                             f"{transformers.__version__} reads ({', '.join(readable)})") from None
        raise OptqaError(f"{path}: transformers cannot read this GGUF file's config: "
                         f"{str(exc).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        # the config read above is passed on: each reading of a header takes seconds on transformers' older path
        plm = AutoModelForCausalLM.from_pretrained(**where, config=config, dtype=torch.float32, **_dense_loading())
    except (OSError, ValueError, KeyError) as exc:
        raise OptqaError(f"{path}: transformers cannot load this {architecture} GGUF file: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    quantizer = getattr(plm, "hf_quantizer", None)
    if quantizer is not None:
        # every weight is a plain dense tensor now (_dense_loading): the quantizer's record only blocks saving
        quantizer.remove_quantization_config(plm)
    plm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def keep_the_files_vocabulary(folder: Path, size: int) -> None:
    """Drop the tokens a saved GGUF tokenizer holds beyond the file's vocabulary (ids ``size`` and up).

    transformers builds a byte-level GGUF tokenizer from ``GPT2Tokenizer``, whose defaults add ``<|endoftext|>``
    when the file lacks it (Llama 3's vocabulary does, among others): one token past the model's embeddings, for
    which ``load_plm`` would grow them by a randomly initialised row on every load, so the weights (and their
    fingerprint) would differ from start to start. The file's own tokens are all kept.

    Args:
        folder: a folder written by ``tokenizer.save_pretrained`` (``tokenizer.json``, ``tokenizer_config.json``).
        size: the number of tokens the GGUF file lists.
    """
    path = folder / "tokenizer.json"
    if not path.is_file() or not size:
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    extra = {token["content"] for token in data.get("added_tokens", []) if token["id"] >= size}
    if not extra:
        return
    log.info("dropping tokens the GGUF file does not list: %s", ", ".join(sorted(extra)))
    data["added_tokens"] = [token for token in data["added_tokens"] if token["id"] < size]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key, value in list(config.items()):
        if isinstance(value, str) and value in extra:
            del config[key]  # a special-token role the file never gave that token
        elif isinstance(value, list) and any(isinstance(v, str) and v in extra for v in value):
            config[key] = [v for v in value if v not in extra]
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def _dense_loading() -> dict:
    """transformers >= 5.25 may keep GGUF blocks packed for its kernels (not trainable, not saveable): ask for
    dense weights; older versions always dequantise."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def gguf_config_source(path: str | Path) -> tuple[str, dict]:
    """Where ``AutoConfig`` reads a GGUF backbone's config without dequantising: the cache folder when it exists,
    else the file's own header. Returns ``(pretrained_model_name_or_path, extra from_pretrained kwargs)``."""
    path = Path(path).expanduser().resolve()
    sha = _recorded_sha256(path)
    if sha is not None and (cache_root() / sha / SOURCE_RECORD).is_file():
        return str(cache_root() / sha), {}
    return str(path.parent), {"gguf_file": path.name}
