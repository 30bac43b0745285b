"""Append-only JSON-line journals in one folder: one file per writing process, merged when read.

    <folder>/<host>.<pid>.<time_ns>.jsonl      a writer's own journal (it alone appends to it)
    <folder>/compact.<host>.<pid>.<ns>.jsonl   finished journals folded together

Appending costs O(1) per event and needs no lock; a reader reads every file. A writer killed
mid-append leaves a torn last line, which readers skip. Compaction only ever creates a new file and
deletes files whose lines it has copied and whose writer is gone, so two compactions at once, or a
file system that ignores locks, lose nothing. Every file starts with a header naming the tool: files
without it are never read, rewritten or deleted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from boxrefiner.errors import UserError
from boxrefiner.utils.files import HOST, json_line, write_bytes, writer_gone

log = logging.getLogger(__name__)

TOOL = "boxrefiner"
FORMAT = 2
COMPACT_AT = 4  # mergeable files before a writer folds them together


class JournalError(UserError):
    """A journal folder cannot be read (it keeps changing under the reader)."""


def header() -> dict:
    return {"tool": TOOL, "format": FORMAT, "host": HOST, "pid": os.getpid()}


def read_journal(path: Path) -> list[dict] | None:
    """The events of one journal file, or None when it is not this tool's. A torn last line (its
    writer was killed mid-append) is skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    try:
        first = json.loads(lines[0]) if lines else None
    except ValueError:
        return None
    if not isinstance(first, dict) or first.get("tool") != TOOL:
        return None
    try:  # one parse of the whole file (several times faster than line by line) ...
        parsed = json.loads("[" + ",".join(line for line in lines[1:] if line.strip()) + "]")
    except ValueError:  # ... unless a line is torn: then line by line, skipping it
        parsed = []
        for line in lines[1:]:
            try:
                parsed.append(json.loads(line))
            except ValueError:
                continue
    return [e for e in parsed if isinstance(e, dict) and isinstance(e.get("op"), str)]


def finished(path: Path) -> bool:
    """Whether a journal's writer can no longer append to it (dead on this host, or silent for a day)."""
    parts = path.name.split(".")
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    try:
        return writer_gone(parts[0], int(parts[1]), path.stat().st_mtime)
    except OSError:
        return False


class Journal:
    """One journal folder: every file read and merged by the caller; this process appends to its own."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._file: IO[str] | None = None
        self.path: Path | None = None  # this process's journal, once it has written
        self.written = 0  # events this process appended

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("*.jsonl")) if self.folder.is_dir() else []

    def events(self, before: Callable[[], list[dict]] = list) -> tuple[list[dict], list[Path]]:
        """Every event of every file (after `before()`'s, e.g. an older format's), and the files read."""
        for _ in range(5):  # a compaction may delete a file between listing and reading: list again
            events, files = before(), []
            try:
                for path in self.files():
                    found = read_journal(path)
                    if found is not None:
                        events += found
                        files.append(path)
                return events, files
            except FileNotFoundError:
                continue
        raise JournalError(f"{self.folder}: its journal keeps changing while being read")

    def append(self, events: list[dict], flush: bool = True) -> None:
        """Append whole lines in one write (lines of concurrent writers never interleave)."""
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.path = self.folder / f"{HOST}.{os.getpid()}.{time.time_ns()}.jsonl"
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open across appends; mode from the umask)
            self._file.write(json_line(header()) + "\n")
        self._file.write("".join(json_line(e) + "\n" for e in events))
        if flush:
            self._file.flush()
        self.written += len(events)

    def close(self) -> bool:
        """Close this process's journal; True when it had written anything."""
        if self._file is None:
            return False
        file, self._file = self._file, None
        file.close()  # may raise (a full disk): the journal is closed all the same
        return True

    def compact(self, fold: Callable[[list[dict]], list[dict]], force: bool = False,
                before: Callable[[], list[dict]] = list) -> bool:
        """Fold the files of finished writers (and older compactions) into one new file holding
        `fold(every event)`; with fewer than COMPACT_AT such files, only when `force`."""
        events, files = self.events(before)
        done = [p for p in files if p == self.path or p.name.startswith("compact.") or finished(p)]
        if not done or (len(done) < COMPACT_AT and not force):
            return False
        text = "".join(json_line(e) + "\n" for e in [header(), *fold(events)]).encode()
        write_bytes(self.folder / f"compact.{HOST}.{os.getpid()}.{time.time_ns()}.jsonl", text)
        for path in done:
            path.unlink(missing_ok=True)
        return True
