"""The model a config describes (the arguments a checkpoint records, so a refiner rebuilds it exactly)."""

from __future__ import annotations

from typing import Any

from boxrefiner.config import Config
from boxrefiner.features.encoder import (
    EMBED_DIM,
)
from boxrefiner.modeling.head import BoxRefinementModule


def build_model(cfg: Config) -> BoxRefinementModule:
    return BoxRefinementModule(**model_arguments(cfg))


def model_arguments(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return {"embed_dim": EMBED_DIM, "hidden_dim": m.hidden_dim, "num_heads": m.num_heads, "max_offset": m.max_offset,
            "max_iter": cfg.refinement.max_iter, "roi_size": m.roi_size, "context_scale": m.context_scale,
            "quality_head": True, "dropout": m.dropout, "context_layers": m.context_layers, "context_dim": m.context_dim}
