"""Files written so that nothing is ever torn, unreadable to the group, or invalid JSON.

Every write goes to a temp file in the same folder, then `os.replace`: readers (and a crash
mid-write) see either the old file or the complete new one. Temp files carry the host and pid of
their writer, so a later run can tell the leftovers of a killed process from a write in flight.
Files get the mode the umask allows (`mkstemp` alone would make them 0600, which breaks shared
caches and run folders).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

HOST = socket.gethostname().replace(".", "_") or "host"
STALE_TEMP_SECONDS = 24 * 3600
_UMASK: int | None = None


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks (images for cache keys, checkpoints for encoder identity)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_mode() -> int:
    """The mode a plain `open()` would give a new file under this process's umask."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)  # reading the umask means setting it; put it straight back
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line for a one-line message (some exceptions have an empty message)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]  # the reason follows
    return text[:limit]


def temp_prefix(path: Path) -> str:
    return f".{path.name}.{HOST}.{os.getpid()}."


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], durable: bool = False) -> None:
    """Call `write(file)` on a temp file beside `path`, then rename it over `path`.

    `durable` also fsyncs the data and the folder (checkpoints: hours of work). A failure raises
    OSError naming `path` (not the temp file), and leaves no temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
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
    except OSError as exc:
        raise OSError(exc.errno or errno.EIO, exc.strerror or first_line(exc), str(path)) from None
    except RuntimeError as exc:  # torch.save reports a failed write (e.g. a full disk) as RuntimeError
        raise OSError(errno.EIO, f"writing failed ({first_line(exc, 160)})", str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes) -> None:
    """`data` as the whole file, written atomically."""
    atomic_write(path, lambda f: f.write(data))


def json_safe(value: Any) -> Any:
    """The value with NaN and infinities replaced by None: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(value: Any) -> str:
    return json.dumps(json_safe(value), allow_nan=False)


def read_json(path: Path, what: str, error: type[Exception], kind: type = list) -> Any:
    """A JSON file's value, which must be a `kind`; else `error` with one line naming `what` and `path`
    (and the line of a syntax error)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{what} '{path}' is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} '{path}' line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(value, kind):
        shape = "a JSON list of objects" if kind is list else "a JSON object"
        raise error(f"{what} '{path}' must hold {shape}, not a {type(value).__name__}")
    return value


def write_json(path: str | Path, value: Any, sort_keys: bool = False) -> None:
    """JSON (indented, for people and tools, non-finite numbers as null), written atomically."""
    write_bytes(path, json.dumps(json_safe(value), indent=1, sort_keys=sort_keys, allow_nan=False).encode())


def write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """One JSON value per line, written atomically."""
    write_bytes(path, "".join(json_line(r) + "\n" for r in records).encode())


def append_jsonl(path: str | Path, record: Any) -> None:
    """Append one line (a whole line per write call, so concurrent appenders never interleave within a line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json_line(record) + "\n")
        f.flush()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def writer_gone(host: str, pid: int, mtime: float, now: float | None = None) -> bool:
    """Whether the writer of a file tagged (host, pid) can no longer touch it: dead on this host, or
    silent for a day (another host's process cannot be asked)."""
    if host == HOST and not pid_alive(pid):
        return True
    return (now or time.time()) - mtime > STALE_TEMP_SECONDS


def _temp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) from a temp file name `.<file>.<host>.<pid>.<random>.tmp`; None if not one of ours."""
    parts = name[:-4].split(".") if name.startswith(".") and name.endswith(".tmp") else []
    if len(parts) < 5 or not parts[-2].isdigit():
        return None
    return parts[-3], int(parts[-2])


def remove_stale_temps(folder: str | Path, recursive: bool = False) -> tuple[int, int]:
    """Delete temp files left by killed writers (see `writer_gone`); returns (files, bytes).
    Writes in flight, and files that are not this tool's temp files, are left alone."""
    folder = Path(folder)
    files = size = 0
    if not folder.is_dir():
        return 0, 0
    now = time.time()
    candidates = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    for path in candidates:
        owner = _temp_owner(path.name)
        if owner is None:
            continue
        try:
            stat = path.stat()
            if writer_gone(owner[0], owner[1], stat.st_mtime, now):
                path.unlink()
                files += 1
                size += stat.st_size
        except OSError:  # gone meanwhile, or not ours to delete
            continue
    return files, size


def load_torch_file(path: str | Path, error: type[Exception], what: str) -> Any:
    """`torch.load` of an untrusted file: on CPU, weights only (a file cannot run code). Any failure
    raises `error` with one line that keeps the reason (e.g. the global that weights-only loading
    blocked, and why)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} '{path}' does not exist")
    if path.stat().st_size == 0:
        raise error(f"{what} '{path}' is empty (0 bytes): an interrupted copy or download?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or foreign files raise many types
        text = str(exc)
        if "Unsupported global:" in text:
            blocked = text.split("Unsupported global:", 1)[1].split(" was not")[0].strip()
            raise error(f"{what} '{path}' cannot be loaded safely: it holds {blocked}, which weights-only loading "
                        "blocks because unpickling it could allow arbitrary code execution; load it only if you trust "
                        "its source, and save its tensors alone") from None
        if "WeightsUnpickler error:" in text:
            detail = next((line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines()
                           if line.strip()), "")
            raise error(f"{what} '{path}' cannot be read: not a PyTorch checkpoint ({detail[:120]})") from None
        raise error(f"{what} '{path}' cannot be read: {first_line(exc, 200)}") from None
