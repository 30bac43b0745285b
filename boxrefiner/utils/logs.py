"""Logging for every command: lines on stderr that do not tear the progress bars, and the run's log file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

from boxrefiner.utils import distributed


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(log_dir: str | None = None) -> None:
    """INFO lines on stderr (and in `log_dir/train.log`); under torchrun only rank 0 logs at INFO and
    writes the file, the other ranks say warnings and errors only, prefixed with their rank."""
    root = logging.getLogger()
    root.handlers.clear()
    main = distributed.rank_from_environment() == 0
    root.setLevel(logging.INFO if main else logging.WARNING)
    console = _TqdmHandler()
    prefix = "" if main else f"[rank {distributed.rank_from_environment()}] "
    console.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%H:%M:%S"))
    root.addHandler(console)
    if log_dir and main:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(log_dir) / "train.log", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file)
