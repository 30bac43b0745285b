"""The measures, shared by training and inference so that evaluation repeats the trainer's numbers:
IoU summaries (mean before/after, share made worse, rank correlation of the predicted IoU) and COCO
box AP before and after refinement, by pycocotools' own evaluation.

Mean IoU over matched boxes says how well boxes fit their objects but ignores false positives and
missed objects; AP counts both: class-aware when every detection names a category of the ground
truth, else class-agnostic (every box one class), which is how a box refiner is judged.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from boxrefiner.boxes import WORSE_TOLERANCE


class Scored(Protocol):
    """A detection as AP reads it: its image, category (None: unknown), detector score, input box and
    refined box (None: not refined), boxes xyxy pixels."""
    image: int
    category_id: int | None
    score: float
    box: Any
    refined: Any


def box_ap(image_sizes: dict[int, tuple[int, int]], objects: list[tuple[int, int, Any]], categories: dict[int, str],
           detections: Sequence[Scored]) -> dict[str, Any]:
    """{"input": {AP, AP50, AP75}, "refined": {...}, "class_aware", "images", "detections"} of the
    detections' input and refined boxes against the ground truth `objects` ((image, category_id, xyxy
    box)) on the images of `image_sizes` (id -> (width, height)); an object no detection found is a
    miss, as COCO evaluates."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = sorted(image_sizes)
    class_aware = bool(detections) and all(d.category_id in categories for d in detections)
    annotations = [{"id": k + 1, "image_id": image, "category_id": category if class_aware else 1,
                    "bbox": _xywh(box), "area": float((box[2] - box[0]) * (box[3] - box[1])), "iscrowd": 0}
                   for k, (image, category, box) in enumerate(objects) if image in image_sizes]
    truth = COCO()
    truth.dataset = {"images": [{"id": i, "width": image_sizes[i][0], "height": image_sizes[i][1]} for i in images],
                     "annotations": annotations,
                     "categories": [{"id": c, "name": n} for c, n in (categories if class_aware else {1: "object"}).items()]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        truth.createIndex()
    result: dict[str, Any] = {"class_aware": class_aware, "images": len(images), "detections": len(detections)}
    for name, boxes in (("input", [d.box for d in detections]), ("refined", [d.refined for d in detections])):
        rows = [{"image_id": d.image, "category_id": d.category_id if class_aware else 1, "bbox": _xywh(box),
                 "score": d.score} for d, box in zip(detections, boxes) if box is not None]
        result[name] = _evaluate(truth, rows, COCOeval)
    return result


def _xywh(box: Any) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, dtype=np.float64))
    return [x0, y0, x1 - x0, y1 - y0]


def _evaluate(truth: Any, rows: list[dict], evaluator: Any) -> dict[str, float | None]:
    if not rows:
        return {"AP": None, "AP50": None, "AP75": None}
    with contextlib.redirect_stdout(io.StringIO()):
        found = truth.loadRes(rows)
        run = evaluator(truth, found, "bbox")
        run.evaluate()
        run.accumulate()
        run.summarize()
    stats = run.stats
    return {"AP": float(stats[0]), "AP50": float(stats[1]), "AP75": float(stats[2])}


def iou_summary(before: torch.Tensor, after: torch.Tensor, predicted: torch.Tensor | None = None) -> dict[str, float | None]:
    """How refinement changed per-box IoUs with the truth (`before`, `after`: (N,) IoUs, boxes or masks):
    means, share made worse (strictly, and by more than WORSE_TOLERANCE), shares at IoU >= 0.75 and
    >= 0.9; with `predicted` (the refiner's predicted IoU of each returned box), how well it ranks the
    boxes (Spearman's rank correlation with the actual IoU)."""
    before, after = before.double(), after.double()
    return {"iou_input": before.mean().item(), "iou_refined": after.mean().item(),
            "worse_rate": (after < before - 1e-6).double().mean().item(),
            "worse_rate_tol": (after < before - WORSE_TOLERANCE).double().mean().item(),
            "iou75_input": (before >= 0.75).double().mean().item(), "iou75_refined": (after >= 0.75).double().mean().item(),
            "iou90_input": (before >= 0.9).double().mean().item(), "iou90_refined": (after >= 0.9).double().mean().item(),
            "iou_pred_spearman": None if predicted is None else spearman(predicted, after)}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation, ties sharing their mean rank (None when undefined: fewer than 2
    values, or a constant side)."""
    import pandas as pd
    value = pd.Series(a.double().cpu().numpy()).rank().corr(pd.Series(b.double().cpu().numpy()).rank())
    return None if math.isnan(value) else float(value)
