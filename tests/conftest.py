"""Shared fixtures: a small synthetic FungiTastic copy and a fast config (vit_tiny at 256 input)."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from boxrefiner.synthetic import generate  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "fungitastic", train=24, val=8, seed=3)


def small_config(data_root: Path, work: Path, **sections) -> dict:
    """A config dict that trains in seconds on CPU; `sections` update whole sections' keys."""
    raw = {
        "model": {"hidden_dim": 64, "num_heads": 4, "max_offset": 0.5, "roi_size": 8},
        "refinement": {"max_iter": 2, "stop_threshold": 0.0},
        "training": {"batch_size": 8, "epochs": 6, "learning_rate": 2e-3, "warmup_epochs": 0, "seed": 7},
        "data": {"data_root": str(data_root), "num_workers": 0},
        "hqsam": {"model_type": "vit_tiny", "allow_random_init": True, "input_size": 256, "batch_size": 8},
        "output": {"save_dir": str(work / "out"), "checkpoint_dir": str(work / "ckpt"), "log_dir": str(work / "logs")},
        "optimization": {"feature_cache": {"cache_dir": str(work / "features")}},
    }
    raw = copy.deepcopy(raw)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)
