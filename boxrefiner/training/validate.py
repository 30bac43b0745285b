"""Validation: the loss on the run's own boxes, and what inference returns (early stop, gate) for
every set of fixed input boxes, against the input, from one run of the head over all of them;
counts objects (boxes), not images."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import torch

from boxrefiner.boxes import (
    box_iou,
)
from boxrefiner.config import Config
from boxrefiner.data.layout import DataError
from boxrefiner.data.targets import InputSet, Targets
from boxrefiner.features.encoder import (
    autocast_context,
)
from boxrefiner.features.sources import FeatureBatches
from boxrefiner.metrics import iou_summary
from boxrefiner.modeling.head import BoxRefinementModule
from boxrefiner.training.loop import training_loss
from boxrefiner.utils import distributed
from boxrefiner.utils.progress import progress


@dataclass
class PicturedBoxes:
    """The boxes inference returns for a few validation objects' own input boxes (the run's set ""),
    collected by `evaluate` for the run folder's pictures at no extra cost."""
    objects: torch.Tensor  # (K,) object indices
    refined: torch.Tensor | None = None  # (K, 4) normalised; NaN for an object not validated (excluded image)

    def collect(self, objects: torch.Tensor, boxes: torch.Tensor) -> None:
        """Keep the boxes of the pictured objects among `objects` (one box each)."""
        if self.refined is None:
            self.refined = torch.full((len(self.objects), 4), float("nan"))
        mine = torch.isin(objects, self.objects)
        if mine.any():
            at = torch.searchsorted(self.objects, objects[mine])
            self.refined[at] = boxes[mine].float().cpu()

    def merge_ranks(self) -> None:
        """Under torchrun each rank saw its own shard: every rank gets every pictured box."""
        self.collect(torch.empty(0, dtype=torch.long), torch.empty(0, 4))  # a rank that had no batch has NaNs
        if distributed.world() == 1:
            return
        assert self.refined is not None
        merged = self.refined.clone()
        for theirs in distributed.gather(self.refined):
            found = torch.isfinite(theirs).all(1)
            merged[found] = theirs[found]
        self.refined = merged


def metric_name(key: str, level: str) -> str:
    return f"val_{key}_{level}" if level else f"val_{key}"


@torch.no_grad()
def evaluate(model: BoxRefinementModule, loader: FeatureBatches, targets: Targets, inputs: dict[str, InputSet],
             cfg: Config, precision: str, pictured: PicturedBoxes | None = None) -> dict[str, float | None]:
    """The loss on every iteration of the run's own validation boxes (as in training), then, for each
    set of input boxes, what inference returns (early stop, gate) against the input: IoUs, share
    made worse, and how well the predicted IoU ranks the boxes. Counts objects (boxes), not images.
    `pictured` (sorted objects) receives what inference returns for those objects' own boxes."""
    model.eval()
    if pictured is not None:
        pictured.refined = None
    device = next(model.parameters()).device
    names = list(inputs)
    found: dict[str, list[list[torch.Tensor]]] = {name: [[], [], []] for name in names}  # before, after, predicted
    losses = {"loss": 0.0, "l1": 0.0, "giou": 0.0, "quality": 0.0}
    start, n = time.perf_counter(), 0
    for batch in progress(loader, desc="Validating", unit="batch", leave=False):
        if not len(batch):
            continue
        objects = batch.objects
        gt, extent = targets.boxes[objects].to(device), targets.extent[objects].to(device)
        image_index = batch.image_index.to(device)
        rows = [inputs[name].rows(objects) for name in names]
        # every set's boxes of one object side by side, objects in batch order: J boxes per image in a
        # row is what lets the head read each map once (and gives the same boxes as one set at a time)
        position = torch.cat([p for _, p in rows])
        order = torch.argsort(position, stable=True)
        boxes = torch.cat([inputs[name].boxes[r] for name, (r, _) in zip(names, rows)])[order].to(device)
        which = torch.cat([torch.full((len(r),), k) for k, (r, _) in enumerate(rows)])[order]
        position = position[order].to(device)
        with autocast_context(device, precision):  # one pass: every iteration of every box ...
            trajectory = model(batch.features, boxes, extent[position], image_index=image_index[position])
            own = which == names.index("")  # ... the loss on the run's own boxes (objects in batch order) ...
            loss = training_loss(trajectory.rows(own), gt[position[own]], cfg)
        result = trajectory.stopped(cfg.refinement.stop_threshold)  # ... and what inference returns
        chosen, predicted, _ = result.select(cfg.refinement.gate, cfg.refinement.keep_margin)
        truth = gt[position]
        if pictured is not None:
            pictured.collect(objects[position[own].cpu()], chosen[own])
        before, after = box_iou(boxes, truth).cpu(), box_iou(chosen, truth).cpu()
        predicted = predicted.float().cpu() if predicted is not None else None
        for k, name in enumerate(names):
            mine = which == k
            found[name][0].append(before[mine])
            found[name][1].append(after[mine])
            if predicted is not None:
                found[name][2].append(predicted[mine])
        for name, value in loss.named():
            losses[name] += value.item() * len(objects)
        n += len(objects)
    found, losses, n = merge_ranks(found, losses, n)
    if pictured is not None:
        pictured.merge_ranks()
    record = summarise(found, losses, n)
    record["val_seconds"] = time.perf_counter() - start
    return record


def summarise(found: dict[str, list[list[torch.Tensor]]], losses: dict[str, float], n: int) -> dict[str, float | None]:
    """The validation record from every box's IoUs (per set of input boxes) and the summed losses."""
    if not n:
        raise DataError("no validation object is left (every image was excluded); see skipped.jsonl")
    record: dict[str, float | None] = {"val_loss": losses["loss"] / n, "val_l1": losses["l1"] / n,
                                       "val_giou_loss": losses["giou"] / n, "val_quality_error": losses["quality"] / n}
    for name, (before_parts, after_parts, predicted_parts) in found.items():
        summary = iou_summary(torch.cat(before_parts), torch.cat(after_parts),
                              torch.cat(predicted_parts) if predicted_parts else None)
        record.update({metric_name(key, name): value for key, value in summary.items()})
    # the selection metric: the levels' mean, with the detector's own boxes as one more level
    levels = [cast(float, record[metric_name("iou_refined", name)]) for name in found if name]  # a mean: never None
    record["val_iou_refined_levels"] = sum(levels) / len(levels) if levels else record["val_iou_refined"]
    return record


def merge_ranks(found: dict[str, list[list[torch.Tensor]]], losses: dict[str, float],
                n: int) -> tuple[dict[str, list[list[torch.Tensor]]], dict[str, float], int]:
    """Under torchrun each rank validated its own shard of objects: every rank gets all of them, so
    each object counts exactly once and every rank computes the same metrics (one process: as is)."""
    if distributed.world() == 1:
        return found, losses, n
    mine = {name: [torch.cat(parts) if parts else torch.empty(0) for parts in lists] for name, lists in found.items()}
    merged: dict[str, list[list[torch.Tensor]]] = {name: [[], [], []] for name in found}
    total = dict.fromkeys(losses, 0.0)
    count = 0
    for their_found, their_losses, their_n in distributed.gather((mine, losses, n)):
        for name, parts in their_found.items():
            for k, part in enumerate(parts):
                if len(part):
                    merged[name][k].append(part)
        total = {key: total[key] + value for key, value in their_losses.items()}
        count += their_n
    return merged, total, count
