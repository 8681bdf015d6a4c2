"""Checkpoint locations: a folder, or a single-file bundle (extracted to a temporary folder to load)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from .errors import OptqaError


@contextlib.contextmanager
def open_checkpoint(path: str | Path) -> Iterator[Path]:
    path = Path(path)
    if path.is_file():
        raise OptqaError(f"{path} is a file; bundles are not supported yet")
    yield path
