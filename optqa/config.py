"""The one typed configuration: defaults for the CLI, the saved checkpoint and the docs' flag table.

The typed delta configs and their registry (``REGISTRY``), then a run's settings in sections (``SECTIONS``), one
config per mode made of the sections it reads (``MODE_CONFIGS``) and ``RunConfig``, every section. Every field
carries its help text in ``metadata["help"]``; ``optqa.cli`` builds argparse from these fields and
``markdown_table()`` renders the flag table of docs/flags.md, so a default is written in exactly one place.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from optqa.families import defaults_text

# templates/ and data/sample/ sit beside the package in a checkout; default paths are relative to it
REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ("train", "evaluate", "interactive_inference", "demo", "inspect", "export", "push", "download",
         "import_opendelta", "serve")
DEFAULT_TEMPLATE = "templates/answer_template.txt"
QUANTIZE_CHOICES = ("none", "int8", "auto")
# --report_to: accelerate's tracker names, and the module each needs
TRACKERS = ("tensorboard", "wandb", "mlflow")
# what a checkpoint's hyperparameters record as its "mode" besides the modes: how it was made without training
CHECKPOINT_ORIGINS = ("import_peft", "import_opendelta", "save_finetuned")


# ------------------------------------------------------------------------------------ one config per delta
# Each delta type's options and defaults, written once: AutoDeltaConfig (the library API) builds these, the
# CLI's delta flags take their defaults from them (``delta_default``), and a checkpoint's manifest records
# ``to_dict()``. Field metadata: ``help``; ``flag``, the RunConfig field when its name differs; ``cli_default``,
# where the command line's default differs from the library's (said once, on the field).

def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its help text and other metadata (a list default is copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def _positive(config: Any, *names: str) -> None:
    from optqa.errors import OptqaError

    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise OptqaError(f"{config.delta_type}: {name} must be a positive whole number, got {value!r}")


def _module_names(config: Any, allow_none: bool) -> None:
    from optqa.errors import OptqaError

    names = config.modified_modules
    if names is None and allow_none:
        return
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names or not all(
            isinstance(n, str) and n for n in names):
        raise OptqaError(f"{config.delta_type}: modified_modules must be a non-empty list of module names, "
                         f"got {names!r}")
    config.modified_modules = list(names)


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as JSON or a caller gives it) is of the annotated type ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 1.0 as 1.0, but a hand-written 1 is the same number
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is list:  # a tuple from a library caller is as good as JSON's list
        return isinstance(value, (list, tuple)) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    raise TypeError(f"no check for the annotation {hint!r}")  # a new field type: add its check here


def _spelled(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_spelled(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is list:  # list[str] is the only list a config holds
        return "a list of strings"
    return {type(None): "null", bool: "true or false", int: "a whole number", float: "a finite number",
            str: "a string"}[hint]


def check_fields(cls: type, values: dict[str, Any], where: str) -> None:
    """Refuse a value of the wrong type, or outside its field's ``choices``, for the dataclass ``cls``'s fields
    (the checks argparse applies to a typed flag, for values read from a file). Keys that are not fields are not
    looked at.

    Args:
        cls: RunConfig or a typed delta config.
        values: field name -> value.
        where: put before the field's name in the message (``"hyperparameters."``, ``"lora: "``).
    Raises:
        OptqaError: ``<where><field> must be <type or choices>, got <value>``, for the first such field.
    """
    from optqa.errors import OptqaError

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, hint = values[f.name], hints[f.name]
        if not _fits(value, hint):
            raise OptqaError(f"{where}{f.name} must be {_spelled(hint)}, got {_shown(value)}")
        choices = f.metadata.get("recorded", f.metadata.get("choices"))
        if choices and value is not None and value not in choices:
            raise OptqaError(f"{where}{f.name} must be one of {', '.join(choices)}, got {_shown(value)}")


def _shown(value: Any) -> str:
    """A value in a message: its repr, cut to 80 characters (a wrong value may be a whole file's text)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class DeltaConfig:
    """The base of the typed delta configs (OpenDelta's ``*Config`` objects): attribute access, ``to_dict()``.

    Every option is checked when a config is made: its type (``check_fields``), then its range (``_check``).
    """

    delta_type: ClassVar[str] = ""

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], source: str) -> dict[str, Any]:
        """This delta's config dict for a PEFT ``adapter_config.json`` of the PEFT method it registers as
        (``DeltaType.peft_type``); only types PEFT has override it.

        Raises:
            OptqaError: options optqa's delta cannot reproduce.
        """
        raise NotImplementedError(f"{cls.delta_type} has no PEFT counterpart")

    @classmethod
    def from_opendelta(cls, config: dict[str, Any]) -> dict[str, Any]:
        """This delta's config dict for an OpenDelta ``config.json`` of the same type (its run metadata already
        dropped); the same options unless a type overrides it."""
        return config

    def __post_init__(self) -> None:
        check_fields(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                     f"{self.delta_type}: ")
        self._check()

    def _check(self) -> None:
        """A delta type's own range checks (after the type checks)."""

    def to_dict(self) -> dict[str, Any]:
        """``{"delta_type": ..., **options}``: what AutoDeltaConfig.from_dict takes and a manifest records."""
        return {"delta_type": self.delta_type, **dataclasses.asdict(self)}


@dataclass
class AdapterConfig(DeltaConfig):
    """Bottleneck adapter (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP"), after each
    modified module's output: ``out + up(act(down(out)))``, OpenDelta's layout. The default modules are the
    attention block and the MLP's output projection of every decoder layer, on any family (``optqa.families``)."""

    delta_type: ClassVar[str] = "adapter"
    # family-neutral names (optqa.families): on OPT self_attn and fc2, the homework's modules
    modified_modules: list[str] = _opt(["attn", "mlp_out"], "modules whose output the adapter follows")
    bottleneck_dim: int = _opt(24, "bottleneck width")
    non_linearity: str = _opt("gelu_new", "activation between the down and up projection (transformers' ACT2FN)",
                              cli=False)

    def _check(self) -> None:
        from transformers.activations import ACT2FN

        from optqa.errors import OptqaError

        _module_names(self, allow_none=False)
        _positive(self, "bottleneck_dim")
        if self.non_linearity not in ACT2FN:  # AdapterLayer builds ACT2FN[non_linearity]
            raise OptqaError(f"adapter: non_linearity must be one of transformers' activations (ACT2FN: "
                             f"{', '.join(sorted(ACT2FN))}), got {_shown(self.non_linearity)}")


@dataclass
class LoraConfig(DeltaConfig):
    """LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), through PEFT: the frozen
    ``W`` of each Linear in the modified modules computes ``W x + (alpha / r) B A x``."""

    delta_type: ClassVar[str] = "lora"
    # the library keeps PEFT's and OpenDelta's q_proj + v_proj (attn_qv); the command line follows the homework,
    # whose runs put LoRA on every Linear of the attention block and on fc2 (attn, mlp_out); family-neutral
    # names (optqa.families) resolve to those places on every family
    modified_modules: list[str] = _opt(["attn_qv"], "modules whose Linears get LoRA",
                                         cli_default=["attn", "mlp_out"])
    lora_r: int = _opt(8, "rank r")
    lora_alpha: int = _opt(16, "alpha (scale = alpha / r)")
    lora_dropout: float = _opt(0.0, "dropout on the input of the LoRA path")

    # PEFT LoRA options whose non-default values change the computation in ways this config cannot express
    # (fan_in_fan_out is not one: it says how the target stores its weight, and optqa sets it from the target's
    # type, True for GPT-2's Conv1D, as an adapter trained on that backbone must have it)
    PEFT_DEFAULTS: ClassVar[dict[str, Any]] = {
        "use_dora": False, "use_rslora": False, "bias": "none", "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], source: str) -> dict[str, Any]:
        from optqa.errors import OptqaError

        # an option counts when it is set and not the default ("", None, [] and {} mean unset)
        differing = sorted(k for k, default in cls.PEFT_DEFAULTS.items()
                           if peft_config.get(k) and peft_config.get(k) != default)
        if differing:
            raise OptqaError(f"{source}: LoRA option {differing[0]}={peft_config[differing[0]]!r} is not supported "
                             "by optqa's LoRA")
        targets = peft_config.get("target_modules")
        if isinstance(targets, str):
            targets = [targets]  # a single name; a regular expression would match nothing by name and is caught
        if not targets:
            raise OptqaError(f"{source}: the LoRA config names no target_modules")
        return {"delta_type": cls.delta_type, "modified_modules": sorted(targets), "lora_r": peft_config["r"],
                "lora_alpha": peft_config["lora_alpha"], "lora_dropout": peft_config.get("lora_dropout", 0.0)}

    def _check(self) -> None:
        from optqa.errors import OptqaError

        _module_names(self, allow_none=False)
        _positive(self, "lora_r", "lora_alpha")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise OptqaError(f"lora: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")


@dataclass
class BitFitConfig(DeltaConfig):
    """BitFit (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
    Masked Language-models"): a trainable bias added to the output of every Linear (GPT-2's Conv1D) and norm
    (LayerNorm, RMSNorm) of the modified modules (None: all decoder layers, where the family table puts them);
    the backbone's own biases stay frozen."""

    delta_type: ClassVar[str] = "bitfit"
    modified_modules: list[str] | None = _opt(None, "modules whose Linears and norms get a bias "
                                                      "(None: every decoder layer)")

    def _check(self) -> None:
        _module_names(self, allow_none=True)

    @classmethod
    def from_opendelta(cls, config: dict[str, Any]) -> dict[str, Any]:
        # OpenDelta's patterns ("attn@") are its syntax for the set optqa's BitFit covers by default: every
        # Linear and norm of the decoder layers
        return {k: v for k, v in config.items() if k != "modified_modules"}


@dataclass
class SoftPromptConfig(DeltaConfig):
    """Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):
    ``soft_token_num`` trainable input embeddings before the prompt. 20, not OpenDelta's 100: ARC-DA prompts
    average ~29 tokens, and on a CPU the cost of a step grows with the prompt length."""

    delta_type: ClassVar[str] = "soft_prompt"
    soft_token_num: int = _opt(20, "number of virtual tokens")
    init_text: str = _opt("Answer the science question briefly.", "text whose token embeddings initialise the "
                            "prompt (\"\" for random init)", flag="soft_init_text")

    def _check(self) -> None:
        _positive(self, "soft_token_num")

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], source: str) -> dict[str, Any]:
        _decoder_only_prompt(peft_config, source)
        # init_text only initialises; the trained embeddings are loaded over it
        return {"delta_type": cls.delta_type, "soft_token_num": peft_config["num_virtual_tokens"], "init_text": ""}


@dataclass
class PrefixConfig(DeltaConfig):
    """Prefix tuning (Li and Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"):
    ``prefix_token_num`` trainable key/value positions in every layer, through PEFT."""

    delta_type: ClassVar[str] = "prefix"
    prefix_token_num: int = _opt(6, "number of prefix positions")
    # Li and Liang (section 7.2) found a prefix initialised with the activations of real words trains better than a
    # random one; on SmolLM2-135M a random prefix starts at loss 10.6 against the bare model's 4.7
    init_text: str = _opt("Answer the science question briefly.", "text whose keys and values in every layer "
                          "initialise the prefix (\"\" for random init)", flag="prefix_init_text")

    def _check(self) -> None:
        _positive(self, "prefix_token_num")

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], source: str) -> dict[str, Any]:
        from optqa.errors import OptqaError

        _decoder_only_prompt(peft_config, source)
        if peft_config.get("prefix_projection"):
            raise OptqaError(f"{source}: prefix tuning with prefix_projection=true is not supported by optqa's prefix")
        return {"delta_type": cls.delta_type, "prefix_token_num": peft_config["num_virtual_tokens"], "init_text": ""}


def _decoder_only_prompt(peft_config: dict[str, Any], source: str) -> None:
    """Refuse a PEFT prompt-learning config for an encoder-decoder model."""
    from optqa.errors import OptqaError

    if peft_config.get("num_transformer_submodules", 1) not in (1, None):
        raise OptqaError(f"{source}: num_transformer_submodules={peft_config['num_transformer_submodules']} (an "
                         "encoder-decoder adapter); optqa's backbones are decoder-only")


# ------------------------------------------------------------------------------------ the delta-type registry

# the settings a delta type's recipe may give defaults for (the ones that depend most on the method)
RECIPE_KEYS = ("lr", "train_epochs", "warmup_steps", "max_new_tokens")

@dataclass(frozen=True)
class DeltaType:
    """Everything optqa knows about one delta method, in one entry of ``REGISTRY``: the CLI's ``--delta_type``
    choices and flags, the option checks, the length budget, PEFT export and import, model cards, OpenDelta
    import and the model code all read it. Adding a delta type is adding one entry (and its two classes);
    tests/test_registry.py adds one.

    Attributes:
        config: its typed config class: options, defaults, checks; every option but those marked ``cli=False``
            becomes a ``RunConfig`` field and a command-line flag (``flag`` metadata renames one).
        method: ``"module:Class"`` of its ``optqa.deltas.DeltaMethod``: how it attaches for training and for
            answering, and the parameter names it owns (imported only when a backbone is modified, so the CLI
            starts without torch).
        title: how people name it (model cards, ``--help``).
        hub_tag: its Hugging Face Hub tag.
        peft_type: PEFT's ``PeftType`` of the same method, or None where PEFT has none (no PEFT export or import).
        virtual_tokens: the option counting positions it puts before the prompt (soft prompt, prefix), or None.
        virtual_place: where those positions go: ``"inputs"`` (embeddings before the prompt's) or ``"cache"``
            (keys and values in every layer's KV cache).
        gradient_checkpointing: whether it trains under ``--gradient_checkpointing`` (a prefix does not:
            transformers recomputes the layers without the cache that holds it).
        opendelta: whether OpenDelta checkpoints of this type import (``--mode import_opendelta``).
        parameters: substrings that only the names of its parameters contain (``lora_``): the names it declares
            as its own, so ``optqa.deltas.is_delta_parameter`` (what trains, what is saved, what a checkpoint
            file may hold) knows them without a model at hand.
        recipe: its training defaults (keys among ``RECIPE_KEYS``): a setting the user does not give takes the
            recipe's value, else the setting's own default (``default_of``); the manifest records the value used.
        family_recipes: ``model_type -> settings`` that replace the recipe's on a backbone of that family
            (transformers' ``config.model_type``), where a family measured differently; a training run from the
            command line reads the family from the backbone's config (``RunConfig.of``'s ``model_type``).
    """

    config: type[DeltaConfig]
    method: str
    title: str
    hub_tag: str
    parameters: tuple[str, ...]
    peft_type: str | None = None
    virtual_tokens: str | None = None
    virtual_place: str | None = None
    gradient_checkpointing: bool = True
    opendelta: bool = False
    recipe: dict[str, Any] = field(default_factory=dict, hash=False)
    family_recipes: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for recipe in (self.recipe, *self.family_recipes.values()):
            unknown = set(recipe) - set(RECIPE_KEYS)
            assert not unknown, f"{self.name}: a recipe sets only {', '.join(RECIPE_KEYS)}, not {sorted(unknown)}"

    def recipe_for(self, model_type: str | None) -> dict[str, Any]:
        """Its recipe on a backbone whose ``config.model_type`` is ``model_type`` (None: not known): ``recipe``,
        with the family's own settings (``family_recipes``) over it."""
        return {**self.recipe, **self.family_recipes.get(model_type, {})}

    @property
    def name(self) -> str:
        """``--delta_type``'s value: the config class's ``delta_type``."""
        return self.config.delta_type

    def implementation(self) -> Any:
        """The ``DeltaMethod`` class (imports its module, and so torch)."""
        import importlib

        module, _, name = self.method.partition(":")
        return getattr(importlib.import_module(module), name)


# Recipes from benchmarks/sweep.py on SmolLM2-135M-Instruct and ARC-DA dev (benchmarks/RESULTS.md, "Default
# recipes"; docs/recipes.md says which row chose which number): the best measured learning rate of each type; one
# epoch where one was as good as more (LoRA at 1e-3 peaked at epoch 1 of 3); BitFit's best epoch was its second,
# and the prefix gained 2 F1 from a second epoch (with two seeds). The adapter's recipe is the homework's. On Gemma 3
# 270M, LoRA's best rate was 1e-3 (40.2 dev F1, against 36.7 at 2e-3 and 39.2 at 5e-4).
REGISTRY: dict[str, DeltaType] = {entry.name: entry for entry in (
    DeltaType(AdapterConfig, "optqa.deltas:BottleneckAdapter", "bottleneck adapter", "adapter", (".adapter.",),
              opendelta=True, recipe={"lr": 1e-3, "train_epochs": 1}),
    DeltaType(LoraConfig, "optqa.deltas:LoRA", "LoRA", "lora", ("lora_",), peft_type="LORA", opendelta=True,
              recipe={"lr": 2e-3, "train_epochs": 1}, family_recipes={"gemma3_text": {"lr": 1e-3}}),
    DeltaType(BitFitConfig, "optqa.deltas:BitFit", "BitFit", "bitfit", ("bitfit_delta_bias",), opendelta=True,
              recipe={"lr": 1e-3, "train_epochs": 3}),
    DeltaType(SoftPromptConfig, "optqa.deltas:SoftPrompt", "prompt tuning", "prompt-tuning", ("prompt_encoder.",),
              peft_type="PROMPT_TUNING", virtual_tokens="soft_token_num", virtual_place="inputs",
              recipe={"lr": 3e-2, "train_epochs": 1}),
    DeltaType(PrefixConfig, "optqa.deltas:Prefix", "prefix tuning", "prefix-tuning", ("prompt_encoder.",),
              peft_type="PREFIX_TUNING", virtual_tokens="prefix_token_num", virtual_place="cache",
              gradient_checkpointing=False, recipe={"lr": 1e-2, "train_epochs": 2}),
)}
DELTA_TYPES = tuple(REGISTRY)
DELTA_CONFIGS: dict[str, type[DeltaConfig]] = {name: entry.config for name, entry in REGISTRY.items()}
# PEFT's method names and the delta type each is
PEFT_TYPES: dict[str, str] = {entry.peft_type: name for name, entry in REGISTRY.items() if entry.peft_type}


def delta_config_from_dict(config: dict[str, Any], ignored: Any = ()) -> DeltaConfig:
    """The typed config of a delta from ``{"delta_type": ..., **options}`` (what a manifest records).

    Args:
        config: the dict; options left out take the type's defaults.
        ignored: keys to drop first (OpenDelta's notes about the run in its config.json).
    Returns:
        An ``AdapterConfig``, ``LoraConfig``, ``BitFitConfig``, ``SoftPromptConfig`` or ``PrefixConfig``.
    Raises:
        OptqaError: no or an unknown ``delta_type``, an option the type does not take, a value of the wrong type
            or range.
    """
    import copy

    from optqa.errors import OptqaError

    if "delta_type" not in config:
        raise OptqaError("a delta config needs 'delta_type'")
    values = {k: v for k, v in config.items() if k not in ignored}
    delta_type = values.pop("delta_type")
    if delta_type not in DELTA_CONFIGS:
        raise OptqaError(f"unknown delta_type {_shown(delta_type)} (choose from {', '.join(DELTA_TYPES)})")
    cls = DELTA_CONFIGS[delta_type]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = set(values) - set(known)
    if unknown:
        raise OptqaError(f"{delta_type} does not take {', '.join(sorted(map(str, unknown)))} "
                         f"(it takes {', '.join(known) or 'no options'})")
    return cls(**copy.deepcopy(values))


def delta_field(delta_type: str, flag: str) -> dataclasses.Field:
    """The field of ``delta_type``'s config that RunConfig's ``--flag`` sets."""
    return next(f for f in dataclasses.fields(DELTA_CONFIGS[delta_type]) if f.metadata.get("flag", f.name) == flag)


def delta_default(delta_type: str, flag: str, cli: bool = False) -> Any:
    """The default of ``--flag`` for ``delta_type`` (``cli``: the command line's, where it differs)."""
    f = delta_field(delta_type, flag)
    if cli and "cli_default" in f.metadata:
        return list(f.metadata["cli_default"])
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def flags_of(delta_type: str) -> tuple[str, ...]:
    """The names of ``delta_type``'s options as RunConfig calls them; an option marked ``cli=False`` (adapter's
    ``non_linearity``) has no flag: the library API sets it."""
    return tuple(f.metadata.get("flag", f.name) for f in dataclasses.fields(DELTA_CONFIGS[delta_type])
                 if f.metadata.get("cli", True))


# the CLI's modules for adapter and lora (shown in --help; lora's differs from its library default, see LoraConfig)
CLI_MODIFIED_MODULES = tuple(delta_default("lora", "modified_modules", cli=True))
# the delta types --modified_modules applies to
MODULE_DELTA_TYPES = tuple(t for t in DELTA_TYPES if "modified_modules" in flags_of(t))


# ------------------------------------------------------------------------------------ the run's settings
# A run's settings come in sections (the dataclasses below). Each mode's config holds the sections, or the parts
# of them, that the mode reads (MODE_SECTIONS): its fields are its command-line flags. RunConfig holds every
# section: the library's config and what a checkpoint records. A setting's dataclass default is None, "not
# given", so a mode sees what was typed (a checkpoint's recorded value wins over a default nobody typed);
# ``resolved()`` puts in what None stands for (``default_of``), and RunConfig does so when it is built.

def _setting(default: Any, help: str, **extra: Any) -> Any:
    """A settings field: None until given; ``default`` (metadata) is what None stands for.

    Metadata: ``help``; ``choices``/``nargs``/``shown`` for argparse; ``resume=True``, a setting a ``--resume``
    must keep (it shapes the delta, the data order or the optimisation); ``training=True``, a training setting
    that ``--mode inspect`` and model cards show.
    """
    return field(default=None, metadata={"help": help, "default": default, **extra})


def _delta_flag(delta_type: str, flag: str) -> Any:
    """A settings field for one delta option: its default and help are the typed delta config's; a resumed
    run must keep it (it shapes the delta)."""
    f = delta_field(delta_type, flag)
    return _setting(delta_default(delta_type, flag), f"{delta_type}: {f.metadata['help']}", resume=True)


def _with_delta_flags(cls: type) -> type:
    """One field per option of every registered delta type, placed right after ``modified_modules`` (which
    several types share), so ``--help`` and the flag table list them together. Their default and help are the
    typed config's: an option is declared once, on its delta type's config class."""
    annotations: dict[str, Any] = {}
    for name, hint in inspect.get_annotations(cls).items():  # the class's own, however the interpreter keeps them
        annotations[name] = hint
        if name != "modified_modules":
            continue
        for delta_type, delta_cls in DELTA_CONFIGS.items():
            hints = typing.get_type_hints(delta_cls)
            for f in dataclasses.fields(delta_cls):
                flag = f.metadata.get("flag", f.name)
                if flag in flags_of(delta_type) and flag not in annotations and flag != "modified_modules":
                    annotations[flag] = hints[f.name]
                    setattr(cls, flag, _delta_flag(delta_type, flag))
    cls.__annotations__ = annotations
    return cls


@dataclass
class ModeSettings:
    """What to do: train a delta, score one, chat with one, or manage checkpoints."""

    mode: str = _setting("train", "what to run", choices=MODES, recorded=MODES + CHECKPOINT_ORIGINS)


@dataclass
class DataSettings:
    """Where the questions come from."""

    # ARC-DA folder with train/dev/test.jsonl (downloaded automatically by --mode train when missing)
    data_path: str = _setting("./data/ARC-DA-v1.1", "folder holding train.jsonl, dev.jsonl and test.jsonl",
                              resume=True)
    # per-split overrides so any QA jsonl can be used
    train_file: str | None = _setting(None, "training jsonl (default: <data_path>/train.jsonl)", resume=True)
    dev_file: str | None = _setting(None, "dev jsonl (default: <data_path>/dev.jsonl)")
    test_file: str | None = _setting(None, "test jsonl (default: <data_path>/test.jsonl)")
    # field names inside each jsonl row, for QA sets that are not ARC-DA
    question_field: str = _setting("question", "jsonl field holding the question")
    answers_field: str = _setting("answers", "jsonl field holding the list of gold answers (or one string)")
    id_field: str = _setting("question_id", "jsonl field holding the question id (line number if absent)")


@dataclass
class DownloadSettings:
    """Fetching ARC-DA."""

    # ARC-DA's official download location; --mode download fetches it
    data_url: str = _setting("https://aristo-data-public.s3-us-west-2.amazonaws.com/arc-da/ARC-DA-v1.1.zip",
                             "where --mode download fetches ARC-DA v1.1 from")
    # keep downloaded files whose sha256 differs from the pinned v1.1 values
    allow_checksum_mismatch: bool = _setting(False, "accept ARC-DA files whose sha256 differs from the pinned "
                                                    "values")


@dataclass
class BackboneSettings:
    """The frozen language model."""

    # model family name for load_plm (OpenPrompt's model_name)
    plm_name: str = _setting("opt", "model family, as in OpenPrompt's load_plm(model_name, ...)")
    # a hub name or a local Hugging Face folder; offline machines must pass a local folder
    plm_path: str = _setting("facebook/opt-125m", "backbone: a hub name or a local Hugging Face folder", resume=True)
    # load a delta onto a backbone whose fingerprint differs (architecture and shapes are still checked)
    ignore_backbone_mismatch: bool = _setting(False, "load a delta onto a backbone with different weights")


@dataclass
@_with_delta_flags
class DeltaSettings:
    """The delta to train: its type and options."""

    # which delta to inject into the frozen backbone
    delta_type: str = _setting("adapter", "delta (parameter-efficient) method", choices=DELTA_TYPES, resume=True)
    # OpenDelta-style short module names the delta attaches to (adapter, lora, bitfit); None: the delta type's
    # default, resolved with the rest so that a manifest records what was actually modified
    modified_modules: list[str] | None = _setting(None, "modules the delta attaches to (OpenDelta short names or "
                                                        "the family-neutral attn, mlp_out, attn_qv, all_linear; "
                                                        "adapter, lora, and bitfit, which without it takes every "
                                                        "Linear and norm of the decoder layers); the default is, per "
                                                        "family: "
                                                        + defaults_text(list(CLI_MODIFIED_MODULES)), nargs="+",
                                                  shown=" ".join(CLI_MODIFIED_MODULES), resume=True)
    # here _with_delta_flags puts each registered delta type's own options (--bottleneck_dim, --lora_r, ...)


@dataclass
class PromptSettings:
    """How a question is put to the model."""

    # OpenPrompt ManualTemplate file (or inline template text)
    template: str = _setting(DEFAULT_TEMPLATE, "template file in templates/ (or inline template text)", resume=True)
    # prompt + answer + eos tokens; longer questions are cut, never the answer or the template text
    max_seq_l: int = _setting(128, "maximum tokens per example (the question is cut to fit)", resume=True,
                              training=True)
    # instruct models expect their chat format; a checkpoint trained with it records it and always answers with it
    chat_template: bool = _setting(False, "render the prompt as the user message of the tokenizer's chat template "
                                          "(instruct models); a delta trained with it answers with it everywhere",
                                   resume=True, training=True)


@dataclass
class TrainingSettings:
    """The optimisation, its resume state and its logs."""

    # questions per optimisation step
    batch_size: int = _setting(8, "training batch size", resume=True, training=True)
    lr: float = _setting(1e-3, "learning rate (AdamW)", resume=True, training=True)
    weight_decay: float = _setting(0.0, "AdamW weight decay", resume=True, training=True)
    train_epochs: int = _setting(3, "training epochs", resume=True, training=True)
    warmup_steps: int = _setting(0, "linear warm-up steps", resume=True, training=True)
    # gradients are clipped to this norm (0 turns clipping off)
    max_grad_norm: float = _setting(1.0, "gradient clipping norm (0: off)", resume=True, training=True)
    gradient_accumulation_steps: int = _setting(1, "batches per optimiser step", resume=True, training=True)
    # one target per question is the homework's setup and keeps an epoch 3.4x cheaper than 'all'
    train_targets: str = _setting("first", "train on the first gold answer or on every gold answer",
                                  choices=("first", "all"), resume=True, training=True)
    # batching examples of similar length cuts padding; order across batches stays random
    group_by_length: bool = _setting(True, "bucket training examples by length", resume=True)
    seed: int = _setting(42, "random seed (data order, delta init, dropout)", resume=True, training=True)
    # best-epoch delta plus the state needed by --resume
    raw_delta_save_path: str = _setting("./raw_delta_ckpts/", "best-epoch delta and resume state")
    # resume state is written every this many optimiser steps (and at each epoch end)
    save_steps: int = _setting(50, "write resume state every N optimiser steps")
    resume: bool = _setting(False, "continue the interrupted run found in --raw_delta_save_path")
    # stop after this many optimiser steps in total (for smoke runs); 0 means no limit
    max_steps: int = _setting(0, "stop after N optimiser steps (0: no limit)")
    gradient_checkpointing: bool = _setting(False, "recompute activations to save memory (large backbones)")
    # FSDP2 through accelerate: each of N processes keeps 1/N of the frozen backbone; only with several processes
    fsdp: bool = _setting(False, "shard the backbone across processes (FSDP2) for backbones that do not fit one "
                                 "device")
    # accelerate's trackers, beside the run folder's own logs (which are always written)
    report_to: list[str] | None = _setting(None, "also log the losses, dev/test F1 and EM and the settings to these "
                                                 "experiment trackers (accelerate's): tensorboard (events in the "
                                                 "run folder), wandb, mlflow; each must be installed", nargs="+",
                                           choices=TRACKERS)


@dataclass
class AnsweringSettings:
    """Generating answers."""

    # greedy answers stop at eos or after this many tokens
    max_new_tokens: int = _setting(32, "maximum generated answer tokens")
    # questions answered at once when scoring
    eval_batch_size: int = _setting(32, "answering batch size")
    # merge LoRA into the weights when only answering (exact up to float rounding)
    merge_lora: bool = _setting(True, "merge LoRA weights for inference-only modes")


@dataclass
class ComputeSettings:
    """Where and in which precision the numbers are computed."""

    # auto: bf16 autocast where the CPU/GPU has native bf16, else fp32
    precision: str = _setting("auto", "compute precision", choices=("auto", "fp32", "bf16", "fp16"), training=True)
    # int8 frozen backbone when answering (optqa/quantize.py); unset, it depends on the mode: auto where a person
    # waits for the answer (the question loop, serving), none for the scores train and evaluate report, so a
    # research number does not move with the CPU it was computed on
    quantize: str | None = _setting(None, "answer on an int8 frozen backbone: none, int8, or auto (int8 where the "
                                          "CPU lacks native bf16 and has int8 kernels) (default: auto for "
                                          "interactive_inference and serve, none for the scores of train and "
                                          "evaluate)",
                                    choices=QUANTIZE_CHOICES)
    cpu: bool = _setting(False, "run on the CPU even when a GPU is present")
    # None: torch's default (one thread per physical core)
    num_threads: int | None = _setting(None, "CPU threads for torch (default: 1 for a backbone narrower than 768, "
                                             "else one per free physical core; see docs/performance.md)")


@dataclass
class CheckpointSettings:
    """The delta checkpoint a mode writes or reads."""

    # the final (best-dev) delta, as a self-describing checkpoint folder
    delta_save_path: str = _setting("./delta_ckpts/", "final delta checkpoint folder (to load: also a .optqa "
                                                      "bundle, hf://OWNER/NAME[@REVISION] or a PEFT adapter folder)")


@dataclass
class OutputSettings:
    """The run folders."""

    # every run writes its config, metrics, predictions and plot into a new folder below this
    output_dir: str = _setting("./runs", "parent folder of per-run result folders")


@dataclass
class EvaluationSettings:
    """What --mode evaluate scores, and how it prompts."""

    # split to score with --mode evaluate
    split: str = _setting("test", "split scored by --mode evaluate", choices=("train", "dev", "test"))
    # --mode evaluate without a model: score this predictions jsonl against the gold answers
    predictions_file: str | None = _setting(None, "evaluate: score this predictions jsonl instead of a model")
    # --mode evaluate: compare against a second predictions jsonl, question by question
    compare_file: str | None = _setting(None, "evaluate: second predictions jsonl to compare with")
    # --mode evaluate baselines: the backbone as it is, prompted through the template (no checkpoint is read)
    no_delta: bool = _setting(False, "evaluate: score the bare backbone (--plm_path) through --template, without a "
                                     "delta")
    # in-context examples before every question; drawn once with --seed from the train split, never the question
    num_shots: int = _setting(0, "evaluate: put N training questions, each with its first gold answer, before every "
                                 "question (drawn once with --seed; 0: zero-shot)")


@dataclass
class SharingSettings:
    """Bundles, the Hub and OpenDelta imports."""

    # --mode export: single-file bundle to write; --mode push --dry_run: the folder that would be uploaded
    export_path: str | None = _setting(None, "export: bundle file to write (default: <delta_save_path>.optqa); "
                                             "push --dry_run: folder to write")
    # --mode export: PEFT users get an adapter folder; off, export needs no backbone at all
    export_peft: bool = _setting(True, "export: also write a PEFT adapter folder <bundle name>-peft/ (lora, "
                                       "soft_prompt, prefix)")
    # --mode import_opendelta: OpenDelta folder (config.json + pytorch_model.bin) to convert
    import_path: str | None = _setting(None, "import_opendelta: OpenDelta checkpoint folder to convert")
    # --mode push: the Hub repository (created if missing) that receives the checkpoint, PEFT adapter and card
    hub_repo: str | None = _setting(None, "push: Hugging Face Hub repository OWNER/NAME to upload to")
    # --mode push: a new repository is public unless this is given (an existing one keeps its visibility)
    private: bool = _setting(False, "push: create the repository as private")
    commit_message: str | None = _setting(None, "push: commit message (default: delta type, backbone and weights "
                                                "hash)")
    # --mode push: build the exact folder, write it to --export_path, contact nobody
    dry_run: bool = _setting(False, "push: write the folder that would be uploaded to --export_path, upload "
                                    "nothing")
    # the card's base_model: a backbone loaded from a local folder names no Hub model unless the user does
    base_model: str | None = _setting(None, "push: the backbone's Hub id for the model card (default: --plm_path "
                                            "recorded in the checkpoint, if it is a Hub id)")


@dataclass
class ServingSettings:
    """The HTTP server."""

    # --mode serve: the deltas put behind the HTTP API, each verified at start as the question loop verifies one
    deltas: list[str] | None = _setting(None, "serve: deltas to serve as NAME=CHECKPOINT (folder or .optqa bundle); "
                                              "default: --delta_save_path as 'default'", nargs="+")
    # loopback only unless asked: the API has no rate limits and answering costs CPU
    host: str = _setting("127.0.0.1", "serve: address to listen on (0.0.0.0: every interface)")
    # DNS rebinding: a page whose name was rebound to this machine sends its own name as Host; only these are served
    allowed_hosts: list[str] | None = _setting(None, "serve: Host header names answered besides --host (a loopback "
                                                     "--host also answers localhost, 127.0.0.1 and ::1; '*': any "
                                                     "name; with --host 0.0.0.0 or :: the default is any name)",
                                               nargs="+")
    # 0 picks a free port; the log line 'serving ... at http://HOST:PORT/' names it
    port: int = _setting(8000, "serve: TCP port (0: any free port)")
    # the environment variable keeps the key out of shell history and process listings
    api_key: str | None = _setting(None, "serve: require 'Authorization: Bearer KEY' on every API endpoint "
                                         "(default: the OPTQA_API_KEY environment variable, else no key)")


# in the order --help and docs/flags.md list them
SECTIONS: tuple[type, ...] = (ModeSettings, DataSettings, DownloadSettings, BackboneSettings, DeltaSettings,
                              PromptSettings, TrainingSettings, AnsweringSettings, ComputeSettings,
                              CheckpointSettings, OutputSettings, EvaluationSettings, SharingSettings,
                              ServingSettings)


def _field(section: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(section) if f.name == name)


def default_of(config: Any, name: str) -> Any:
    """What a setting that was not given (None) stands for in ``config`` (a mode's config or a RunConfig).

    The delta type's recipe (``DeltaType.recipe``) where ``config`` trains a delta and the recipe has the setting,
    else the field's default; ``modified_modules`` is the delta type's own modules (None for a type without).
    """
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    if not hasattr(config, "delta_type"):  # the delta comes from a checkpoint: no recipe applies
        return copy.deepcopy(f.metadata["default"])
    delta_type = config.delta_type or _field(DeltaSettings, "delta_type").metadata["default"]
    if name == "modified_modules":
        return delta_default(delta_type, name, cli=True) if delta_type in MODULE_DELTA_TYPES else None
    entry = REGISTRY.get(delta_type)
    recipe = entry.recipe if entry is not None else {}
    return copy.deepcopy(recipe.get(name, f.metadata["default"]))


def _filled(config: Any) -> dict[str, Any]:
    """``config``'s fields that are None, with what they stand for; and a given ``modified_modules`` as a list, or
    None for a delta type without modules: the manifest's hyperparameters and its delta config then say the same."""
    filled = {f.name: default_of(config, f.name) for f in dataclasses.fields(config)
              if getattr(config, f.name) is None}
    if getattr(config, "modified_modules", None) is not None:
        delta_type = filled.get("delta_type", config.delta_type)
        filled["modified_modules"] = list(config.modified_modules) if delta_type in MODULE_DELTA_TYPES else None
    return filled


class Settings:
    """What every combination of sections can do (a mode's config, RunConfig)."""

    def to_dict(self) -> dict[str, Any]:
        """Every field by name: what ``config.json`` and a checkpoint's ``hyperparameters`` record."""
        return dataclasses.asdict(self)

    def given(self) -> dict[str, Any]:
        """The settings that were given (not None), by name."""
        return {k: v for k, v in self.to_dict().items() if v is not None}

    def resolved(self) -> Any:
        """A copy with each setting that was not given replaced by what it stands for (``default_of``)."""
        return dataclasses.replace(self, **_filled(self))


def only(section: type, *names: str) -> tuple[type, tuple[str, ...]]:
    """The part of ``section`` a mode reads: the fields ``names``."""
    known = [f.name for f in dataclasses.fields(section)]
    assert set(names) <= set(known), f"{section.__name__} has no {sorted(set(names) - set(known))}"
    return section, tuple(n for n in known if n in names)


def without(section: type, *names: str) -> tuple[type, tuple[str, ...]]:
    """The part of ``section`` a mode reads: all but the fields ``names``."""
    return only(section, *(f.name for f in dataclasses.fields(section) if f.name not in names))


# The settings each mode reads: whole sections, or parts of them (only/without). A mode's config holds exactly
# these fields, and they are the flags it takes (optqa.options refuses the others).
_LOADING = (only(BackboneSettings, "plm_path", "ignore_backbone_mismatch"), CheckpointSettings)
# evaluate, the question loop and the server load the model on the CPU (only training places it on a GPU,
# through accelerate), so --cpu is not theirs
_ANSWERING_COMPUTE = without(ComputeSettings, "cpu")
MODE_SECTIONS: dict[str, tuple[Any, ...]] = {
    "train": (DataSettings, DownloadSettings, BackboneSettings, DeltaSettings, PromptSettings, TrainingSettings,
              only(AnsweringSettings, "max_new_tokens", "eval_batch_size"), ComputeSettings, CheckpointSettings,
              OutputSettings),
    # a checkpoint brings the prompt, the backbone and the delta; --template only for a plain PEFT adapter
    "evaluate": (DataSettings, *_LOADING, PromptSettings, only(TrainingSettings, "seed"), AnsweringSettings,
                 _ANSWERING_COMPUTE, OutputSettings, EvaluationSettings),
    "interactive_inference": (*_LOADING, only(PromptSettings, "template"),
                              only(AnsweringSettings, "max_new_tokens", "merge_lora"), _ANSWERING_COMPUTE),
    # the demo builds its own backbone, dev file, save folders and trackers
    "demo": (without(DataSettings, "dev_file"), DeltaSettings, only(PromptSettings, "template", "max_seq_l"),
             without(TrainingSettings, "raw_delta_save_path", "report_to"),
             only(AnsweringSettings, "max_new_tokens", "eval_batch_size"), ComputeSettings, OutputSettings),
    "inspect": (CheckpointSettings,),
    "export": (*_LOADING, only(PromptSettings, "template"), only(SharingSettings, "export_path", "export_peft")),
    "push": (*_LOADING, without(SharingSettings, "import_path")),
    "download": (only(DataSettings, "data_path"), DownloadSettings),
    "import_opendelta": (only(BackboneSettings, "plm_name", "plm_path"), CheckpointSettings,
                         only(PromptSettings, "template", "max_seq_l"), only(AnsweringSettings, "max_new_tokens"),
                         only(SharingSettings, "import_path")),
    "serve": (ServingSettings, *_LOADING, only(AnsweringSettings, "max_new_tokens", "eval_batch_size"),
              _ANSWERING_COMPUTE),
}
assert set(MODE_SECTIONS) == set(MODES)


def _mode_config(mode: str) -> type:
    """The dataclass ``<Mode>Config``: ``mode`` (defaulting to this mode) and the fields ``MODE_SECTIONS`` names,
    in the order of ``SECTIONS``."""
    parts = dict(without(part) if isinstance(part, type) else part for part in MODE_SECTIONS[mode])
    mode_field = field(default=mode, metadata=_field(ModeSettings, "mode").metadata)
    specs: list[tuple[str, Any, Any]] = [("mode", str, mode_field)]
    for section in SECTIONS:
        hints = typing.get_type_hints(section)
        for name in parts.get(section, ()):
            specs.append((name, hints[name], field(default=None, metadata=_field(section, name).metadata)))
    name = "".join(word.title() for word in mode.split("_")) + "Config"
    cls = dataclasses.make_dataclass(name, specs, bases=(Settings,))
    cls.__module__, cls.__doc__ = __name__, f"The settings --mode {mode} reads (None: not given)."
    return cls


MODE_CONFIGS: dict[str, type] = {mode: _mode_config(mode) for mode in MODES}


@dataclass
class RunConfig(ServingSettings, SharingSettings, EvaluationSettings, OutputSettings, CheckpointSettings,
                ComputeSettings, AnsweringSettings, TrainingSettings, PromptSettings, DeltaSettings,
                BackboneSettings, DownloadSettings, DataSettings, ModeSettings, Settings):
    """Every setting of a run (every section; dataclasses lists the fields of the last base first): the library's
    config, a run folder's config.json and a checkpoint's hyperparameters. A setting not given takes what it
    stands for when the config is built (``default_of``: the delta type's recipe, else the field's default)."""

    def __post_init__(self) -> None:
        for name, value in _filled(self).items():
            setattr(self, name, value)

    @classmethod
    def of(cls, config: Settings, model_type: str | None = None) -> "RunConfig":
        """The RunConfig of a mode's config: what it gives, and every other setting's default.

        Args:
            config: a mode's config (None: a setting not given).
            model_type: the backbone's ``config.model_type``, where it is known (a training run reads it before
                it loads the weights): a setting not given then takes the delta type's recipe for that family
                (``DeltaType.recipe_for``) before the delta type's own.
        """
        given = config.given()
        if model_type is not None and hasattr(config, "delta_type"):
            entry = REGISTRY.get(given.get("delta_type", setting_default("delta_type")))
            given = {**(entry.recipe_for(model_type) if entry else {}), **given}
        return cls(**given)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        """A config from recorded values; keys this version does not know (from a newer or older optqa) are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_recorded(cls, values: dict[str, Any], where: str) -> "RunConfig":
        """``from_dict`` for values read from a file (a checkpoint's hyperparameters): each known one must have
        its field's type and be one of its choices, as argparse demands of a typed flag.

        Raises:
            OptqaError: ``<where><field> must be ..., got ...`` for the first value that is not.
        """
        check_fields(cls, values, where)
        return cls.from_dict(values)

    def delta_config(self) -> dict[str, Any]:
        """The AutoDeltaConfig dict this run asks for: its delta type's typed config from the delta flags."""
        cls, flags = DELTA_CONFIGS[self.delta_type], {f.name for f in dataclasses.fields(self)}
        return cls(**{f.name: getattr(self, f.metadata.get("flag", f.name)) for f in dataclasses.fields(cls)
                      if f.metadata.get("flag", f.name) in flags}).to_dict()

    @classmethod
    def names_where(cls, key: str) -> tuple[str, ...]:
        """The fields whose metadata sets ``key`` (``resume``, ``training``), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(key))

    def resume_settings(self) -> tuple[str, ...]:
        """The settings a ``--resume`` of this run must keep: shared ones and this delta type's own."""
        own = {"modified_modules", *flags_of(self.delta_type)}
        delta_flags = {flag for t in DELTA_TYPES for flag in flags_of(t)} | {"modified_modules"}
        return tuple(n for n in self.names_where("resume") if n not in delta_flags or n in own)


# RunConfig's bases are SECTIONS reversed: its fields, --help and the flag table then follow SECTIONS
assert [f.name for f in dataclasses.fields(RunConfig)] == [f.name for s in SECTIONS for f in dataclasses.fields(s)]


def setting_default(name: str) -> Any:
    """The default of the setting ``name`` (not a recipe's)."""
    return copy.deepcopy(next(f for f in dataclasses.fields(RunConfig) if f.name == name).metadata["default"])


def find_repo_file(path: str | Path) -> Path | None:
    """``path`` as given (relative to the working folder), else relative to the checkout, else None.

    The defaults (templates/..., data/sample) then work from any working folder, not only the checkout's.
    """
    path = Path(path)
    for candidate in (path, REPO_ROOT / path):
        if candidate.exists():
            return candidate
    return None


def shown_default(f: dataclasses.Field) -> Any:
    """A setting's default as --help and docs/flags.md show it: ``metadata["shown"]`` where the default depends
    on the delta type, the delta types' recipes where they give one (``recipe_text``), else the default."""
    if "shown" in f.metadata:
        return f.metadata["shown"]
    default = f.metadata["default"]
    if any(f.name in entry.recipe for entry in REGISTRY.values()):
        return recipe_text(f.name, default)
    return " ".join(default) if isinstance(default, list) else default


def recipe_text(name: str, default: Any) -> str:
    """``the delta type's recipe: adapter 0.001, lora 0.002 (gemma3_text 0.001), ...`` for the setting ``name``
    (``default`` for the types whose recipe leaves it out; a family's own value in brackets)."""
    def value(entry: DeltaType) -> str:
        families = "; ".join(f"{family} {settings[name]}" for family, settings in entry.family_recipes.items()
                             if name in settings)
        return f"{entry.recipe.get(name, default)}" + (f" ({families})" if families else "")

    values = ", ".join(f"{t} {value(entry)}" for t, entry in REGISTRY.items())
    return f"the delta type's recipe: {values}"


def markdown_table() -> str:
    """The flag table of docs/flags.md, generated from RunConfig so the two cannot drift."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(RunConfig):
        default = shown_default(f)
        rows.append(f"| `--{f.name}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m optqa.config > table.md: the flag table of docs/flags.md
    print(markdown_table())
