"""Checkpoints written atomically (temp file + os.replace): a crash mid-write never leaves a torn file.

Each file keeps the keys the original tool wrote (`epoch`, `model_state_dict`, `optimizer_state_dict`,
`train_loss`, `val_loss`) plus what resuming and applying the refiner need (scheduler and scaler
state, resolved config, model arguments, encoder identity). Everything is tensors and plain Python
types, so files load with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write

LAST = "last.pth"
BEST = "best_model.pth"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; one-line message naming the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(state, f), durable=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or foreign files raise many types
        raise CheckpointError(f"checkpoint '{path}' cannot be read: {str(exc).splitlines()[0][:200]}") from None
    required = ("epoch", "model_state_dict", "optimizer_state_dict", "config")
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise CheckpointError(f"checkpoint '{path}' is not a box-refiner checkpoint (needs keys {', '.join(required)})")
    return state
