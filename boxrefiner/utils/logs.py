"""Logging for every command: lines on stderr that do not tear the progress bars, and the run's log file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(log_dir: str | None = None) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(log_dir) / "train.log", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file)
