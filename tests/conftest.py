"""Shared fixtures: a small synthetic FungiTastic copy and a fast config (vit_tiny at 256 input)."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from boxrefiner.data.synthetic import generate  # noqa: E402  (after the path: a clone runs without install)
from boxrefiner.utils.allocator import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as every command does: large blocks are reused, not handed back after each batch


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "fungitastic", train=24, val=8, seed=3)


def small_config(data_root: Path, work: Path, **sections) -> dict:
    """A config dict that trains in seconds on CPU; `sections` update whole sections' keys."""
    raw = {
        "model": {"hidden_dim": 64, "num_heads": 4, "max_offset": 0.5, "roi_size": 8},
        "refinement": {"max_iter": 2, "stop_threshold": 0.0},
        "training": {"batch_size": 8, "epochs": 6, "learning_rate": 2e-3, "warmup_epochs": 0, "seed": 7, "patience": 0},
        "data": {"data_root": str(data_root), "num_workers": 0},
        "hqsam": {"model_type": "vit_tiny", "allow_random_init": True, "input_size": 256, "batch_size": 8},
        "output": {"save_dir": str(work / "out"), "checkpoint_dir": str(work / "ckpt"), "log_dir": str(work / "logs")},
        "optimization": {"feature_cache": {"cache_dir": str(work / "features")}},
        "logging": {"plots": False},  # results.png costs ~0.7 s an epoch; tests/training/test_visuals.py draws them
    }
    raw = copy.deepcopy(raw)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)


NOBODY = 65534


def as_other_user(function, *args):
    """Run `function(*args)` where permissions apply: as root, in a forked child that dropped to the
    user nobody (so a permission test cannot pass vacuously); as anyone else, right here. Returns its
    result, or raises AssertionError with the child's exception. Import what the function needs first:
    the child may not be able to read the interpreter's own files."""
    import os
    import pickle
    import traceback

    if os.geteuid() != 0:
        return function(*args)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            import torch
            torch.set_num_threads(1)  # the parent's OpenMP pool did not survive the fork (as in DataLoader workers)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            outcome = ("ok", function(*args))
        except BaseException as exc:
            outcome = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        try:
            payload = pickle.dumps(outcome)
        except Exception as exc:
            payload = pickle.dumps(("error", f"unpicklable result: {exc}"))
        os.write(write, payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        raise AssertionError(f"as user nobody: {value}")
    return value


@pytest.fixture
def shared_tmp():
    """A folder every user can reach (pytest's own temp folders are private to their owner)."""
    import os
    import shutil
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="boxrefiner-shared-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
