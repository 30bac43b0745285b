"""Atomic file writes: a temp file in the same folder, then `os.replace`. Readers (and a crash
mid-write) see either the old file or the complete new one, never a torn one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], durable: bool = False) -> None:
    """Call `write(file)` on a temp file beside `path`, then rename it over `path`.

    `durable` also fsyncs the data before the rename (checkpoints: hours of work)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:  # the rename itself must survive a power loss too
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, value: Any, sort_keys: bool = False) -> None:
    """JSON (indented, for people and tools), written atomically."""
    text = json.dumps(value, indent=1, sort_keys=sort_keys).encode()
    atomic_write(path, lambda f: f.write(text))
