"""Which flags a run reads and which options go together, checked before any backbone loads.

A mode reads the settings its config holds (``optqa.config.MODE_SECTIONS``): ``config_for`` builds that config from
the flags typed and refuses any other flag; ``check_run(config)`` is the one gate for the rest: the command line
calls it on every run, the training loop calls it again for library callers. A flag that a mode or a delta type does
not read is refused, never silently ignored, and a pair of options that cannot work together is refused in one line
instead of failing in the first training step. ``combinations_table()`` renders ``COMBINATIONS`` for
docs/flags.md, so the documented outcomes are the enforced ones.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

from optqa.config import DELTA_TYPES, MODE_CONFIGS, MODES, REGISTRY, RunConfig, Settings, flags_of, setting_default
from optqa.errors import OptqaError

# Delta-specific flags and the delta types that read them (--delta_type itself chooses), from the registry.
DELTA_FLAGS: dict[str, tuple[str, ...]] = {
    flag: tuple(t for t in DELTA_TYPES if flag in flags_of(t))
    for flag in dict.fromkeys(flag for t in DELTA_TYPES for flag in flags_of(t))}

# The flags each mode reads (besides --mode): its config's fields.
MODE_FLAGS: dict[str, frozenset[str]] = {
    mode: frozenset(f.name for f in dataclasses.fields(cls) if f.name != "mode") for mode, cls in MODE_CONFIGS.items()}

SOFT_PIECE = '"soft"'


def processes() -> int:
    """How many processes this run has: torchrun and accelerate launch both set WORLD_SIZE."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def _on_cpu(config: RunConfig) -> bool:
    import torch

    return config.cpu or not torch.cuda.is_available()


@dataclass(frozen=True)
class Combination:
    """One pair of options and what happens to it.

    ``refused`` decides for a run config whether this pair is asked for and refused (then ``outcome`` is the
    error line); rows without it work, and ``outcome`` says how that is known (a test or a check by hand).
    ``typed``: a setting that counts only when it was given (a resolved config cannot tell a typed default
    from an untyped one).
    """
    first: str
    second: str
    outcome: str
    refused: Callable[[RunConfig], bool] | None = None
    typed: str | None = None


BY_HAND = "works: checked by hand (2 CPU processes, trains, saves and answers)"
# optqa.quantize raises the same lines for library callers (and for a precision a checkpoint recorded)
QUANTIZE_WITH_PRECISION = ("--quantize int8 computes around its int8 matmuls in fp32; it cannot be combined with "
                           "--precision bf16 or fp16")
QUANTIZE_WITH_FSDP = "--quantize int8 needs the whole backbone in one process; it cannot be combined with --fsdp"
COMBINATIONS: tuple[Combination, ...] = (
    *(Combination(f"--delta_type {name}", "--gradient_checkpointing",
                  f"--delta_type {name} cannot be combined with --gradient_checkpointing (transformers recomputes the "
                  "layers without the prefix positions); drop --gradient_checkpointing or choose another --delta_type",
                  lambda c, name=name: c.delta_type == name and c.gradient_checkpointing)
      for name, entry in REGISTRY.items() if not entry.gradient_checkpointing),
    Combination("--delta_type adapter", "--gradient_checkpointing",
                "works, same losses: tests/test_distributed.py::test_gradient_checkpointing_gives_the_same_losses"),
    Combination("--delta_type lora, bitfit, soft_prompt", "--gradient_checkpointing",
                "works, same losses: tests/test_options.py::test_gradient_checkpointing_keeps_the_losses"),
    Combination('a {"soft"} template', "--gradient_checkpointing",
                "works, same losses: tests/test_options.py::test_gradient_checkpointing_keeps_the_losses"),
    Combination("--delta_type adapter", "--fsdp (2 processes)",
                "works, same delta as 1 process: tests/test_distributed.py::test_fsdp_shards_the_backbone_and_trains_"
                "like_one_process"),
    Combination("--delta_type lora, bitfit, prefix", "--fsdp (2 processes)", BY_HAND),
    Combination('a {"soft"} template', "--fsdp (2 processes)", BY_HAND),
    Combination("--fsdp", "--gradient_checkpointing", BY_HAND + " with adapter and lora"),
    Combination("--fsdp (2 processes)", "--precision bf16", "works: checked by hand (lora, 2 CPU processes)"),
    Combination("--fsdp", "1 process", "works unsharded, with a warning: tests/test_distributed.py::"
                                       "test_fsdp_in_one_process_warns_and_trains_unsharded"),
    Combination("--delta_type adapter", "2 processes (DDP)",
                "works, same delta as 1 process: tests/test_distributed.py::test_two_processes_train_like_one"),
    Combination("--delta_type lora, bitfit, prefix", "2 processes (DDP)", BY_HAND),
    Combination("--delta_type soft_prompt", "--fsdp, 2 processes, --precision bf16",
                "works: checked by hand (2 CPU processes with --fsdp --precision bf16; DDP; 1 process bf16)"),
    Combination("--delta_type adapter, lora", "--precision bf16",
                "works, tracks fp32: tests/test_speed_paths.py::test_bf16_and_fp32_give_matching_losses_and_answers"),
    Combination("--delta_type bitfit, prefix", "--precision bf16", "works: checked by hand (1 process)"),
    Combination("--precision fp16", "a CPU (no CUDA GPU, or --cpu)",
                "--precision fp16 trains only on a CUDA GPU (it needs loss scaling); on a CPU use bf16 or fp32",
                lambda c: c.mode in ("train", "demo") and c.precision == "fp16" and _on_cpu(c)),
    Combination("--quantize int8", "--precision bf16, fp16", QUANTIZE_WITH_PRECISION,
                lambda c: c.quantize == "int8" and c.precision in ("bf16", "fp16")),
    Combination("--quantize int8", "--fsdp", QUANTIZE_WITH_FSDP, lambda c: c.quantize == "int8" and c.fsdp),
    Combination("--quantize int8", "every --delta_type",
                "works, answers as fp32: tests/test_quantize.py::test_int8_answers_like_fp32_for_every_delta_type"),
    Combination('a {"soft"} template', "every --delta_type",
                "works: tests/test_backbones.py::test_every_delta_trains_saves_and_reloads"),
    Combination("merged LoRA (--merge_lora)", "unmerged",
                "works, same answers: tests/test_speed_paths.py::test_merged_and_unmerged_lora_agree"),
    Combination("merged LoRA (--merge_lora)", 'a {"soft"} template, --precision bf16',
                "works: checked by hand (interactive_inference)"),
    *(Combination(f"--{flag}", "--predictions_file",
                  f"--{flag} sets how a model is prompted, and --predictions_file scores answers already written; "
                  f"drop one of them", lambda c, flag=flag: bool(getattr(c, flag)) and c.predictions_file is not None)
      for flag in ("no_delta", "num_shots", "chat_template")),
    Combination("--no_delta", "--delta_save_path",
                "--no_delta scores the bare backbone and reads no checkpoint; drop --delta_save_path (or --no_delta)",
                lambda c: c.no_delta and c.mode == "evaluate", typed="delta_save_path"),
    Combination("--chat_template", "--mode train, evaluate",
                "works, same prompt everywhere: tests/test_baselines.py::test_a_delta_trained_with_the_chat_template_"
                "records_it_and_answers_with_it"),
    Combination("--mode evaluate, interactive_inference, export, import_opendelta, inspect, download",
                "2 processes",
                "--mode {mode} runs in one process: start it with python -m optqa, not torchrun or accelerate "
                "launch (only --mode train and demo use several processes)",
                lambda c: c.mode not in ("train", "demo") and processes() > 1),
)


def check_combinations(config: RunConfig, given: Callable[[str], bool]) -> None:
    """Refuse the first pair of options in ``COMBINATIONS`` that this run asks for and that is refused.

    Args:
        config: the run's settings, resolved.
        given: whether a setting was given (typed, or set by a library caller).
    Raises:
        OptqaError: the pair's one-line reason.
    """
    for combination in COMBINATIONS:
        if (combination.refused is not None and combination.refused(config)
                and (combination.typed is None or given(combination.typed))):
            raise OptqaError(combination.outcome.format(mode=config.mode))


def _given(config: Settings, name: str) -> bool:
    """Whether ``name`` was given: typed for a mode's config (None is not typed); different from the default for a
    library ``RunConfig``, which holds every setting."""
    if isinstance(config, RunConfig):
        return getattr(config, name) != setting_default(name)
    return getattr(config, name, None) is not None


def config_for(given: dict[str, Any]) -> Settings:
    """The config of the mode ``given["mode"]`` (default train) from the flags given.

    Args:
        given: flag -> value for each flag typed (no dashes), as ``cli.parse_flags`` returns them.
    Returns:
        The mode's config (``optqa.config.MODE_CONFIGS``); a flag not typed is None.
    Raises:
        OptqaError: naming the first flag the mode does not read, and the modes that read it.
    """
    mode = given.get("mode") or setting_default("mode")
    for name in sorted(set(given) - {"mode"}):
        if name not in MODE_FLAGS[mode]:
            users = [m for m in MODES if name in MODE_FLAGS[m]]
            raise OptqaError(f"--{name} does not apply to --mode {mode} (it is read by "
                             f"{', '.join('--mode ' + m for m in users) or 'no mode'}); drop it")
    return MODE_CONFIGS[mode](**given)


def check_delta_flags(config: Settings) -> None:
    """Refuse a delta flag given (not None) in a mode's config that the chosen delta type does not read.

    Raises:
        OptqaError: naming the first such flag and the delta types it applies to.
    """
    if not hasattr(config, "delta_type"):
        return  # the delta comes from a checkpoint
    delta_type = config.delta_type or setting_default("delta_type")
    for name in sorted(DELTA_FLAGS):
        if getattr(config, name) is not None and delta_type not in DELTA_FLAGS[name]:
            raise OptqaError(f"--{name} does not apply to --delta_type {delta_type} (only to "
                             f"{', '.join(DELTA_FLAGS[name])}); drop it")


# Numeric flags and the values they take; anything else used to end in a traceback deep in a run.
AT_LEAST_ONE = ("batch_size", "eval_batch_size", "max_seq_l", "max_new_tokens", "train_epochs",
                "gradient_accumulation_steps", "bottleneck_dim", "lora_r", "lora_alpha", "soft_token_num",
                "prefix_token_num", "num_threads")
AT_LEAST_ZERO = ("warmup_steps", "save_steps", "max_steps", "max_grad_norm", "weight_decay", "num_shots")


def check_values(config: RunConfig, spell: str = "--{}") -> None:
    """Refuse a numeric flag outside its range, naming the flag, the range and the value.

    Args:
        spell: how the message names a field (a checkpoint's ``hyperparameters.{}``).
    Raises:
        OptqaError: the first such flag.
    """
    def refuse(name: str, wanted: str) -> None:
        raise OptqaError(f"{spell.format(name)} must be {wanted}, got {getattr(config, name)}")

    for name in AT_LEAST_ONE:
        value = getattr(config, name)
        if value is not None and value < 1:
            refuse(name, "at least 1")
    for name in AT_LEAST_ZERO:
        if getattr(config, name) < 0:
            refuse(name, "at least 0")
    if not config.lr > 0:
        refuse("lr", "more than 0")
    if not 0 <= config.lora_dropout < 1:
        refuse("lora_dropout", "at least 0 and less than 1")


def check_run(config: Settings) -> None:
    """Every check a run's options must pass before data or a backbone is read.

    Args:
        config: a mode's config (``config_for``: None is a flag not typed) or a library caller's ``RunConfig``.
    Raises:
        OptqaError: the first problem, in one line.
    """
    if not isinstance(config, RunConfig):  # a RunConfig has every delta flag set: no flag to refuse
        check_delta_flags(config)
    settings = RunConfig.of(config) if not isinstance(config, RunConfig) else config
    check_values(settings)
    check_combinations(settings, lambda name: _given(config, name))


def combinations_table() -> str:
    """docs/flags.md's table of option pairs, generated from ``COMBINATIONS``."""
    rows = ["| option | with | outcome |", "| --- | --- | --- |"]
    for c in COMBINATIONS:
        outcome = f"refused: `error: {c.outcome}`" if c.refused else c.outcome
        rows.append(f"| {c.first} | {c.second} | {outcome} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m optqa.options: docs/flags.md's table of option pairs
    print(combinations_table())


def positions_needed(config: RunConfig, delta: dict | None = None) -> list[tuple[str, int]]:
    """The flags whose values add up to the positions one sequence can take, with their values.

    A prompt takes at most ``max_seq_l`` tokens (a template's ``{"soft"}`` tokens are among them, and a longer
    question is cut to fit), the answer up to ``max_new_tokens`` more, and a soft prompt's virtual tokens and
    a prefix's positions come before both: OPT numbers them all.

    Args:
        config: the run's configuration (max_seq_l, max_new_tokens).
        delta: the delta config when it differs from the run's flags (a checkpoint's); default the run's.
    Returns:
        ``[(flag, value), ...]``, whose values sum to the positions needed.
    """
    delta = delta if delta is not None else config.delta_config()
    needed = [("--max_seq_l", config.max_seq_l), ("--max_new_tokens", config.max_new_tokens)]
    entry = REGISTRY.get(delta.get("delta_type"))
    if entry is not None and entry.virtual_tokens:
        needed.append((f"--{entry.virtual_tokens}", int(delta.get(entry.virtual_tokens, 0))))
    return needed


def check_length_budget(config: RunConfig, max_positions: int | None, backbone: str,
                        delta: dict | None = None) -> None:
    """Refuse, before the backbone loads, a run whose longest sequence would not fit the backbone's positions.

    Args:
        config: the run's configuration.
        max_positions: the backbone's ``max_position_embeddings``; None (unknown) skips the check.
        backbone: the backbone's name, for the message.
        delta: a checkpoint's delta config (default: the run's).
    Raises:
        OptqaError: naming every flag that counts, its value, and the backbone's limit.
    """
    if max_positions is None:
        return
    needed = positions_needed(config, delta)
    total = sum(value for _, value in needed)
    if total <= max_positions:
        return
    spelled = " + ".join(f"{flag} {value}" for flag, value in needed)
    excess = total - max_positions
    # a checkpoint fixes max_seq_l (its prompts were cut to it in training): only max_new_tokens is left to lower
    flag, value = ("--max_new_tokens", config.max_new_tokens) if delta is not None else ("--max_seq_l", config.max_seq_l)
    hint = f"lower {flag} to {value - excess}" if value > excess else "lower --max_new_tokens"
    raise OptqaError(f"{spelled} = {total} positions, more than the {max_positions} of backbone {backbone} "
                     f"(max_position_embeddings); {hint} or less")
