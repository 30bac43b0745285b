"""The torch device a name stands for (`auto`, `cpu`, `cuda`, `cuda:N`), checked to exist."""

from __future__ import annotations

import torch

from boxrefiner.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else CPU; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}': use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: CUDA is not available on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ConfigError(f"device '{name}': use auto, cpu, cuda or cuda:N")
    return device
