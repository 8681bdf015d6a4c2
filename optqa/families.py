"""The backbone families optqa knows, in one table keyed by transformers' ``config.model_type``.

Each entry says where a family keeps what the deltas attach to, as the modules are named in transformers'
modeling files (transformers 5.25: ``models/opt/modeling_opt.py``, ``gpt2/modeling_gpt2.py``,
``llama/modeling_llama.py``, ``mistral/modeling_mistral.py``, ``qwen2/modeling_qwen2.py``,
``qwen3/modeling_qwen3.py``, ``gemma2/modeling_gemma2.py``, ``gemma3/modeling_gemma3.py``,
``phi3/modeling_phi3.py``, ``gpt_neox/modeling_gpt_neox.py``): the decoder layers, the attention block and its
projections, the MLP's output projection and the norms, all but the first named inside one layer.

From it, family-neutral module names resolve on any family in the table (``FAMILY_NAMES``): ``attn`` (the
attention block), ``mlp_out`` (the MLP output projection), ``attn_qv`` (the query and value projections, or
the one fused projection where a family computes q, k and v in one Linear / Conv1D, as PEFT's default LoRA
targets do) and ``all_linear`` (every projection of the attention and the MLP: PEFT's ``"all-linear"`` targets,
which also leave the output head alone). ``kv_layout`` gives the shape of a layer's KV cache, which a prefix fills.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# the family-neutral names, and what each stands for
FAMILY_NAMES = {"attn": "the attention block", "mlp_out": "the MLP output projection",
                "attn_qv": "the query and value projections (the fused qkv projection where a family fuses them)",
                "all_linear": "every Linear (or Conv1D) projection of the attention and the MLP (PEFT's all-linear)"}


@dataclass(frozen=True)
class Family:
    """Where one backbone family keeps its parts; every name but ``layers`` is relative to one decoder layer.

    Attributes:
        label: the family as people call it (``"Llama"``).
        layers: the dotted path of the decoder layers' ``ModuleList`` (``"model.layers"``).
        attn: the attention block inside a layer.
        projections: the attention's projections (q, k, v, o; fused where the family fuses them).
        qv: the query and value projections (``attn_qv``): the fused qkv projection where there is one.
        mlp: the MLP's projections, input to output (its last is ``mlp_out``).
        norms: the norms of a layer (LayerNorm or the family's RMSNorm).
    """

    label: str
    layers: str
    attn: str
    projections: tuple[str, ...]
    qv: tuple[str, ...]
    mlp: tuple[str, ...]
    norms: tuple[str, ...]

    @property
    def mlp_out(self) -> str:
        """The MLP output projection (``mlp_out``)."""
        return self.mlp[-1]

    def neutral(self, name: str) -> tuple[str, ...]:
        """The names inside a layer that the family-neutral ``name`` stands for."""
        return {"attn": (self.attn,), "mlp_out": (self.mlp_out,), "attn_qv": self.qv,
                "all_linear": self.projections + self.mlp}[name]


def _llama_like(label: str, norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm"),
                qk_norms: bool = False, layers: str = "model.layers") -> Family:
    """Llama's layout, shared by Mistral, Qwen2/3 and Gemma 2/3 (``LlamaDecoderLayer`` and its copies)."""
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    return Family(label, layers, "self_attn", attn, ("self_attn.q_proj", "self_attn.v_proj"),
                  ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
                  norms + (("self_attn.q_norm", "self_attn.k_norm") if qk_norms else ()))


_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")

FAMILIES: dict[str, Family] = {
    "opt": Family("OPT", "model.decoder.layers", "self_attn",
                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
                  ("self_attn.q_proj", "self_attn.v_proj"), ("fc1", "fc2"),
                  ("self_attn_layer_norm", "final_layer_norm")),
    # Conv1D projections (weight stored (in, out)): c_attn computes q, k and v at once
    "gpt2": Family("GPT-2", "transformer.h", "attn", ("attn.c_attn", "attn.c_proj"), ("attn.c_attn",),
                   ("mlp.c_fc", "mlp.c_proj"), ("ln_1", "ln_2")),
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3", qk_norms=True),
    "gemma2": _llama_like("Gemma 2", norms=_GEMMA_NORMS),
    "gemma3_text": _llama_like("Gemma 3", norms=_GEMMA_NORMS, qk_norms=True),
    # the multimodal Gemma 3 checkpoints (Gemma3ForConditionalGeneration): the same text stack under
    # model.language_model, beside a vision tower whose layers the neutral names leave alone
    "gemma3": _llama_like("Gemma 3 (multimodal)", norms=_GEMMA_NORMS, qk_norms=True,
                          layers="model.language_model.layers"),
    "phi3": Family("Phi-3", "model.layers", "self_attn", ("self_attn.qkv_proj", "self_attn.o_proj"),
                   ("self_attn.qkv_proj",), ("mlp.gate_up_proj", "mlp.down_proj"),
                   ("input_layernorm", "post_attention_layernorm")),
    "gpt_neox": Family("GPT-NeoX", "gpt_neox.layers", "attention", ("attention.query_key_value", "attention.dense"),
                       ("attention.query_key_value",), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
                       ("input_layernorm", "post_attention_layernorm")),
}


def model_type_of(model_or_config: Any) -> str | None:
    """transformers' ``model_type`` of a model (or a PEFT wrapper, or a config), or None."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None)


def family_of(model_or_config: Any) -> Family | None:
    """The table's entry for a model or config (None: a family optqa does not know)."""
    return FAMILIES.get(model_type_of(model_or_config))


def kv_layout(config: Any) -> tuple[int, int, int]:
    """The KV cache of a decoder: ``(layers, key/value heads, head size)``, one key and one value of shape
    ``(batch, key/value heads, positions, head size)`` per layer.

    Key/value heads are ``num_key_value_heads`` where the config has them (grouped-query attention; 1 is
    multi-query), else ``num_attention_heads``; the head size is ``head_dim`` where the config sets it (Gemma,
    Qwen3: it need not be ``hidden_size / heads``), else ``hidden_size // num_attention_heads``. PEFT lays a
    prefix out the same way (``peft.utils.other._prepare_prompt_learning_config``).

    Args:
        config: a transformers config (a multimodal one's text config is used).
    Returns:
        ``(num_hidden_layers, kv_heads, head_dim)``.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def markdown_table() -> str:
    """docs/deltas.md's family table: what the family-neutral names resolve to on each family."""
    def names(inner: tuple[str, ...]) -> str:
        return " ".join(f"`{n}`" for n in inner)

    rows = ["| `model_type` | family | decoder layers | `attn` | `mlp_out` | `attn_qv` | `all_linear` | norms |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model_type, f in FAMILIES.items():
        rows.append(f"| `{model_type}` | {f.label} | `{f.layers}` | `{f.attn}` | `{f.mlp_out}` | {names(f.qv)} | "
                    f"{names(f.neutral('all_linear'))} | {names(f.norms)} |")
    return "\n".join(rows)


def defaults_text(names: list[str]) -> str:
    """What family-neutral ``names`` resolve to, per family, in one line (for --help)."""
    by_text: dict[str, list[str]] = {}
    for f in FAMILIES.values():
        text = " ".join(n for name in names for n in (f.neutral(name) if name in FAMILY_NAMES else (name,)))
        by_text.setdefault(text, []).append(f.label)
    return "; ".join(f"{', '.join(labels)}: {text}" for text, labels in by_text.items())


if __name__ == "__main__":  # python -m optqa.families > table.md: docs/deltas.md's family table
    print(markdown_table())


# ---- the KV cache's API, which transformers keeps changing


def cache_argument(model) -> str:
    """The forward argument that takes the KV cache: transformers 5.24 renamed ``past_key_values`` to ``cache``
    (the old name is deprecated until 5.40). Read from the signature, not from a version number."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model_config):
    """An empty ``DynamicCache``; given the model's config where this transformers takes one (>= 4.56)."""
    import inspect

    from transformers import DynamicCache

    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=model_config)
    return DynamicCache()
