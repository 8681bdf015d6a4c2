"""The CPU thread rule (optqa.hardware.choose_threads): --num_threads, then OMP_NUM_THREADS, then 1 for a small
backbone, else the usable cores that other work leaves free; and the entry points apply it once the backbone is
loaded. The machine's cores, load and the work are set by the tests, so every decision is an exact value."""
from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from conftest import train_in_process

from optqa import hardware


@pytest.fixture
def machine(monkeypatch):
    """An 8-CPU machine with no other work, no OMP_NUM_THREADS and one process; tests change one input."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 8)
    monkeypatch.setattr(hardware, "_torch_default_threads", lambda: 8)
    monkeypatch.setattr(hardware, "own_load", lambda: 0.0)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))

    def set_load(load: float, own: float = 0.0) -> None:
        monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
        monkeypatch.setattr(hardware, "own_load", lambda: own)
    return set_load


@pytest.mark.parametrize("load, own, hidden_size, expected", [
    (0.0, 0.0, None, 8),    # a quiet machine, work not known yet: every core
    (0.0, 0.0, 768, 8),     # OPT-125m's width, SMALL_HIDDEN_SIZE itself: every core
    (0.0, 0.0, 4096, 8),
    (0.0, 0.0, 767, 1),     # below it: one thread, however quiet the machine
    (0.0, 0.0, 512, 1),
    (0.0, 0.0, 64, 1),      # the demo's tiny OPT
    (2.6, 0.0, 768, 5),     # 8 - 2.6 = 5.4 CPUs free, rounded
    (2.4, 0.0, 768, 6),     # 5.6 free
    (3.0, 1.0, 768, 6),     # this process's own share of the load is not other work: 8 - 2
    (7.6, 0.0, 768, 1),     # 0.4 free rounds to 0: still one thread
    (20.0, 0.0, None, 1),   # a machine far over its cores
    (0.5, 2.0, 768, 8),     # own share above the load (its estimate is rough): no negative busy CPUs
])
def test_rule_takes_the_free_cores_and_one_for_a_small_backbone(machine, load, own, hidden_size, expected):
    machine(load, own)
    assert hardware.choose_threads(None, hidden_size)[0] == expected


def test_rule_stays_within_usable_cpus_and_torch_default_shared_by_processes(machine, monkeypatch):
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 2)  # affinity mask or container quota
    assert hardware.choose_threads(None, 768) == (2, "2 usable CPUs, 0.0 busy with other work (1-minute load "
                                                     "average)")
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 8)
    monkeypatch.setattr(hardware, "_torch_default_threads", lambda: 4)  # 4 physical cores, 8 logical CPUs
    assert hardware.choose_threads(None, 768)[0] == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert hardware.choose_threads(None, 768) == (1, "8 usable CPUs, 0.0 busy with other work (1-minute load "
                                                     "average), shared by 3 processes")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert hardware.choose_threads(None, 768)[0] == 1  # never below one thread per process


def test_reasons_name_the_busy_cpus_and_the_small_backbone(machine):
    machine(3.25)
    assert hardware.choose_threads(None, 1024) == (5, "8 usable CPUs, 3.2 busy with other work (1-minute load "
                                                      "average)")
    assert hardware.choose_threads(None, 64) == (1, "hidden size 64 < 768, too little work per matmul to split")


def test_no_load_average_counts_no_busy_cpus(machine, monkeypatch):
    monkeypatch.delattr(os, "getloadavg")  # Windows has none
    assert hardware.busy_cpus() == 0.0
    assert hardware.choose_threads(None, 768)[0] == 8


@pytest.mark.parametrize("hidden_size", [None, 64, 768])
def test_num_threads_then_omp_num_threads_win_over_the_rule(machine, monkeypatch, hidden_size):
    machine(30.0)
    assert hardware.choose_threads(3, hidden_size) == (3, "--num_threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert hardware.choose_threads(3, hidden_size) == (3, "--num_threads")
    assert hardware.choose_threads(None, hidden_size) == (2, "OMP_NUM_THREADS")
    assert hardware.choose_threads(0, hidden_size) == (2, "OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # not a count: the rule decides
    assert hardware.choose_threads(None, hidden_size)[0] == 1


def test_own_load_weighs_the_process_like_the_load_average(monkeypatch):
    monkeypatch.setattr(hardware, "_STARTED", 1000.0)
    monkeypatch.setattr(hardware.time, "monotonic", lambda: 1120.0)  # two minutes old
    monkeypatch.setattr(hardware.time, "process_time", lambda: 60.0)  # half a CPU on average
    assert hardware.own_load() == pytest.approx(0.5 * (1 - math.exp(-2)))


def test_configure_threads_sets_torch_and_logs_the_first_decision_that_knows_the_work(machine, monkeypatch, caplog):
    monkeypatch.setattr(hardware, "_announced", False)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.DEBUG, logger="optqa.hardware"):
            assert hardware.configure_threads(None) == 8 and torch.get_num_threads() == 8
            assert hardware.configure_threads(None, 64) == 1 and torch.get_num_threads() == 1
            assert hardware.configure_threads(None, 64) == 1
    finally:
        torch.set_num_threads(before)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info == ["torch uses 1 CPU thread: hidden size 64 < 768, too little work per matmul to split"]
    assert len(caplog.records) == 3


@pytest.mark.parametrize("flags, threads, reason", [
    ((), 1, "hidden size 64 < 768, too little work per matmul to split"),
    (("--num_threads", "2"), 2, "--num_threads"),
])
def test_training_sets_threads_from_the_loaded_backbone(machine, monkeypatch, caplog, tiny_opt, memory_data, tmp_path,
                                                        flags, threads, reason):
    monkeypatch.setattr(hardware, "_announced", False)
    seen = []
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="optqa.hardware"):
            train_in_process(tiny_opt, memory_data, tmp_path, "--train_epochs", "1", "--max_new_tokens", "2",
                             "--save_steps", "0", *flags, on_step=lambda step: seen.append(torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {threads}  # every training step ran on the chosen count
    plural = "" if threads == 1 else "s"
    assert [r.getMessage() for r in caplog.records if r.name == "optqa.hardware"] == [
        f"torch uses {threads} CPU thread{plural}: {reason}"]
