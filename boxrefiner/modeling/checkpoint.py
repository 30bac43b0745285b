"""The checkpoint file: written atomically (temp file + os.replace, a crash never leaves a torn file),
loaded on CPU with weights_only=True (a downloaded file cannot run code) and checked to be this tool's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from boxrefiner.errors import UserError
from boxrefiner.utils.files import atomic_write, load_torch_file

LAST = "last.pth"


BEST = "best_model.pth"


class CheckpointError(UserError):
    """A checkpoint that cannot be used; one-line message naming the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(state, f), durable=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    state = load_torch_file(path, CheckpointError, "checkpoint")
    required = ("epoch", "model_state_dict", "optimizer_state_dict", "config")
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise CheckpointError(f"checkpoint '{path}' is not a box-refiner checkpoint (needs keys {', '.join(required)})")
    return state
