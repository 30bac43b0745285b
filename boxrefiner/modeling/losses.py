"""The training objective: weighted L1 + (1 - GIoU) on every refinement iteration's box, plus the
quality head's error on the IoU of every box the head looked at (input, each iteration's output)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from boxrefiner.boxes import box_iou, generalized_box_iou
from boxrefiner.modeling.head import Trajectory


@dataclass
class LossParts:
    total: torch.Tensor  # what is back-propagated
    l1: torch.Tensor  # unweighted mean L1 in the normalised frame
    giou: torch.Tensor  # unweighted mean (1 - GIoU)
    quality: torch.Tensor  # mean |predicted IoU - actual IoU| (0 without a quality head)

    def named(self) -> tuple[tuple[str, torch.Tensor], ...]:
        """The parts under the names the training and validation totals use."""
        return ("loss", self.total), ("l1", self.l1), ("giou", self.giou), ("quality", self.quality)


def refinement_loss(trajectory: Trajectory, target: torch.Tensor, l1_weight: float, iou_weight: float,
                    quality_weight: float = 0.0, pair_weight: float = 0.0) -> LossParts:
    """Supervise each iteration's boxes so that every step, not only the last, learns to correct; and
    the predicted IoU of every candidate against its actual IoU (a target, not a path for gradients),
    and, with `pair_weight`, each refined candidate's predicted gain over the input box: the
    comparison the gate makes."""
    target = target.float()
    boxes = trajectory.boxes
    l1 = torch.stack([(b.float() - target).abs().mean() for b in boxes]).mean()
    giou = torch.stack([(1 - generalized_box_iou(b.float(), target)).mean() for b in boxes]).mean()
    total = l1_weight * l1 + iou_weight * giou
    quality = torch.zeros((), device=target.device)
    if trajectory.quality is not None:
        actual = torch.stack([box_iou(c, target) for c in trajectory.candidates.detach()])  # (K + 1, N)
        logits = trajectory.quality.float()
        predicted = torch.sigmoid(logits)
        quality = (predicted - actual).abs().mean().detach()
        gains = ((predicted[1:] - predicted[:1]) - (actual[1:] - actual[:1])).abs().mean()
        total = total + quality_weight * (F.binary_cross_entropy_with_logits(logits, actual) + pair_weight * gains)
    return LossParts(total=total, l1=l1, giou=giou, quality=quality)
