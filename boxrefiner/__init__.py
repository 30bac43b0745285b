"""Train a box-refinement head on frozen HQ-SAM image embeddings, fast (feature cache, sampling, AMP),
and apply it to detector boxes.

    from boxrefiner import BoxRefiner, load_config, train
    cfg, _ = load_config("configs/demo.yaml")
    train(cfg, torch.device("cpu"))
    refiner = BoxRefiner.from_checkpoint("checkpoints/demo/best_model.pth")

The names below are imported on first use, so `import boxrefiner` (and the command line's argument
errors) stay quick: torch and HQ-SAM load only when a model is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from boxrefiner.version import __version__

if TYPE_CHECKING:
    from boxrefiner.config import Config, load_config
    from boxrefiner.infer.refiner import BoxRefiner
    from boxrefiner.modeling.head import BoxRefinementModule
    from boxrefiner.training.trainer import train

_EXPORTS = {
    "BoxRefiner": "boxrefiner.infer.refiner",
    "BoxRefinementModule": "boxrefiner.modeling.head",
    "Config": "boxrefiner.config",
    "load_config": "boxrefiner.config",
    "train": "boxrefiner.training.trainer",
}
__all__ = ["BoxRefinementModule", "BoxRefiner", "Config", "__version__", "load_config", "train"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'boxrefiner' has no attribute '{name}'")
