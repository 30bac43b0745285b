"""Checkpoints written atomically (temp file + os.replace): a crash mid-write never leaves a torn file.

Each file keeps the keys the original tool wrote (`epoch`, `model_state_dict`, `optimizer_state_dict`,
`train_loss`, `val_loss`) plus everything an exact resume and applying the refiner need: scheduler
and scaler state, global step, best metric, metrics history, resolved config, model arguments,
encoder identity, every RNG's state and, for an interrupted run, its position inside the epoch.
Everything is tensors and plain Python types, so files load with `weights_only=True` and a
downloaded file cannot run code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_write, load_torch_file

LAST = "last.pth"
BEST = "best_model.pth"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; one-line message naming the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(state, f), durable=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    state = load_torch_file(path, CheckpointError, "checkpoint")
    required = ("epoch", "model_state_dict", "optimizer_state_dict", "config")
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise CheckpointError(f"checkpoint '{path}' is not a box-refiner checkpoint (needs keys {', '.join(required)})")
    return state


def rng_state() -> dict[str, Any]:
    """Every global RNG's state as tensors and plain types (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Keys whose change would make a resumed run a different model or different data, or judge its epochs
# differently (the gate decides the validation IoU that picks best_model.pth): refused.
PROTECTED_KEYS = ("model.", "refinement.max_iter", "refinement.gate", "refinement.keep_margin", "refinement.stop_threshold", "hqsam.model_type", "hqsam.input_size", "hqsam.precision",
                  "data.data_subset", "data.train_split", "data.val_split", "data.image_size", "data.masks_file",
                  "data.sample_ratio", "data.box_noise.", "data.format", "data.min_box_size",
                  "data.detection_box_format", "data.detection_match_iou", "data.detection_mix", "data.detection_noise.",
                  "training.seed", "evaluation.noise_seed",
                  "evaluation.box_noise.", "evaluation.levels.", "evaluation.boxes_per_level",
                  "optimization.feature_cache.storage_dtype")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Differences between a checkpoint's resolved config and the current one: (allowed, refused),
    each as 'key: old -> new'. A key the checkpoint's version did not have counts as its default then."""
    from .config import Config
    old, new = {**_flatten(Config().to_dict()), **_flatten(saved)}, _flatten(current)
    allowed, refused = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            change = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            protected = any(key == p.rstrip(".") or (p.endswith(".") and key.startswith(p)) for p in PROTECTED_KEYS)
            (refused if protected else allowed).append(change)
    return allowed, refused
