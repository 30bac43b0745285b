"""What every command line of the tool shares: logging that does not tear progress bars, device
choice, and turning user errors into one line on stderr instead of a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .allocator import keep_freed_memory
from .cache import CacheError
from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError
from .detections import DetectionsError
from .encoder import EncoderError
from .runlock import RunLockError

USER_ERRORS = (ConfigError, DataError, EncoderError, CheckpointError, CacheError, DetectionsError, RunLockError)


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


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in "invalid integer value"
    return parse


positive_int = _int_at_least(1)  # argparse types
non_negative_int = _int_at_least(0)


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


non_negative_float.__name__ = "number"


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else CPU; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device '{name}': use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ConfigError(f"--device '{name}': use auto, cpu, cuda or cuda:N")
    return device


def run_command(run: Callable[[list[str] | None], int], argv: list[str] | None = None,
                fatal: tuple[type[Exception], ...] = ()) -> int:
    """Run a command; user errors exit 2 and `fatal` errors (a run that cannot go on) exit 1, each with
    one line on stderr."""
    keep_freed_memory()
    try:
        return run(argv)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except fatal as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # read-only folder, full disk, ...: what and where, without a traceback
        print(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every file is written atomically, so nothing is torn
        print("interrupted at once; files already written are complete", file=sys.stderr)
        return 130
