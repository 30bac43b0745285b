"""COCO box AP of detections before and after refinement, by pycocotools' own evaluation.

Mean IoU over matched boxes says how well boxes fit their objects but ignores false positives and
missed objects; AP counts both. The ground truth is the split's objects (on every image of the split
that could be read), in the loaded images' pixels; class-aware when every detection names a category
of the split (`category_id`), else class-agnostic (every box one class), which is how a box refiner
is judged.
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import SplitData

if TYPE_CHECKING:
    from .evaluation import Case


def box_ap(split: SplitData, cases: list[Case], images: list[int] | None = None) -> dict[str, Any]:
    """{"input": {AP, AP50, AP75}, "refined": {...}, "class_aware", "images", "detections"} of the cases'
    input and refined boxes (each case a detection with its score), on `images` (default: every image
    of the split, as COCO evaluates: an object no detection found is a miss)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = sorted(range(len(split.images)) if images is None else images)
    class_aware = bool(cases) and all(c.category_id in split.categories for c in cases)
    chosen = set(images)
    annotations = [{"id": k + 1, "image_id": o.image, "category_id": o.category_id if class_aware else 1,
                    "bbox": _xywh(o.box), "area": float((o.box[2] - o.box[0]) * (o.box[3] - o.box[1])), "iscrowd": 0}
                   for k, o in enumerate(split.objects) if o.image in chosen]
    categories = split.categories if class_aware else {1: "object"}
    truth = COCO()
    truth.dataset = {"images": [{"id": i, "width": split.images[i].width, "height": split.images[i].height}
                                for i in images],
                     "annotations": annotations, "categories": [{"id": c, "name": n} for c, n in categories.items()]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        truth.createIndex()
    result: dict[str, Any] = {"class_aware": class_aware, "images": len(images), "detections": len(cases)}
    for name, boxes in (("input", [c.box for c in cases]), ("refined", [c.refined for c in cases])):
        rows = [{"image_id": c.image, "category_id": c.category_id if class_aware else 1, "bbox": _xywh(box),
                 "score": c.score} for c, box in zip(cases, boxes) if box is not None]
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
