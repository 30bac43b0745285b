"""What reading a file once told us (an image's content hash and size, an annotation's boxes),
remembered by the file's (path, size, mtime_ns), so that a warm start reads none of the files again.

    <cache_dir>/.memo/*.jsonl               images and annotations: journals (`utils.journal`), one per
                                            writing process, merged when read
    <cache_dir>/.memo/checkpoints/*.jsonl   encoder checkpoints' hashes (read without the images')

A file whose size or modification time changed is read again. So is one modified within a moment of
being read (a file system with coarse timestamps could show the same time after an edit: git's
"racy" rule). The memo is an accelerator only: where its folder cannot be written, start-up reads the
files as before and says so once; a value that does not have the expected form is a miss.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from boxrefiner.utils.journal import Journal, read_journal

log = logging.getLogger(__name__)

FOLDER = ".memo"
_RACY_COARSE_NS = 2_000_000_000  # whole-second timestamps: trust a value read 2 s after the last change
_RACY_FINE_NS = 20_000_000  # nanosecond timestamps still tick coarsely (ext4: a few ms)
_BATCH = 4096  # lines held before an append


def _key(kind: str, path: str, name: str) -> tuple[str, str, str]:
    return kind, path, name


class FileMemo:
    """Values derived from files. `get` returns None unless the file's stat equals the one the value
    was recorded with; `put` records a value (appended to this process's journal in batches)."""

    def __init__(self, folder: Path | str | None, write: bool = True):
        self.folder = Path(folder) if folder is not None else None
        self.journal = Journal(self.folder) if self.folder is not None else None
        self.write = write and self.folder is not None
        self._values: dict[tuple[str, str, str], tuple[int, int, int, Any]] | None = None
        self._pending: list[dict] = []
        self.hits = self.misses = 0

    @classmethod
    def in_cache(cls, cache_dir: str | Path, write: bool = True, part: str = "") -> FileMemo:
        """The memo of a cache folder (`part`: a separate one inside it, e.g. the few checkpoints)."""
        return cls(Path(cache_dir) / FOLDER / part, write)

    def _load(self) -> dict[tuple[str, str, str], tuple[int, int, int, Any]]:
        if self._values is None:
            self._values = {}
            if self.journal is not None:
                try:
                    events = self.journal.events()[0]
                except OSError as exc:
                    log.info("start-up memo %s cannot be read (%s): files are read again", self.folder, exc)
                    events = []
                for event in events:
                    self._take(event)
        return self._values

    def _take(self, event: dict) -> None:
        assert self._values is not None
        try:
            key = _key(event["k"], event["p"], event.get("n", ""))
            record = (int(event["s"]), int(event["m"]), int(event["t"]), event["v"])
        except (KeyError, TypeError, ValueError):
            return
        old = self._values.get(key)
        if old is None or old[2] <= record[2]:
            self._values[key] = record

    def get(self, kind: str, path: Path | str, stat: os.stat_result, name: str = "") -> Any:
        """The value recorded for this file in this state, or None."""
        found = self._load().get(_key(kind, os.path.abspath(path), name))
        if found is None or found[0] != stat.st_size or found[1] != stat.st_mtime_ns:
            self.misses += 1
            return None
        mtime, recorded = found[1], found[2]
        window = _RACY_COARSE_NS if mtime % 1_000_000_000 == 0 else _RACY_FINE_NS
        if recorded - mtime < window:  # read too soon after its last change to be sure it has not changed since
            self.misses += 1
            return None
        self.hits += 1
        return found[3]

    def put(self, kind: str, path: Path | str, stat: os.stat_result, value: Any, name: str = "",
            read_at: int | None = None) -> None:
        """Record `value` for the file as `stat` saw it; `read_at` (time_ns) is when reading began."""
        event = {"op": "memo", "k": kind, "p": os.path.abspath(path), "n": name, "s": stat.st_size, "m": stat.st_mtime_ns,
                 "t": read_at if read_at is not None else time.time_ns(), "v": value}
        self._load()
        self._take(event)
        if self.write:
            self._pending.append(event)
            if len(self._pending) >= _BATCH:
                self.flush()

    def flush(self) -> None:
        if not self._pending or self.journal is None:
            return
        pending, self._pending = self._pending, []
        try:
            self.journal.append(pending)
        except OSError as exc:
            self.write = False
            log.info("start-up memo not written (%s: %s): the next start reads these files again", self.folder,
                     exc.strerror or exc)

    def close(self) -> None:
        """Write what is pending; fold finished journals together now and then."""
        self.flush()
        try:
            if self.journal is not None and self.journal.close():
                self.journal.compact(self._folded)
        except OSError as exc:  # an accelerator only: never the end of a run
            log.info("start-up memo %s not closed cleanly (%s): the next start reads these files again", self.folder,
                     exc.strerror or exc)

    def _folded(self, events: list[dict]) -> list[dict]:
        latest: dict[tuple[str, str, str], dict] = {}
        for event in events:
            if not all(k in event for k in ("k", "p", "s", "m", "t", "v")):
                continue
            key = _key(event["k"], event["p"], event.get("n", ""))
            if key not in latest or latest[key]["t"] <= event["t"]:
                latest[key] = event
        return list(latest.values())

    def clear(self) -> int:
        """Forget everything (deletes the journals); returns the files removed."""
        removed = 0
        if self.journal is not None:
            for path in self.journal.files():
                if read_journal(path) is None:
                    continue  # not this tool's file
                path.unlink(missing_ok=True)
                removed += 1
        self._values, self._pending = {}, []
        return removed
