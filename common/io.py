"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a mix."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

TMP_PREFIX = ".tmp-"  # leftovers of a crash mid-write start with this and are never read


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` via a temp file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def atomic_write_json(path: Path, payload: Any) -> None:
    """Strict JSON (no NaN/inf), sorted keys; numpy scalars and paths are converted."""
    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False, default=_jsonable)
    atomic_write(Path(path), lambda f: f.write((text + "\n").encode()))
