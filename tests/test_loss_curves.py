"""The per-step training losses of one tiny run per delta type are fixed numbers: numeric drift in torch,
transformers or peft (another initialisation, kernel or default) shows up here as a changed curve, even where
every other test still passes because the runs they compare drift together.

EXPECTED was recorded from these exact runs with torch 2.13.0+cpu, transformers 5.24.0, peft 0.21.2,
accelerate 1.15.0, tokenizers 0.23.3 on an x86-64 Intel Xeon CPU; the same values (to the 6 decimals the run
folder logs) came out of two runs each with 1 and with 2 torch threads. A dependency upgrade that changes them
on purpose means recording them again, after checking that the change is the dependency's and not optqa's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import train_in_process

from optqa.config import DELTA_TYPES

# one torch thread only for speed on a busy machine: the curves did not depend on the thread count
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# batch 2 over the 8 memory questions (padding in every batch), 2 epochs: 8 optimiser steps on a linear schedule
SETTINGS = ("--batch_size", "2", "--train_epochs", "2", "--lr", "1e-2", "--precision", "fp32", "--seed", "0",
            "--max_new_tokens", "1")

# the deltas that start as the identity (LoRA's B, the adapter's up-projection at zero, bitfit's biases as they
# were) share the backbone's first loss; the prompt deltas change the input from the first step
EXPECTED = {
    "adapter": [11.304915, 12.09067, 9.662753, 10.073481, 7.752916, 5.871034, 7.896637, 7.614629],
    "lora": [11.304915, 12.666462, 9.868337, 8.465244, 4.774792, 4.909399, 6.905887, 6.047882],
    "bitfit": [11.304915, 11.895583, 9.431724, 9.961131, 7.896337, 6.134627, 8.291206, 8.12521],
    "soft_prompt": [11.300644, 12.771041, 11.214961, 12.826671, 12.14959, 10.388278, 12.508587, 12.999115],
    # re-recorded (torch 2.13.0+cpu, transformers 5.25.0, peft 0.21.2, AMD EPYC) when the prefix started from its
    # init text's keys and values (Li and Liang) instead of random values
    "prefix": [11.354144, 12.779225, 11.355199, 12.639173, 12.237265, 10.531335, 12.373363, 12.979048],
}


def test_every_delta_type_has_a_curve():
    assert tuple(EXPECTED) == DELTA_TYPES


@pytest.mark.parametrize("delta_type", DELTA_TYPES)
def test_loss_curve_is_the_recorded_one(tiny_opt, memory_data, tmp_path, delta_type):
    summary = train_in_process(tiny_opt, memory_data, tmp_path, "--delta_type", delta_type, *SETTINGS)
    rows = [json.loads(line) for line in (Path(summary.run_dir) / "train_loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert [row["loss"] for row in rows] == pytest.approx(EXPECTED[delta_type], abs=1e-4)
