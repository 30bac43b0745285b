"""The torch device a name stands for (`auto`, `cpu`, `cuda`, `cuda:N`), checked to exist; what the CPU can do."""

from __future__ import annotations

import os

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


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX-512 and newer). Without them CPU autocast
    emulates bf16: a `vit_tiny` forward at 512 took 11.5 s instead of 0.8 s in float32 (2 cores of an
    AVX2-only AMD EPYC, torch 2.14)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else True
    except RuntimeError:
        return True


_FORK_HOOKED = False


def one_thread_after_fork() -> None:
    """Make a forked child run torch's CPU operations on one thread. OpenMP's thread pool does not
    survive fork: the child's first parallel operation would wait forever for the parent's threads
    (torch's own DataLoader workers do the same). Process-wide: every fork after the first call, which
    is what any forked child of a process that has run torch needs anyway. Idempotent."""
    global _FORK_HOOKED
    if not _FORK_HOOKED and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))
        _FORK_HOOKED = True
