"""OpenDelta's ``AutoDeltaConfig`` / ``AutoDeltaModel`` on top of PEFT.

LoRA, soft prompts and prefix tuning come from PEFT (for answering only, a saved LoRA is folded into the
weights, ``fold_lora``, and a soft prompt or prefix read into a plain table, ``attach_prompt_table``, neither
importing PEFT). PEFT has no bottleneck adapter and no BitFit, so those two are written here, with OpenDelta's
semantics and parameter names (which also makes importing OpenDelta checkpoints a plain key match):

- adapter: ``out + up(act(down(out)))`` on the output of each modified module, the up projection starting
  at zero so the model starts exactly as the backbone;
- bitfit: a trainable bias added to the output of every Linear (GPT-2's Conv1D) and norm (LayerNorm, a
  family's RMSNorm) in the decoder layers (the backbone's own biases stay frozen, so the delta stays separate
  from the backbone).

Both are wrapper modules as PEFT's layers are (``DeltaWrapper``: the backbone's module as ``base_layer``, the
delta's parameters beside it, in that module's place), and every delta is found from the backbone through one
module of its own (``DeltaAnchor``): optqa writes no attribute, method or hook into a module it does not own.

Module names are OpenDelta's short names or family-neutral ones (``attn``, ``mlp_out``, ``attn_qv``,
``all_linear``), which ``optqa.families`` resolves on each backbone family.

``is_delta_parameter`` is the one predicate for "belongs to the delta": freezing, counting and saving all
use it, so what trains and what is saved cannot drift apart.
"""
from __future__ import annotations

import logging
import re
import warnings
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any, Iterator

import torch
from torch import nn

from optqa.config import REGISTRY, DeltaConfig, delta_config_from_dict
from optqa.errors import OptqaError
from optqa.wrappers import replace

log = logging.getLogger(__name__)

# Substrings that only delta parameter names contain: each registered delta type's (its entry declares them:
# PEFT's lora_*/prompt_encoder, optqa's adapter and bitfit) and a template's soft tokens. Backbone parameter
# names never contain them.
TEMPLATE_MARKER = "soft_embeds"
DELTA_MARKERS = tuple(dict.fromkeys([m for entry in REGISTRY.values() for m in entry.parameters] + [TEMPLATE_MARKER]))
# Keys OpenDelta writes into its config.json that describe the run rather than the delta.
OPENDELTA_METADATA_KEYS = {"backbone_checkpoint_name", "backbone_class", "backbone_hash", "opendelta_version",
                           "transformers_version", "exclude_modules", "common_structure", "unfrozen_modules"}
# The name of the DeltaAnchor submodule by which a backbone carries its delta: PromptForGeneration(plm, ...) finds
# the delta of the plm it is given, as OpenPrompt's does after OpenDelta modified plm in place (PEFT's deltas run
# through a wrapper around plm, which the backbone alone would not keep alive:
# ``AutoDeltaModel.from_finetuned(path, plm)`` may drop what it returns). A module of optqa's in the backbone's
# tree, not an attribute in its __dict__ nor a registry keyed by it (whose values, each referring to its backbone,
# would keep every backbone alive for good): the backbone <-> delta cycle is garbage once both are dropped.
DELTA_ATTRIBUTE = "optqa_delta"


def is_delta_parameter(name: str) -> bool:
    """The single predicate deciding what is trained and what is saved.

    Args:
        name: a parameter name as ``named_parameters()`` gives it.
    Returns:
        True for a delta parameter (or a template's soft tokens), False for a backbone weight.
    """
    return any(marker in name for marker in DELTA_MARKERS)


def attached_delta(plm: nn.Module) -> "DeltaModel | None":
    """The delta ``AutoDeltaModel.from_config`` attached to backbone ``plm`` (its ``DeltaAnchor``), or None."""
    anchor = dict(plm.named_children()).get(DELTA_ATTRIBUTE)
    return anchor.delta if isinstance(anchor, DeltaAnchor) else None


def _whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter as one plain tensor: an FSDP shard (DTensor) is gathered from every process."""
    return param.full_tensor().detach() if hasattr(param, "full_tensor") else param.detach()


def _like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out like ``param``: this process's shard when ``param`` is an FSDP DTensor."""
    if not hasattr(param, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements)


def load_delta_state(module: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy delta weights into ``module``'s delta parameters by name (FSDP shards take their part).

    Raises:
        OptqaError: a missing, unexpected or mis-shaped name (a delta for another backbone); nothing is
            skipped.
    """
    own = {n: p for n, p in module.named_parameters() if is_delta_parameter(n)}
    _check_fits({n: tuple(p.shape) for n, p in own.items()}, state, source)
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(_like(param, state[name].to(param.dtype)))


def _check_fits(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse ``state`` unless it holds exactly the names of ``expected``, each with its shape."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise OptqaError(f"{source} does not fit this delta: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                         f", unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise OptqaError(f"{source}: {name} has shape {tuple(state[name].shape)}, this model expects "
                             f"{shape} (a delta for another backbone?)")


def _layout(delta: "DeltaModel") -> nn.Module:
    """The backbone and the model that runs, registered in the order ``PromptForGeneration`` registers them
    (``backbone``, then ``plm``): parameter names then equal those of optqa checkpoints."""
    holder = nn.Module()
    holder.backbone = delta.backbone_model
    holder.plm = delta.model
    return holder


def named_delta_parameters(delta: "DeltaModel") -> list[tuple[str, nn.Parameter]]:
    """The delta's own parameters under checkpoint names (a template's soft tokens are the template's)."""
    return [(n, p) for n, p in _layout(delta).named_parameters() if is_delta_parameter(n)]


class AutoDeltaConfig:
    """OpenDelta's ``AutoDeltaConfig``: the typed config of a delta type from a dict."""

    @staticmethod
    def from_dict(config: dict[str, Any]) -> DeltaConfig:
        """Args:
            config: ``{"delta_type": ..., **options}``; options left out take the type's defaults, and the keys
                OpenDelta writes about the run (``backbone_class``, ``opendelta_version``, ...) are ignored.
        Returns:
            An ``AdapterConfig``, ``LoraConfig``, ``BitFitConfig``, ``SoftPromptConfig`` or ``PrefixConfig``.
        Raises:
            OptqaError: no or an unknown ``delta_type``, an option the type does not take, an invalid value.
        """
        return delta_config_from_dict(config, ignored=OPENDELTA_METADATA_KEYS)


class AdapterLayer(nn.Module):
    """Bottleneck adapter, laid out like OpenDelta's (``modulelist.down_proj`` / ``modulelist.up_proj``)."""

    def __init__(self, dim: int, bottleneck_dim: int, non_linearity: str = "gelu_new"):
        super().__init__()
        from transformers.activations import ACT2FN

        self.modulelist = nn.Sequential(OrderedDict(
            down_proj=nn.Linear(dim, bottleneck_dim),
            non_linear=ACT2FN[non_linearity],
            up_proj=nn.Linear(bottleneck_dim, dim),
        ))
        nn.init.normal_(self.modulelist.down_proj.weight, std=0.01)
        nn.init.zeros_(self.modulelist.down_proj.bias)
        nn.init.zeros_(self.modulelist.up_proj.weight)
        nn.init.zeros_(self.modulelist.up_proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden + up(act(down(hidden)))``; ``hidden`` is ``(batch, seq_len, dim)``, returned in its dtype."""
        return hidden + self.modulelist(hidden).to(hidden.dtype)


# ------------------------------------------------------------------------------------------ wrapper modules
# Adapter and BitFit change a backbone module's output. Like PEFT's layers (``BaseTunerLayer`` with
# ``base_layer``) and litgpt's ``LoRALinear``, they do it as a module of their own that takes the wrapped
# module's place in its parent, not with a hook or an attribute put on a module optqa does not own.

BASE_LAYER = "base_layer"


class DeltaWrapper(nn.Module):
    """A backbone module (``base_layer``) whose output a delta changes, in that module's place in its parent.

    Names stay those of the unwrapped backbone: the delta's parameters are named after the module
    (``fc2.adapter.modulelist.up_proj.weight``, ``fc2.bitfit_delta_bias``, OpenDelta's names), and the state dict
    keeps the base layer's tensors under the module's own names (``fc2.weight``, not ``fc2.base_layer.weight``;
    loading maps them back), so ``plm.state_dict()`` reads and loads as before the delta came. Attributes
    the backbone reads on the module it calls (``weight``, ``nf``, ``layer_idx``) come from the base layer.
    Subclasses define ``delta_output``.

    Args:
        base_layer: the module wrapped.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.register_state_dict_post_hook(_unwrapped_keys)
        self.register_load_state_dict_pre_hook(_wrapped_keys)

    def forward(self, *args, **kwargs):
        """The base layer's output with ``delta_output`` applied; of a tuple (an attention block's ``(hidden,
        weights, ...)``) the first element."""
        output = self.base_layer(*args, **kwargs)
        if isinstance(output, tuple):
            return (self.delta_output(output[0]),) + tuple(output[1:])
        return self.delta_output(output)

    def delta_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """The changed output: ``hidden`` is ``(..., width)``; returned in its shape and dtype."""
        raise NotImplementedError

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == BASE_LAYER:  # not set yet (inside __init__, copying, unpickling)
                raise
            return getattr(self.base_layer, name)


def _unwrapped_keys(module: DeltaWrapper, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: ``<prefix>base_layer.<name>`` saved as ``<prefix><name>``, ahead of the delta's own
    tensors, which is where they stood before wrapping (all keys under ``prefix`` are the last ones written)."""
    base = f"{prefix}{BASE_LAYER}."
    keys = [key for key in state_dict if key.startswith(prefix)]
    tensors = {key: state_dict.pop(key) for key in keys}
    for key in sorted(keys, key=lambda key: not key.startswith(base)):  # stable: base layer first
        state_dict[prefix + key[len(base):] if key.startswith(base) else key] = tensors[key]


def _wrapped_keys(module: DeltaWrapper, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: a key under ``prefix`` that names none of the wrapper's own parameters or
    submodules is the base layer's (the inverse of ``_unwrapped_keys``)."""
    own = {name for name, _ in module.named_children()} | {name for name, _ in module.named_parameters(recurse=False)}
    for key in [key for key in state_dict if key.startswith(prefix)]:
        if key[len(prefix):].split(".", 1)[0] not in own:
            state_dict[f"{prefix}{BASE_LAYER}.{key[len(prefix):]}"] = state_dict.pop(key)


class AdapterWrapper(DeltaWrapper):
    """A module with a bottleneck adapter on its output (``adapter``: an ``AdapterLayer``)."""

    def __init__(self, base_layer: nn.Module, adapter: AdapterLayer):
        super().__init__(base_layer)
        self.adapter = adapter

    def delta_output(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter(hidden)


class BitFitWrapper(DeltaWrapper):
    """A module with a trainable bias added to its output (``bitfit_delta_bias``, fp32, starting at zero).

    Args:
        base_layer: a Linear, Conv1D or norm.
        width: its output width.
    """

    def __init__(self, base_layer: nn.Module, width: int):
        super().__init__(base_layer)
        reference = next(base_layer.parameters())
        self.bitfit_delta_bias = nn.Parameter(torch.zeros(width, device=reference.device, dtype=torch.float32))

    def delta_output(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.bitfit_delta_bias.to(hidden.dtype)


def wrap_modules(plm: nn.Module, names: list[str], wrap) -> None:
    """Put ``wrap(module)`` in the place of each named module of ``plm`` (in its parent).

    Args:
        names: full module names (``resolve_modules``).
        wrap: builds the wrapper (a ``DeltaWrapper``) around a module.
    Raises:
        OptqaError: one named module inside another: wrapping the outer one would rename the inner one's delta
            (``attn.base_layer.out_proj...``), so only one of them can carry it.
    """
    for outer in names:
        inner = next((name for name in names if name.startswith(outer + ".")), None)
        if inner is not None:
            raise OptqaError(f"modified_modules: {inner!r} lies inside {outer!r}; name one of them, not both")
    for name in names:
        replace(plm, name, wrap(plm.get_submodule(name)))


class DeltaAnchor(nn.Module):
    """The submodule (``DELTA_ATTRIBUTE``) by which a backbone carries its delta: ``attached_delta`` finds it.

    It holds no tensor. With ``delta_only_state_dict`` (OpenDelta's ``freeze_module(set_state_dict=True)``) its
    state-dict hook leaves only delta tensors in the backbone's ``state_dict()``: registered after every other
    child, the anchor is saved last, when the rest of the backbone is already in the dict.

    Args:
        delta: the attached ``DeltaModel`` (a plain attribute: not a module of the backbone's tree).
    """

    def __init__(self, delta: "DeltaModel"):
        super().__init__()
        self.delta = delta
        self.delta_only_state_dict = False
        self.register_state_dict_post_hook(_delta_tensors_only)

    def extra_repr(self) -> str:
        return f"delta_type={self.delta.config.delta_type!r}"


def _delta_tensors_only(anchor: DeltaAnchor, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook of a ``DeltaAnchor``: the backbone's (``prefix`` less the anchor's name) tensors
    other than the delta's are dropped when ``delta_only_state_dict`` is set."""
    if anchor.delta_only_state_dict:
        backbone = prefix[:-len(DELTA_ATTRIBUTE) - 1]
        for key in [key for key in state_dict if key.startswith(backbone) and not is_delta_parameter(key)]:
            del state_dict[key]


def _conv1d() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm or a family's RMSNorm: each family has its own RMSNorm class (LlamaRMSNorm, Gemma3RMSNorm, ...)
    with no common base class, but every one is named ``*Norm`` and scales by a per-feature (1-D) weight."""
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("Norm") and isinstance(weight, torch.Tensor) and weight.dim() == 1


def _inside_a_layer(names: list[str]) -> str:
    """The module names inside the first block of any layer list (OPT's layers.0, GPT-2's h.0, ...)."""
    return ", ".join(sorted({n.split(".")[-1] for n in names if ".0." in n}))


def _neutral_patterns(model: nn.Module, short: str, names: list[str]) -> list[str]:
    """The full-name patterns a family-neutral name (``attn``, ``mlp_out``, ``attn_qv``, ...) stands for on
    ``model``'s family: ``<layers>.<i>.<name inside the layer>``."""
    from optqa.families import FAMILIES, family_of, model_type_of

    family = family_of(model)
    if family is None:
        raise OptqaError(f"modified_modules: {short!r} is a family-neutral name and backbone type "
                         f"{model_type_of(model)!r} is not in optqa's family table ({', '.join(FAMILIES)}); pass "
                         f"module names instead (names inside a layer: {_inside_a_layer(names)})")
    return [rf"{re.escape(family.layers)}\.\d+\.{re.escape(inner)}" for inner in family.neutral(short)]


def resolve_modules(model: nn.Module, short_names: list[str]) -> list[str]:
    """Full module names matching OpenDelta-style short names (``self_attn``, ``fc2``, ``self_attn.q_proj``) and
    family-neutral names (``attn``, ``mlp_out``, ``attn_qv``, ``all_linear``: ``optqa.families``).

    A short name matches every module whose dotted name ends with it; a family-neutral name the modules its
    family's table entry names in every decoder layer; the output head is never modified.

    Raises:
        OptqaError: a name that matches nothing; a family-neutral name on a backbone type not in the table.
    """
    from optqa.families import FAMILY_NAMES

    names = [n for n, _ in model.named_modules() if n and not n.startswith("lm_head")]
    matched = []
    for short in short_names:
        if short in FAMILY_NAMES:  # in the order the family's entry names them, as the short names would be
            patterns = [re.compile(p) for p in _neutral_patterns(model, short, names)]
            hits = [n for pattern in patterns for n in names if pattern.fullmatch(n)]
        else:
            hits = [n for n in names if n == short or n.endswith("." + short)]
        if not hits:
            raise OptqaError(f"modified_modules: {short!r} matches no module of the backbone "
                             f"(names inside a layer: {_inside_a_layer(names)})")
        matched.extend(h for h in hits if h not in matched)
    return matched


def _output_width(module: nn.Module, model: nn.Module) -> int:
    """The width of ``module``'s output: a Linear's out_features, a Conv1D's ``nf``, a norm's weight length;
    anything else (an attention block) writes the hidden size."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, _conv1d()):
        return module.nf
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if _is_norm(module):
        return module.weight.shape[0]
    return model.config.get_text_config().hidden_size


def _in_out(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or a Conv1D (whose weight is stored ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def _linear_targets(model: nn.Module, short_names: list[str]) -> list[str]:
    """LoRA needs Linear (or GPT-2's Conv1D) layers: a matched block (e.g. ``self_attn``) stands for the ones
    inside it."""
    modules = dict(model.named_modules())
    kinds = (nn.Linear, _conv1d())
    targets = []
    for name in resolve_modules(model, short_names):
        if isinstance(modules[name], kinds):
            targets.append(name)
        else:
            targets += [f"{name}.{child}" for child, m in modules[name].named_modules()
                        if child and isinstance(m, kinds)]
    if not targets:
        raise OptqaError(f"modified_modules {short_names} contain no Linear layer for LoRA")
    return list(dict.fromkeys(targets))


def _fan_in_fan_out(model: nn.Module, targets: list[str]) -> bool:
    """PEFT's ``fan_in_fan_out``: True for Conv1D targets (weight stored ``(in, out)``), False for Linear ones.

    Raises:
        OptqaError: a mix of both (PEFT applies one setting to every target).
    """
    modules = dict(model.named_modules())
    conv = {isinstance(modules[name], _conv1d()) for name in targets}
    if len(conv) > 1:
        raise OptqaError("modified_modules: LoRA targets mix Linear and Conv1D layers; PEFT's fan_in_fan_out "
                         "takes one setting for all (name only Linear or only Conv1D modules)")
    return conv == {True}


class DeltaModel:
    """A delta attached to a backbone, like OpenDelta's delta models.

    ``model`` is what to run: the backbone itself (adapter, bitfit, modified in place) or PEFT's wrapper
    around it (lora, soft_prompt, prefix). ``PromptForGeneration(plm, ...)`` finds it from the backbone.
    OpenDelta's calls: ``parameters()`` / ``named_parameters()`` (the delta's own, so
    ``AdamW(delta_model.parameters(), lr)`` trains it), ``freeze_module`` and ``log``; the saving calls
    (``save_finetuned``, ``save_checkpoint``, ``load_checkpoint``) are on ``optqa.compat.opendelta.OpenDeltaModel``,
    which ``optqa.AutoDeltaModel`` returns.
    """

    def __init__(self, config: DeltaConfig, backbone_model: nn.Module, model: nn.Module):
        self.config = config
        self.backbone_model = backbone_model
        self.model = model
        self._merged = False  # LoRA folded into the frozen weights (merge_lora, fold_lora): answering only
        # the PromptForGeneration built on the backbone (bind): its template's soft tokens and text are saved too
        self.prompt_model: nn.Module | None = None
        # template soft tokens read with the delta (from_finetuned) and their source, loaded when bound
        self.pending_template_state: tuple[dict[str, torch.Tensor], str] | None = None
        # registered last, after the delta's own modules: the backbone now carries this delta (attached_delta)
        self._anchor = DeltaAnchor(self)
        backbone_model.add_module(DELTA_ATTRIBUTE, self._anchor)
        self._freeze()

    def _freeze(self) -> None:
        # by the same predicate that saving uses, so what trains is what is saved
        for name, param in self.model.named_parameters():
            param.requires_grad_(is_delta_parameter(name))

    def freeze_module(self, module: nn.Module | None = None, exclude: list[str] | None = None,
                      set_state_dict: bool = True) -> None:
        """OpenDelta's ``freeze_module(exclude=["deltas"], set_state_dict=True)``: only the delta trains.

        Args:
            module: None or the backbone (OpenDelta's default).
            exclude: names kept trainable; only ``"deltas"`` (the delta itself, always trainable here).
            set_state_dict: True: the backbone's ``state_dict()`` returns only the delta's tensors, as
                OpenDelta's does (so ``torch.save(plm.state_dict(), f)`` saves the delta); False restores it.

        Raises:
            OptqaError: another module or exclude name: optqa never trains backbone weights (they are not
                part of the saved delta).
        """
        others = [name for name in (exclude or []) if name != "deltas"]
        if others or (module is not None and module not in (self.backbone_model, self.model)):
            raise OptqaError(f"freeze_module: optqa trains only the delta, never backbone modules "
                             f"({', '.join(others) or type(module).__name__}); use exclude=['deltas']")
        self._freeze()
        self._anchor.delta_only_state_dict = set_state_dict

    def bind(self, prompt_model: nn.Module) -> None:
        """Called by ``PromptForGeneration``: its template's soft tokens and text are saved with the delta, and
        soft tokens that ``from_finetuned`` read (``pending_template_state``) are loaded into that template now."""
        self.prompt_model = prompt_model
        pending, self.pending_template_state = self.pending_template_state, None
        if pending:
            state, source = pending
            load_delta_state(prompt_model.template, state, f"{source} (template soft tokens; build the template "
                                                           "from delta_model.manifest['template'])")

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The delta's own parameters, named as in optqa checkpoints (no backbone weight, no template token)."""
        return iter(named_delta_parameters(self))

    def parameters(self) -> Iterator[nn.Parameter]:
        """The delta's own parameters: ``AdamW(delta_model.parameters(), lr)`` trains the delta alone."""
        return (param for _, param in self.named_parameters())

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """The delta's tensors by parameter name (detached; a soft template's tokens are the template's)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if is_delta_parameter(n)}

    def num_trainable_parameters(self) -> int:
        """How many parameters the delta trains."""
        return sum(p.numel() for n, p in self.model.named_parameters() if is_delta_parameter(n))

    def num_total_parameters(self) -> int:
        """How many parameters the model (backbone and delta) has."""
        return sum(p.numel() for p in self.model.parameters())

    def summary(self) -> str:
        """One line: the delta type, trainable and total parameters and their ratio."""
        trainable, total = self.num_trainable_parameters(), self.num_total_parameters()
        return (f"delta {self.config.delta_type}: trainable parameters {trainable:,} / total {total:,} "
                f"({100 * trainable / total:.4f}%)")

    def log(self, delta_ratio: bool = True, trainable_ratio: bool = True, visualization: bool = True) -> str:
        """Print (and return) what OpenDelta's ``log`` shows: with ``visualization`` the modules carrying the
        delta, with the ratios the trainable and delta parameters against the whole model."""
        lines = []
        if visualization:
            modules: dict[str, int] = {}
            for name, param in self.named_parameters():
                cut = min(name.find(m) for m in DELTA_MARKERS if m in name)
                modules[name[:cut].rstrip(".")] = modules.get(name[:cut].rstrip("."), 0) + param.numel()
            lines += [f"{name} <- {self.config.delta_type} ({count:,} parameters)" for name, count in modules.items()]
        total = self.num_total_parameters()
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        delta = self.num_trainable_parameters()
        if trainable_ratio:
            lines.append(f"Trainable Ratio: {trainable:,}/{total:,}={100 * trainable / total:.6f}%")
        if delta_ratio:
            lines.append(f"Delta Parameter Ratio: {delta:,}/{total - delta:,}={100 * delta / (total - delta):.6f}%")
        text = "\n".join(lines)
        print(text)
        return text

    def merge_lora(self) -> bool:
        """Fold the delta into the frozen weights for inference where its method can (LoRA: exact up to float
        rounding). True if merged now."""
        if self._merged or not REGISTRY[self.config.delta_type].implementation().merge(self.model):
            return False
        self._merged = True
        return True


class AutoDeltaModel:
    """OpenDelta's ``AutoDeltaModel.from_config``; ``optqa.AutoDeltaModel`` (optqa/compat/opendelta.py) adds
    ``from_finetuned`` and the saving calls."""

    delta_model_class: type[DeltaModel] = DeltaModel

    @classmethod
    def from_config(cls, config: DeltaConfig | dict, backbone_model: nn.Module, tokenizer=None) -> DeltaModel:
        """Attach a delta to ``backbone_model`` in place and freeze everything else.

        Args:
            config: a typed delta config or its dict (``AutoDeltaConfig.from_dict``).
            backbone_model: a transformers causal LM (``load_plm``) without a delta.
            tokenizer: its tokenizer (soft_prompt's ``init_text`` needs it).
        Returns:
            The delta model; ``.model`` is what runs (the backbone, or PEFT's wrapper around it), and
            ``PromptForGeneration(backbone_model, ...)`` finds it (``attached_delta``).
        Raises:
            OptqaError: an invalid config, modules that match nothing, a backbone that already carries a delta.
        """
        if isinstance(config, dict):
            config = AutoDeltaConfig.from_dict(config)
        if attached_delta(backbone_model) is not None:
            raise OptqaError("this backbone already carries a delta; load a fresh backbone for another one")
        model = REGISTRY[config.delta_type].implementation().attach(config, backbone_model, tokenizer)
        return cls.delta_model_class(config, backbone_model, model)


def _attach_adapter(config: DeltaConfig, plm: nn.Module, tokenizer) -> nn.Module:
    def wrap(module: nn.Module) -> AdapterWrapper:
        adapter = AdapterLayer(_output_width(module, plm), config.bottleneck_dim, config.non_linearity)
        reference = next(module.parameters(), None)
        return AdapterWrapper(module, adapter.to(reference.device) if reference is not None else adapter)

    wrap_modules(plm, resolve_modules(plm, config.modified_modules), wrap)
    return plm


def _decoder_layers(plm: nn.Module) -> str:
    """The dotted name of ``plm``'s decoder layers, from the family table.

    Raises:
        OptqaError: a backbone type not in the table (naming the modules to pass instead).
    """
    from optqa.families import FAMILIES, family_of, model_type_of

    family = family_of(plm)
    if family is None:
        names = [n for n, _ in plm.named_modules()]
        raise OptqaError(f"bitfit: backbone type {model_type_of(plm)!r} is not in optqa's family table "
                         f"({', '.join(FAMILIES)}), so its decoder layers are unknown; pass --modified_modules "
                         f"(names inside a layer: {_inside_a_layer(names)})")
    return family.layers


def bitfit_module_names(plm: nn.Module, modified_modules: list[str] | None) -> list[str]:
    """Every Linear, Conv1D and norm (LayerNorm, RMSNorm) inside the modified modules, by default inside the
    decoder layers (OpenDelta's attn/ff/layer_norm biases)."""
    modules = dict(plm.named_modules())
    roots = resolve_modules(plm, modified_modules) if modified_modules else [_decoder_layers(plm)]
    kinds = (nn.Linear, _conv1d())
    names = []
    for root in roots:
        for name, module in modules.items():
            if (name == root or name.startswith(root + ".")) and (isinstance(module, kinds) or _is_norm(module)):
                names.append(name)
    if not names:
        raise OptqaError("bitfit found no Linear, Conv1D or norm module to add biases to")
    return list(dict.fromkeys(names))


def _attach_bitfit(config: DeltaConfig, plm: nn.Module, tokenizer) -> nn.Module:
    wrap_modules(plm, bitfit_module_names(plm, config.modified_modules),
                 lambda module: BitFitWrapper(module, _output_width(module, plm)))
    return plm


def _peft_model(plm: nn.Module, peft_config) -> nn.Module:
    """``peft.get_peft_model``, without the FutureWarning transformers (>= 5.24) prints each time: PEFT (0.21)
    reads the deprecated ``is_gradient_checkpointing`` while it wraps the model, an alias of
    ``is_activation_checkpointing`` that returns the same value until transformers 6 removes it."""
    import peft

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return peft.get_peft_model(plm, peft_config)


def _attach_lora(config: DeltaConfig, plm: nn.Module, tokenizer) -> nn.Module:
    import peft

    targets = _linear_targets(plm, config.modified_modules)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                           lora_dropout=config.lora_dropout, target_modules=targets,
                           fan_in_fan_out=_fan_in_fan_out(plm, targets))
    return _peft_model(plm, lora)


# PEFT's name for the one adapter optqa attaches: part of every LoRA checkpoint key (``...lora_A.default.weight``)
PEFT_ADAPTER_NAME = "default"


def fold_lora(config: DeltaConfig, plm: nn.Module, state: dict[str, torch.Tensor],
              source: str = "checkpoint") -> tuple[DeltaModel, dict[str, torch.Tensor]]:
    """A saved LoRA folded straight into ``plm``'s Linear weights, for answering only, without PEFT.

    Each target Linear gets ``W + (B @ A) * (lora_alpha / r)``: PEFT's ``merge_adapter``, op for op
    (``peft.tuners.lora.layer.Linear.merge`` and ``get_delta_weight``, vanilla LoRA; a Conv1D target, whose
    weight is stored ``(in, out)``, gets the product transposed, as PEFT's ``fan_in_fan_out``), so the weights
    are those a PEFT merge gives, bit for bit (tests/test_speed_paths.py). Importing peft and
    wrapping the backbone had been most of optqa's own share of the question loop's start-up (0.2 s of 0.3 s).

    Args:
        config: the checkpoint's ``LoraConfig``.
        plm: a backbone without a delta (``load_plm``); its weights change in place.
        state: the checkpoint's delta tensors by their saved names: ``backbone.<module>.lora_A.default.weight``
            ``(r, in_features)`` and ``...lora_B.default.weight`` ``(out_features, r)`` per target layer, and
            a template's soft tokens, if any.
        source: names the checkpoint in errors.
    Returns:
        ``(delta, rest)``: a merged ``DeltaModel`` whose ``model`` is ``plm`` itself (it holds no delta
        parameter, so it neither trains nor saves), and the tensors of ``state`` that are not LoRA's.
    Raises:
        OptqaError: the LoRA tensors do not fit this backbone (a missing, unexpected or mis-shaped name).
    """
    modules = dict(plm.named_modules())
    targets = _linear_targets(plm, config.modified_modules)
    transposed = _fan_in_fan_out(plm, targets)
    expected = {}
    for name in targets:
        in_features, out_features = _in_out(modules[name])
        expected[f"backbone.{name}.lora_A.{PEFT_ADAPTER_NAME}.weight"] = (config.lora_r, in_features)
        expected[f"backbone.{name}.lora_B.{PEFT_ADAPTER_NAME}.weight"] = (out_features, config.lora_r)
    lora = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
    _check_fits(expected, lora, source)
    scaling = config.lora_alpha / config.lora_r  # PEFT's LoraLayer.update_layer (no rank-stabilised scaling)
    with torch.no_grad():
        for name in targets:
            weight = modules[name].weight
            lora_a = lora[f"backbone.{name}.lora_A.{PEFT_ADAPTER_NAME}.weight"].to(weight.device, torch.float32)
            lora_b = lora[f"backbone.{name}.lora_B.{PEFT_ADAPTER_NAME}.weight"].to(weight.device, torch.float32)
            # PEFT adds in place; the same sum into a new tensor is bit for bit the same and 10x sooner here:
            # transformers leaves loaded weights on the safetensors file's copy-on-write pages, and writing into
            # them costs a page fault per 4 kB (0.23 s for OPT-125m's 24 q/v matrices, against 0.03 s)
            product = lora_b @ lora_a
            weight.data = weight.data + (product.T if transposed else product) * scaling
    delta = DeltaModel(config, plm, plm)
    delta._merged = True
    log.info("LoRA merged into the backbone weights for answering (%d Linear layers)", len(targets))
    return delta, {k: v for k, v in state.items() if k not in lora}


def input_embedding_width(plm: nn.Module) -> int:
    """The width soft prompts live at: the input embedding's (opt-350m embeds at 512, not its hidden size 1024)."""
    return plm.get_input_embeddings().embedding_dim


def _attach_soft_prompt(config: DeltaConfig, plm: nn.Module, tokenizer) -> nn.Module:
    import peft

    prompt = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.soft_token_num,
                                     token_dim=input_embedding_width(plm))
    model = _peft_model(plm, prompt)
    if config.init_text and tokenizer is not None:
        # PEFT's TEXT init reloads the tokenizer by name (fails offline); the same init, done in place
        ids = _init_ids(tokenizer, config.init_text, config.soft_token_num)
        with torch.no_grad():
            # the embedding module's output, not its weight rows: Gemma's scales by sqrt(hidden_size) inside it,
            # and a soft prompt enters after the embedding module (as inputs_embeds)
            embedding = plm.get_input_embeddings()
            weight = embedding(torch.tensor(ids, device=embedding.weight.device)).float()
            model.prompt_encoder["default"].embedding.weight.copy_(weight)
    return model


def _init_ids(tokenizer, text: str, count: int) -> list[int]:
    """``count`` token ids of ``text``, repeated as often as needed (PEFT's TEXT init)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return (ids * (count // max(len(ids), 1) + 1))[:count]


def _attach_prefix(config: DeltaConfig, plm: nn.Module, tokenizer) -> nn.Module:
    import peft

    prefix = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.prefix_token_num)
    model = _peft_model(plm, prefix)
    if config.init_text and tokenizer is not None:
        table = model.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            table.copy_(_text_prefix(plm, _init_ids(tokenizer, config.init_text, config.prefix_token_num)))
    return model


def _text_prefix(plm: nn.Module, ids: list[int]) -> torch.Tensor:
    """The keys and values the backbone computes for ``ids`` at positions ``0..n-1``, in every layer, as a prefix
    table ``(n, layers * 2 * kv_heads * head_dim)`` in PEFT's layout (the inverse of
    ``PromptForGeneration._prefix_cache``): Li and Liang's initialisation with real words' activations."""
    from optqa.families import cache_argument, kv_layout, new_cache

    layers, kv_heads, head_dim = kv_layout(plm.config)
    cache, was_training = new_cache(plm.config), plm.training
    device = next(plm.parameters()).device
    plm.eval()  # no dropout in the activations the prefix starts from
    try:
        plm(input_ids=torch.tensor([ids], device=device), use_cache=True, **{cache_argument(plm): cache})
    finally:
        plm.train(was_training)
    per_layer = [tensor[0].float() for layer in cache.layers[:layers] for tensor in (layer.keys, layer.values)]
    table = torch.stack(per_layer)  # (2 * layers, kv_heads, n, head_dim)
    return table.permute(2, 0, 1, 3).reshape(len(ids), 2 * layers * kv_heads * head_dim)


# PEFT's names for the prompt-learning methods (its PeftType values), for PromptTable and PromptForGeneration
PEFT_PROMPT_LEARNING = {name: entry.peft_type for name, entry in REGISTRY.items() if entry.virtual_place}


class PromptTable(nn.Module):
    """A saved soft prompt or prefix for answering only, without PEFT: the one table PEFT's prompt-learning model
    holds, under PEFT's attribute names and in PEFT's layout, around the backbone (``base_model``, as PEFT's).

    ``PromptForGeneration`` applies a soft prompt or prefix itself from that table (``_virtual_weight``) and
    never runs PEFT's forward, so answering needs nothing else of PEFT; the checkpoint's key
    (``plm.prompt_encoder.default.embedding.weight``) loads into it unchanged.

    Args:
        delta_type: a prompt-learning delta type (``"soft_prompt"``, ``"prefix"``: ``PEFT_PROMPT_LEARNING``).
        shape: the table's ``(num_virtual_tokens, width)`` (``prompt_table_shape``).
        base_model: the backbone.
    """

    def __init__(self, delta_type: str, shape: tuple[int, int], base_model: nn.Module):
        super().__init__()
        self.base_model = base_model
        self.active_adapter = PEFT_ADAPTER_NAME
        self.peft_config = {PEFT_ADAPTER_NAME: SimpleNamespace(peft_type=PEFT_PROMPT_LEARNING[delta_type])}
        encoder = nn.Module()
        # fp32, like PEFT's table; its values come from the checkpoint (load_delta_state)
        encoder.embedding = nn.Embedding(*shape, device=next(base_model.parameters()).device)
        self.prompt_encoder = nn.ModuleDict({PEFT_ADAPTER_NAME: encoder})

    def get_base_model(self) -> nn.Module:
        """The backbone, as ``PeftModel.get_base_model`` returns it."""
        return self.base_model


def prompt_table_shape(config: DeltaConfig, plm: nn.Module) -> tuple[int, int]:
    """PEFT's table shape for a prompt-learning delta: its method's ``table_shape`` (``SoftPrompt``, ``Prefix``)."""
    return REGISTRY[config.delta_type].implementation().table_shape(config, plm)


def attach_prompt_table(config: DeltaConfig, plm: nn.Module) -> DeltaModel:
    """A soft prompt or prefix attached to ``plm`` for answering only, without importing PEFT (``PromptTable``).

    It answers as the PEFT-built delta does, bit for bit (tests/test_speed_paths.py); it cannot train or be
    exported in PEFT's format. Importing PEFT and wrapping the backbone cost the question loop ~0.1 s of its
    start-up (measured on OPT-125m's shape).

    Args:
        config: the checkpoint's ``SoftPromptConfig`` or ``PrefixConfig``.
        plm: a backbone without a delta (``load_plm``).
    Returns:
        The ``DeltaModel``; load the checkpoint's tensors into the ``PromptForGeneration`` built on ``plm``.
    """
    return DeltaModel(config, plm, PromptTable(config.delta_type, prompt_table_shape(config, plm), plm))


# ------------------------------------------------------------------------------------------ the delta methods
# A registry entry (optqa.config.REGISTRY) names one of these as its ``method``: how the type attaches for
# training and for answering, and whether it folds into the weights. Adding a delta type adds one entry, its
# config class and one class here.

class DeltaMethod:
    """How one delta type changes a backbone; every method is a static method, the class holds no state."""

    @staticmethod
    def attach(config: DeltaConfig, plm: nn.Module, tokenizer) -> nn.Module:
        """Attach the delta to ``plm`` for training (in place, or by wrapping it).

        Returns:
            The module that runs: ``plm`` itself, or a wrapper around it (PEFT's).
        Raises:
            OptqaError: modules that match nothing, or another reason the delta cannot sit on this backbone.
        """
        raise NotImplementedError

    @staticmethod
    def attach_for_answering(config: DeltaConfig, plm: nn.Module, state: dict[str, torch.Tensor], source: str,
                             merge: bool) -> tuple[DeltaModel, dict[str, torch.Tensor]] | None:
        """A lighter attachment for a model that only answers (no PEFT import, weights folded where ``merge``).

        Returns:
            ``(delta, state still to load)``, or None: attach as for training.
        """
        return None

    @staticmethod
    def merge(model: nn.Module) -> bool:
        """Fold the delta into the frozen weights of the running ``model`` (answering only); False: it cannot."""
        return False

    @staticmethod
    def from_opendelta(key: str, value: torch.Tensor, backbone: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
        """An OpenDelta checkpoint's tensor under the name and value optqa's delta gives it (names without the
        wrappers around the backbone, ``optqa.checkpoints.opendelta``); ``backbone``: the backbone's own
        parameters by name. The same unless a method overrides it."""
        return key, value


class BottleneckAdapter(DeltaMethod):
    """``out + up(act(down(out)))`` after each modified module (``AdapterLayer``)."""

    attach = staticmethod(_attach_adapter)


class BitFit(DeltaMethod):
    """A trainable bias on the output of every Linear, Conv1D and norm of the modified modules."""

    attach = staticmethod(_attach_bitfit)

    @staticmethod
    def from_opendelta(key, value, backbone):
        # OpenDelta trained the backbone's own biases; optqa's delta is what they moved by. The module that
        # carries the delta is a BitFitWrapper around the backbone's, so its own bias is the base layer's
        if not key.endswith(".bias"):
            return key, value
        module = key[:-len(".bias")]
        frozen = backbone.get(f"{module}.{BASE_LAYER}.bias", backbone.get(key))
        return key[:-len("bias")] + "bitfit_delta_bias", value.float() - (
            frozen.detach().float() if frozen is not None else 0)


class LoRA(DeltaMethod):
    """PEFT's LoRA; answering folds it into the weights without PEFT (``fold_lora``) where merging is asked."""

    attach = staticmethod(_attach_lora)

    @staticmethod
    def attach_for_answering(config, plm, state, source, merge):
        return fold_lora(config, plm, state, source) if merge else None

    @staticmethod
    def merge(model: nn.Module) -> bool:
        model.merge_adapter()
        return True

    @staticmethod
    def from_opendelta(key, value, backbone):
        # OpenDelta: <module>.lora.lora_A (a Parameter); PEFT: <module>.lora_A.default.weight
        return (key.replace(".lora.lora_", ".lora_") + ".weight", value) if ".lora.lora_" in key else (key, value)


class PromptLearning(DeltaMethod):
    """Virtual tokens in PEFT's prompt encoder; answering reads the table without PEFT (``PromptTable``)."""

    @staticmethod
    def attach_for_answering(config, plm, state, source, merge):
        return attach_prompt_table(config, plm), state


class SoftPrompt(PromptLearning):
    """Prompt tuning: the table's rows are embeddings put before the prompt's."""

    attach = staticmethod(_attach_soft_prompt)

    @staticmethod
    def table_shape(config: DeltaConfig, plm: nn.Module) -> tuple[int, int]:
        """``(soft_token_num, input embedding width)``."""
        return config.soft_token_num, input_embedding_width(plm)


class Prefix(PromptLearning):
    """Prefix tuning: the table's rows are keys and values put into every layer's KV cache."""

    attach = staticmethod(_attach_prefix)

    @staticmethod
    def table_shape(config: DeltaConfig, plm: nn.Module) -> tuple[int, int]:
        """``(prefix_token_num, layers * 2 * kv_heads * head_dim)``: a key and a value per layer and virtual
        token, each as wide as the KV cache holds them (``optqa.families.kv_layout``; the hidden size without
        grouped-query attention)."""
        from optqa.families import kv_layout

        layers, kv_heads, head_dim = kv_layout(plm.config)
        return config.prefix_token_num, layers * 2 * kv_heads * head_dim
