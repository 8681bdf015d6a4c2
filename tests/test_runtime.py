"""Building the process group has no side effects beyond accelerate's own: no redirected stdout, no root log
level, no process-wide warning filter (they belong to the entry point and to scoped blocks)."""
from __future__ import annotations

import logging
import sys
import warnings

from optqa.config import RunConfig
from optqa.run.runtime import make_accelerator, quiet_fsdp_views


def test_making_the_accelerator_leaves_the_process_as_it_was():
    make_accelerator(RunConfig(cpu=True, precision="fp32"))  # accelerate's own import-time filters come first
    stdout, level, filters = sys.stdout, logging.getLogger().level, list(warnings.filters)
    accelerator = make_accelerator(RunConfig(cpu=True, precision="fp32"))
    assert accelerator.num_processes == 1 and accelerator.device.type == "cpu"
    assert sys.stdout is stdout
    assert logging.getLogger().level == level
    assert warnings.filters == filters


def test_the_fsdp_view_warning_is_silenced_inside_the_block_only():
    message = "FSDP2-wrapped module (FSDPOPTDecoderLayer) returned a view of a tensor"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_fsdp_views():
            warnings.warn(message)
            warnings.warn("another warning")
        warnings.warn(message)
    assert [str(w.message) for w in caught] == ["another warning", message]
