"""The AMP policy: which autocast dtype training uses on this device, and why (logged)."""

from __future__ import annotations

import logging

import torch

from boxrefiner.utils.device import cpu_has_bf16

log = logging.getLogger(__name__)


def amp_precision(device: torch.device, use_amp: bool) -> str:
    """The autocast dtype for training: bf16 where the hardware has it, else fp16 (CUDA) or fp32 (CPU)."""
    if not use_amp:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if cpu_has_bf16():
        return "bf16"
    log.warning("training.use_amp: this CPU (%s) has no bfloat16 kernels, where autocast runs many times slower "
                "than float32; training in fp32", torch.backends.cpu.get_cpu_capability())
    return "fp32"
