"""Pairing detector boxes with ground-truth objects.

Training (`data.train_detections`) pairs one-to-one: the pair of highest IoU first, then the next among
the rest, down to `data.detection_match_iou`, as COCO's evaluation assigns detections. Scoring a
refiner (`evaluate_refiner.py`) asks another question, which object a box points at: each box takes
the object of its image it overlaps most, so several boxes of one object are all scored against it.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np
import torch

from boxrefiner.boxes import box_iou
from boxrefiner.data.detections import parse_detections, read_detections
from boxrefiner.data.layout import DataError
from boxrefiner.data.splits import SplitData

log = logging.getLogger(__name__)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of every box of `a` (N, 4) with every box of `b` (M, 4), xyxy: `boxes.box_iou` of
    every pair."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    pairs = box_iou(torch.from_numpy(a).repeat_interleave(len(b), 0), torch.from_numpy(b).repeat(len(a), 1))
    return pairs.view(len(a), len(b)).numpy()


def match_one_to_one(detections: np.ndarray, truth: np.ndarray, min_iou: float) -> list[tuple[int, int, float]]:
    """Greedy one-to-one pairs (detection, object, IoU), highest IoU first, each IoU >= `min_iou`."""
    iou = pairwise_iou(detections, truth)
    pairs = []
    if iou.size:
        order = np.argsort(-iou, axis=None, kind="stable")
        used_d, used_t = set(), set()
        for flat in order:
            d, t = divmod(int(flat), iou.shape[1])
            if iou[d, t] < min_iou:
                break
            if d in used_d or t in used_t:
                continue
            used_d.add(d)
            used_t.add(t)
            pairs.append((d, t, float(iou[d, t])))
    return pairs


def best_overlap(boxes: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each box, the object it overlaps most and that IoU ((-1, 0) where it overlaps none)."""
    iou = pairwise_iou(boxes, truth)
    if not iou.size:
        return np.full(len(iou), -1), np.zeros(len(iou))
    best = iou.argmax(axis=1)
    value = iou[np.arange(len(best)), best]
    return np.where(value > 0, best, -1), value


def attach_detections(split: SplitData, path: str, box_format: str, min_iou: float) -> None:
    """Match a detections file's boxes to the split's objects (`split.detections`); malformed rows and
    detections that match no object are skipped by reason and listed, rows of other images counted."""
    rows = read_detections(path)
    detections, problems = parse_detections(rows, box_format)
    for row, reason in problems:
        split.skip(str(path), "bad_detection", f"row {row}: {reason}")
    objects_of = split.objects_by_image()
    grouped: dict[int, list] = defaultdict(list)
    counts: Counter = Counter()
    for detection in detections:
        image = split.image_named(detection.file_name)
        if image is None:
            counts["other_images"] += 1  # not in this split, or left out of it (sample_ratio, skipped images)
        else:
            grouped[image].append(detection)
    for image, found in grouped.items():
        objects = objects_of.get(image, [])
        truth = np.array([split.objects[k].box for k in objects])
        boxes = np.array([d.box for d in found])
        pairs = match_one_to_one(boxes, truth, min_iou)
        for d, t, _ in pairs:
            split.detections[objects[t]] = found[d].box
        paired = {d for d, _, _ in pairs}
        best = pairwise_iou(boxes, truth).max(axis=1) if len(truth) else np.zeros(len(boxes))
        for d, detection in enumerate(found):
            if d not in paired:
                split.skip(split.images[image].file_name, "unmatched_detection",
                           f"row {detection.row}: no object left to pair with at IoU >= {min_iou:g} "
                           f"(data.detection_match_iou; its best IoU {best[d]:.2f})")
        counts["matched"] += len(pairs)
        counts["unmatched"] += len(found) - len(pairs)
    if detections and not counts["matched"]:
        raise DataError(f"detections {path}: none of its {len(detections)} boxes matched an object of split "
                        f"'{split.split}' ({counts['other_images']} name no image of the split, e.g. "
                        f"'{detections[0].file_name}', which should be an image's file_name as the annotations give "
                        f"it, or its bare file name); check data.{split.split}_detections and "
                        "data.detection_box_format")
    log.info("%s split: detections %s: %d rows, %d matched one-to-one to objects (%d of %d objects have one), %d "
             "unmatched, %d of other images, %d malformed", split.split, path, len(rows), counts["matched"],
             len(split.detections), len(split.objects), counts["unmatched"], counts["other_images"], len(problems))
