"""Stopping on SIGINT/SIGTERM without losing work.

The main process catches both signals and stops at the next safe point (a training step, an
extraction batch), saving what it has. DataLoader workers ignore them: a signal sent to the whole
process group (systemd, Slurm's scancel or preemption, `kill -TERM -PGID`) would otherwise kill the
workers first, and the main process would die on "DataLoader worker ... is killed by signal" with
nothing saved.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Raised once an interrupted run has saved what it had; `checkpoint` is None when no training
    state existed yet (e.g. stopped during feature extraction)."""

    def __init__(self, signum: int, checkpoint: Path | None = None, where: str = "training"):
        super().__init__(f"interrupted by signal {signum} during {where}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.where = where


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: leave SIGINT/SIGTERM to the main process (torch's own worker
    SIGTERM handler would end the worker, and a forked worker inherits the main SIGINT handler).
    Workers are started with the signals blocked (`stop_signals_blocked`): one sent before this runs
    waits, and is discarded here."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while DataLoader workers are forked: a child inherits the blocked mask,
    so a signal to the process group during start-up cannot kill a worker before it ignores the
    signals. The main process receives a held-back signal when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_REAPER_REGISTERED = False


def reap_workers_at_exit() -> None:
    """Make sure workers that ignore SIGTERM cannot hold up the interpreter's exit.

    At exit, multiprocessing ends daemonic children with SIGTERM and then waits for them; a DataLoader
    whose iterator is still referenced (by a traceback, say) has not told its workers to stop, and they
    ignore SIGTERM. This hook, registered after multiprocessing's own and so run before it, kills them."""
    global _REAPER_REGISTERED
    if not _REAPER_REGISTERED:
        atexit.register(_reap_workers)
        _REAPER_REGISTERED = True


def _reap_workers() -> None:
    import multiprocessing
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


class StopRequest:
    """SIGINT/SIGTERM ask the work to stop at the next safe point; a second Ctrl-C stops at once
    (every file is written atomically, so nothing is torn either way)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        return self

    def arm(self) -> None:
        """Catch the signals from now on (until the with-block ends)."""
        for signum in STOP_SIGNALS:
            self._previous.setdefault(signum, signal.signal(signum, self._handle))

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping at the next safe point and saving (Ctrl-C again stops at once)",
                    signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self, where: str, checkpoint: Path | None = None) -> None:
        """Raise Interrupted when a stop was requested."""
        if self.signum is not None:
            raise Interrupted(self.signum, checkpoint, where)


def stop_requested(stop: StopRequest | None) -> bool:
    return stop is not None and stop.requested
