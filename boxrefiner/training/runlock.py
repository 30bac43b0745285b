"""One run per output folder: a lock file created exclusively (`O_EXCL`) in each run folder.

Two runs writing to one folder would interleave `metrics.jsonl` and leave checkpoints from either.
The lock holds host, pid and start time. A lock whose process is dead on this host is stale and
taken over (with a log line); a lock from another host cannot be checked, so the run refuses and
names it. Creating the lock also proves, before any slow work, that the folder is writable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from boxrefiner.errors import UserError
from boxrefiner.utils.files import HOST, pid_alive

log = logging.getLogger(__name__)
LOCK_NAME = ".boxrefiner.lock"


class RunLockError(UserError):
    """The run folder is in use by another run, or cannot be written; one-line message."""


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {when}"


def _read(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """Hold `LOCK_NAME` in every given folder for the duration of a with-block."""

    def __init__(self, *folders: str | Path, what: str = "output folder"):
        self.folders = list(dict.fromkeys(Path(f).resolve() for f in folders))
        self.what = what
        self.held: list[Path] = []
        self.owner = {"host": HOST, "pid": os.getpid(), "started": time.time()}

    def __enter__(self) -> RunLock:
        try:
            for folder in self.folders:
                self._acquire(folder)
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _create(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        self.held.append(path)
        return True

    def _acquire(self, folder: Path) -> None:
        path = folder / LOCK_NAME
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if self._create(path):
                return
        except PermissionError:
            raise RunLockError(f"{self.what} '{folder}' is not writable: the run could not save anything there") from None
        owner = _read(path)
        if owner.get("host") == HOST and isinstance(owner.get("pid"), int) and not pid_alive(owner["pid"]):
            stale = path.with_name(f"{LOCK_NAME}.{HOST}.{os.getpid()}.stale")
            try:
                os.replace(path, stale)  # atomic: of two runs taking over, one moves the lock, the other finds none
            except FileNotFoundError:
                pass
            else:
                if _read(stale) != owner:  # moved a fresh lock another run had just taken: give it back
                    with contextlib.suppress(FileExistsError):
                        os.link(stale, path)
                    stale.unlink(missing_ok=True)
                    raise RunLockError(f"{self.what} '{folder}' is in use by another run ({_describe(_read(path))})")
                stale.unlink(missing_ok=True)
                log.warning("%s: taking over the lock of a run that is gone (%s)", folder, _describe(owner))
            if self._create(path):
                return
            owner = _read(path)
        hint = (f"if that run is gone, delete {path}" if owner.get("host") != HOST else
                "wait for it to finish, or give this run other output.save_dir / output.checkpoint_dir folders")
        raise RunLockError(f"{self.what} '{folder}' is in use by another run ({_describe(owner)}): {hint}")

    def release(self) -> None:
        for path in self.held:
            if _read(path).get("pid") == self.owner["pid"]:
                path.unlink(missing_ok=True)
        self.held = []
