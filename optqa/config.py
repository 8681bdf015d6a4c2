"""The one typed configuration: defaults for the CLI, the saved checkpoint and the README table.

Every field carries its help text in ``metadata["help"]``; ``optqa.cli`` builds argparse from these fields
and ``markdown_table()`` renders the README's flag table, so a default is written in exactly one place.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# templates/ and data/sample/ sit beside the package in a checkout; default paths are relative to it
REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ("train", "evaluate", "interactive_inference", "demo", "inspect", "export", "push", "download",
         "import_opendelta", "serve")
DELTA_TYPES = ("adapter", "lora", "bitfit", "soft_prompt", "prefix")
DEFAULT_TEMPLATE = "templates/answer_template.txt"
QUANTIZE_CHOICES = ("none", "int8", "auto")
# the CLI's modules for adapter and lora, as in the homework (the library's LoRA default is q_proj and v_proj)
CLI_MODIFIED_MODULES = ("self_attn", "fc2")
# the delta types --modified_modules applies to
MODULE_DELTA_TYPES = ("adapter", "lora", "bitfit")
# Per-delta defaults, shared by AutoDeltaConfig (the library API) and the CLI flags below.
# soft_token_num is 20, not OpenDelta's 100: ARC-DA prompts average ~29 tokens, and on a CPU the cost of a
# step grows with the prompt length.
DELTA_DEFAULTS: dict[str, dict[str, Any]] = {
    "adapter": {"modified_modules": ["self_attn", "fc2"], "bottleneck_dim": 24, "non_linearity": "gelu_new"},
    "lora": {"modified_modules": ["self_attn.q_proj", "self_attn.v_proj"], "lora_r": 8, "lora_alpha": 16,
             "lora_dropout": 0.0},
    "bitfit": {"modified_modules": None},
    "soft_prompt": {"soft_token_num": 20, "init_text": "Answer the science question briefly."},
    "prefix": {"prefix_token_num": 6},
}


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RunConfig:
    # what to do: train a delta, score one, chat with one, or manage checkpoints
    mode: str = _opt("train", "what to run", choices=MODES)
    # ARC-DA folder with train/dev/test.jsonl (downloaded automatically by --mode train when missing)
    data_path: str = _opt("./data/ARC-DA-v1.1", "folder holding train.jsonl, dev.jsonl and test.jsonl")
    # per-split overrides so any QA jsonl can be used
    train_file: str | None = _opt(None, "training jsonl (default: <data_path>/train.jsonl)")
    dev_file: str | None = _opt(None, "dev jsonl (default: <data_path>/dev.jsonl)")
    test_file: str | None = _opt(None, "test jsonl (default: <data_path>/test.jsonl)")
    # field names inside each jsonl row, for QA sets that are not ARC-DA
    question_field: str = _opt("question", "jsonl field holding the question")
    answers_field: str = _opt("answers", "jsonl field holding the list of gold answers (or one string)")
    id_field: str = _opt("question_id", "jsonl field holding the question id (line number if absent)")
    # ARC-DA's official download location; --mode download fetches it
    data_url: str = _opt("https://aristo-data-public.s3-us-west-2.amazonaws.com/arc-da/ARC-DA-v1.1.zip",
                         "where --mode download fetches ARC-DA v1.1 from")
    # keep downloaded files whose sha256 differs from the pinned v1.1 values
    allow_checksum_mismatch: bool = _opt(False, "accept ARC-DA files whose sha256 differs from the pinned values")

    # model family name for load_plm (OpenPrompt's model_name)
    plm_name: str = _opt("opt", "model family, as in OpenPrompt's load_plm(model_name, ...)")
    # a hub name or a local Hugging Face folder; offline machines must pass a local folder
    plm_path: str = _opt("facebook/opt-125m", "backbone: a hub name or a local Hugging Face folder")
    # which delta to inject into the frozen backbone
    delta_type: str = _opt("adapter", "delta (parameter-efficient) method", choices=DELTA_TYPES)
    # OpenDelta-style short module names the delta attaches to (adapter, lora, bitfit); None: the delta type's
    # default, resolved in __post_init__ so that a manifest records what was actually modified
    modified_modules: list[str] | None = _opt(None, "modules the delta attaches to (OpenDelta short names; adapter, "
                                                    "lora, and bitfit, which without it takes every Linear and "
                                                    "LayerNorm of the decoder layers)", nargs="+",
                                              shown=" ".join(CLI_MODIFIED_MODULES))
    # adapter: bottleneck width (OpenDelta's default)
    bottleneck_dim: int = _opt(DELTA_DEFAULTS["adapter"]["bottleneck_dim"], "adapter bottleneck width")
    # lora: rank, scale numerator and dropout (OpenDelta's defaults)
    lora_r: int = _opt(DELTA_DEFAULTS["lora"]["lora_r"], "LoRA rank")
    lora_alpha: int = _opt(DELTA_DEFAULTS["lora"]["lora_alpha"], "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _opt(DELTA_DEFAULTS["lora"]["lora_dropout"], "LoRA dropout")
    # soft_prompt: prompt length (see DELTA_DEFAULTS for why 20)
    soft_token_num: int = _opt(DELTA_DEFAULTS["soft_prompt"]["soft_token_num"], "soft_prompt: number of virtual tokens")
    # soft_prompt: text whose token embeddings initialise the prompt ("" for random init)
    soft_init_text: str = _opt(DELTA_DEFAULTS["soft_prompt"]["init_text"], "soft_prompt: initialisation text")
    # prefix: virtual key/value positions per layer (OpenDelta's default)
    prefix_token_num: int = _opt(DELTA_DEFAULTS["prefix"]["prefix_token_num"], "prefix: number of prefix positions")

    # OpenPrompt ManualTemplate file (or inline template text)
    template: str = _opt(DEFAULT_TEMPLATE, "template file in templates/ (or inline template text)")
    # questions per optimisation step
    batch_size: int = _opt(8, "training batch size")
    # questions answered at once when scoring
    eval_batch_size: int = _opt(32, "answering batch size")
    # prompt + answer + eos tokens; longer questions are cut, never the answer or the template text
    max_seq_l: int = _opt(128, "maximum tokens per example (the question is cut to fit)")
    # greedy answers stop at eos or after this many tokens
    max_new_tokens: int = _opt(32, "maximum generated answer tokens")
    lr: float = _opt(1e-3, "learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    train_epochs: int = _opt(3, "training epochs")
    warmup_steps: int = _opt(0, "linear warm-up steps")
    # gradients are clipped to this norm (0 turns clipping off)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)")
    gradient_accumulation_steps: int = _opt(1, "batches per optimiser step")
    # one target per question is the homework's setup and keeps an epoch 3.4x cheaper than 'all'
    train_targets: str = _opt("first", "train on the first gold answer or on every gold answer",
                              choices=("first", "all"))
    # batching examples of similar length cuts padding; order across batches stays random
    group_by_length: bool = _opt(True, "bucket training examples by length")
    seed: int = _opt(42, "random seed (data order, delta init, dropout)")

    # the final (best-dev) delta, as a self-describing checkpoint folder
    delta_save_path: str = _opt("./delta_ckpts/", "final delta checkpoint folder (to load: also a .optqa bundle, "
                                                 "hf://OWNER/NAME[@REVISION] or a PEFT adapter folder)")
    # best-epoch delta plus the state needed by --resume
    raw_delta_save_path: str = _opt("./raw_delta_ckpts/", "best-epoch delta and resume state")
    # every run writes its config, metrics, predictions and plot into a new folder below this
    output_dir: str = _opt("./runs", "parent folder of per-run result folders")
    # resume state is written every this many optimiser steps (and at each epoch end)
    save_steps: int = _opt(50, "write resume state every N optimiser steps")
    resume: bool = _opt(False, "continue the interrupted run found in --raw_delta_save_path")

    # split to score with --mode evaluate
    split: str = _opt("test", "split scored by --mode evaluate", choices=("train", "dev", "test"))
    # --mode evaluate without a model: score this predictions jsonl against the gold answers
    predictions_file: str | None = _opt(None, "evaluate: score this predictions jsonl instead of a model")
    # --mode evaluate: compare against a second predictions jsonl, question by question
    compare_file: str | None = _opt(None, "evaluate: second predictions jsonl to compare with")
    # --mode export: single-file bundle to write; --mode push --dry_run: the folder that would be uploaded
    export_path: str | None = _opt(None, "export: bundle file to write (default: <delta_save_path>.optqa); "
                                         "push --dry_run: folder to write")
    # --mode export: PEFT users get an adapter folder; off, export needs no backbone at all
    export_peft: bool = _opt(True, "export: also write a PEFT adapter folder <bundle name>-peft/ (lora, soft_prompt, "
                                   "prefix)")
    # --mode import_opendelta: OpenDelta folder (config.json + pytorch_model.bin) to convert
    import_path: str | None = _opt(None, "import_opendelta: OpenDelta checkpoint folder to convert")
    # --mode push: the Hub repository (created if missing) that receives the checkpoint, PEFT adapter and card
    hub_repo: str | None = _opt(None, "push: Hugging Face Hub repository OWNER/NAME to upload to")
    # --mode push: a new repository is public unless this is given (an existing one keeps its visibility)
    private: bool = _opt(False, "push: create the repository as private")
    commit_message: str | None = _opt(None, "push: commit message (default: delta type, backbone and weights hash)")
    # --mode push: build the exact folder, write it to --export_path, contact nobody
    dry_run: bool = _opt(False, "push: write the folder that would be uploaded to --export_path, upload nothing")
    # the card's base_model: a backbone loaded from a local folder names no Hub model unless the user does
    base_model: str | None = _opt(None, "push: the backbone's Hub id for the model card (default: --plm_path "
                                        "recorded in the checkpoint, if it is a Hub id)")
    # --mode serve: the deltas put behind the HTTP API, each verified at start as the question loop verifies one
    deltas: list[str] | None = _opt(None, "serve: deltas to serve as NAME=CHECKPOINT (folder or .optqa bundle); "
                                          "default: --delta_save_path as 'default'", nargs="+")
    # loopback only unless asked: the API has no rate limits and answering costs CPU
    host: str = _opt("127.0.0.1", "serve: address to listen on (0.0.0.0: every interface)")
    # 0 picks a free port; the log line 'serving ... at http://HOST:PORT/' names it
    port: int = _opt(8000, "serve: TCP port (0: any free port)")
    # the environment variable keeps the key out of shell history and process listings
    api_key: str | None = _opt(None, "serve: require 'Authorization: Bearer KEY' on every API endpoint "
                                     "(default: the OPTQA_API_KEY environment variable, else no key)")
    # load a delta onto a backbone whose fingerprint differs (architecture and shapes are still checked)
    ignore_backbone_mismatch: bool = _opt(False, "load a delta onto a backbone with different weights")

    # auto: bf16 autocast where the CPU/GPU has native bf16, else fp32
    precision: str = _opt("auto", "compute precision", choices=("auto", "fp32", "bf16", "fp16"))
    # int8 frozen backbone when answering (optqa/quantize.py); unset, it depends on the mode: auto where a person
    # waits for the answer (the question loop, serving), none for the scores train and evaluate report, so a
    # research number does not move with the CPU it was computed on
    quantize: str | None = _opt(None, "answer on an int8 frozen backbone: none, int8, or auto (int8 where the CPU "
                                      "lacks native bf16 and has int8 kernels) (default: auto for "
                                      "interactive_inference and serve, none for the scores of train and "
                                      "evaluate)",
                                choices=QUANTIZE_CHOICES)
    cpu: bool = _opt(False, "run on the CPU even when a GPU is present")
    gradient_checkpointing: bool = _opt(False, "recompute activations to save memory (large backbones)")
    # FSDP2 through accelerate: each of N processes keeps 1/N of the frozen backbone; only with several processes
    fsdp: bool = _opt(False, "shard the backbone across processes (FSDP2) for backbones that do not fit one device")
    # None: torch's default (one thread per physical core)
    num_threads: int | None = _opt(None, "CPU threads for torch")
    # merge LoRA into the weights when only answering (exact up to float rounding)
    merge_lora: bool = _opt(True, "merge LoRA weights for inference-only modes")
    # stop after this many optimiser steps in total (for smoke runs); 0 means no limit
    max_steps: int = _opt(0, "stop after N optimiser steps (0: no limit)")

    def __post_init__(self) -> None:
        # one resolved value for --modified_modules, whatever the delta type: the manifest's hyperparameters and
        # its delta config then say the same thing (a delta type without modules records None)
        if self.delta_type not in MODULE_DELTA_TYPES:
            self.modified_modules = None
        elif self.modified_modules is None and self.delta_type != "bitfit":
            self.modified_modules = list(CLI_MODIFIED_MODULES)
        elif self.modified_modules is not None:
            self.modified_modules = list(self.modified_modules)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def delta_config(self) -> dict[str, Any]:
        """The AutoDeltaConfig dict this run asks for."""
        cfg: dict[str, Any] = {"delta_type": self.delta_type}
        if self.delta_type == "adapter":
            cfg.update(modified_modules=list(self.modified_modules), bottleneck_dim=self.bottleneck_dim)
        elif self.delta_type == "lora":
            cfg.update(modified_modules=list(self.modified_modules), lora_r=self.lora_r,
                       lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout)
        elif self.delta_type == "bitfit":
            cfg.update(modified_modules=self.modified_modules)
        elif self.delta_type == "soft_prompt":
            cfg.update(soft_token_num=self.soft_token_num, init_text=self.soft_init_text)
        elif self.delta_type == "prefix":
            cfg.update(prefix_token_num=self.prefix_token_num)
        return cfg


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
    """A field's default as --help and the README show it (``metadata["shown"]`` where the default is resolved
    later, per delta type)."""
    if "shown" in f.metadata:
        return f.metadata["shown"]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return " ".join(default) if isinstance(default, list) else default


def markdown_table() -> str:
    """The README's flag table, generated from RunConfig so the two cannot drift."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(RunConfig):
        default = shown_default(f)
        rows.append(f"| `--{f.name}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m optqa.config > table.md: the README's flag table
    print(markdown_table())
