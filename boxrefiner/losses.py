"""The training objective: weighted L1 + (1 - GIoU), averaged over every refinement iteration."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .boxes import generalized_box_iou


@dataclass
class LossParts:
    total: torch.Tensor  # what is back-propagated
    l1: torch.Tensor  # unweighted mean L1 in the normalised frame
    giou: torch.Tensor  # unweighted mean (1 - GIoU)


def refinement_loss(iterations: list[torch.Tensor], target: torch.Tensor, l1_weight: float,
                    iou_weight: float) -> LossParts:
    """Supervise each iteration's boxes so that every step, not only the last, learns to correct."""
    target = target.float()
    l1 = torch.stack([(boxes.float() - target).abs().mean() for boxes in iterations]).mean()
    giou = torch.stack([(1 - generalized_box_iou(boxes.float(), target)).mean() for boxes in iterations]).mean()
    return LossParts(total=l1_weight * l1 + iou_weight * giou, l1=l1, giou=giou)
