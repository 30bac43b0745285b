"""The optimizer and its learning-rate schedule: AdamW, linear warm-up then cosine (to 1%) or step
decay, stepped per optimizer step; realigned after a resume."""

from __future__ import annotations

import math

import torch

from boxrefiner.config import Config
from boxrefiner.modeling.head import BoxRefinementModule


def make_lr_lambda(cfg: Config, steps_per_epoch: int):
    """LR factor per optimizer step: linear warm-up, then cosine to 1% / step decay / constant."""
    t = cfg.training
    warmup = t.warmup_epochs * steps_per_epoch
    total = t.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.lr_scheduler == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
        if t.lr_scheduler == "step":
            return t.lr_gamma ** ((step // steps_per_epoch) // t.lr_step_epochs)
        return 1.0

    return factor


def build_optimization(cfg: Config, model: BoxRefinementModule, steps_per_epoch: int, precision: str):
    """AdamW, the per-step LR schedule, and a GradScaler for fp16 autocast (None otherwise)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate,
                                  weight_decay=cfg.training.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return optimizer, scheduler, scaler


def realign_schedule(cfg: Config, optimizer, scheduler, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> None:
    """After a resume: the config's learning rate and weight decay, and the schedule's position counted
    in this run's steps per epoch (a changed batch size changes it), rule from here on."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.training.learning_rate
        group["weight_decay"] = cfg.training.weight_decay
    scheduler.base_lrs = [cfg.training.learning_rate] * len(optimizer.param_groups)
    scheduler.last_epoch = epoch * steps_per_epoch + step_in_epoch
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = cfg.training.learning_rate * factor(scheduler.last_epoch)
