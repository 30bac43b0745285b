"""Applying a refiner to detector boxes: rows in, rows out (and HQ-SAM masks), images found by name.

The output is the input list, in order, every field kept: refined rows get the refined `bbox` (in
the input's format), `bbox_input` (the original), `refine_steps` (iterations that moved the returned box;
0 when the refiner kept the input) and `iou_pred` (its predicted IoU); with `--masks`, also `mask` (the
PNG written) and `mask_score` (HQ-SAM's predicted IoU). Object rows that could not be refined keep
their `bbox` and get `refine_error` (missing_image, unreadable_image, a malformed bbox, ...); rows
that are not objects are kept as they are.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from boxrefiner.config import DataConfig
from boxrefiner.data.detections import (
    Detection,
    from_xyxy,
    parse_detections,
)
from boxrefiner.data.splits import ImageNames, SplitData, read_layout
from boxrefiner.infer.refiner import BoxRefiner, ImageFeatures
from boxrefiner.utils import distributed
from boxrefiner.utils.files import atomic_write
from boxrefiner.utils.progress import progress

log = logging.getLogger("boxrefiner")
_OUTPUT_FIELDS = ("bbox_input", "refine_steps", "iou_pred", "mask", "mask_score", "refine_error")  # written here
_IMAGE_ERRORS = ("missing_image", "unreadable_image", "nonfinite_features")
_BOX_ERRORS = ("outside_image", "bad_box")


@dataclass
class RefineReport:
    rows: list[Any]  # the output list
    refined: int = 0
    images: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (row, reason)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # file_name -> (width, height) of images read

    def reasons(self) -> Counter[str]:
        """Rows not refined, counted by reason (a malformed row counts as bad_row)."""
        return Counter(reason.split(":")[0] if reason.split(":")[0] in (*_IMAGE_ERRORS, *_BOX_ERRORS) else "bad_row"
                       for _, reason in self.problems)


ImagePaths = Callable[[str], Path]  # a detection's file_name -> its image file


def folder_resolver(folder: Path) -> ImagePaths:
    return lambda name: folder / name


def split_resolver(split: SplitData) -> ImagePaths:
    """A labelled split's images by file name, or by bare file name where unambiguous (any layout);
    a name not in the split has no file."""
    return _resolver([image.image_path for image in split.images], split.image_named, split.split)


def layout_resolver(data: DataConfig, split: str) -> ImagePaths:
    """Every image a split of the run's dataset lists, with objects or without (negatives count too),
    read from its listing only: no annotation is decoded."""
    listed = read_layout(data, split).images
    log.info("split '%s' of the run's %s dataset: %d images", split, data.format, len(listed))
    return _resolver([r.path for r in listed], ImageNames([r.file_name for r in listed]).find, split)


def _resolver(paths: list[Path], find: Callable[[str], int | None], split: str) -> ImagePaths:
    def resolve(name: str) -> Path:
        image = find(name)
        return paths[image] if image is not None else Path(split) / "not-in-split" / name
    return resolve


def refine_rows(refiner: BoxRefiner, rows: list[Any], images: Path | ImagePaths, box_format: str = "xyxy",
                masks: Path | None = None) -> RefineReport:
    """Refine every valid detection, image by image (`images`: their folder, or file name -> path); the
    rows of an image that cannot be used are reported. Under torchrun each rank refines its share of
    the images and every rank returns the whole report, rows in the input's order."""
    resolve = folder_resolver(images) if isinstance(images, Path) else images
    detections, problems = parse_detections(rows, box_format)
    by_image: dict[str, list[Detection]] = {}
    for detection in detections:
        by_image.setdefault(detection.file_name, []).append(detection)
    names = distributed.shard(list(by_image))
    if masks is not None:
        refiner.enable_masks()
    # a file written by an earlier run may come back as input: its results must not survive a failure now
    report = RefineReport([{k: v for k, v in r.items() if k not in _OUTPUT_FIELDS} if isinstance(r, dict) else r
                           for r in rows], problems=problems)
    shared, touched = len(report.problems), []
    with progress(total=len(names), desc="Refining", unit="img") as bar:
        for item in refiner.image_features([resolve(name) for name in names], for_masks=masks is not None):
            bar.update(1)
            touched += refine_image(refiner, item, by_image[names[item.index]], rows, report, box_format, masks)
    if distributed.world() > 1:
        merge_ranks(report, touched, shared)
    report.problems.sort()
    for index, reason in report.problems:
        if isinstance(report.rows[index], dict):
            report.rows[index]["refine_error"] = reason
    return report


def refine_image(refiner: BoxRefiner, item: ImageFeatures, group: list[Detection], rows: list[Any],
                 report: RefineReport, box_format: str, masks: Path | None) -> list[int]:
    """Refine one image's detections into `report` (and write their masks); returns the rows refined."""
    if item.error:
        report.problems += [(d.row, item.error) for d in group]
        return []
    report.sizes[group[0].file_name] = (item.width, item.height)
    boxes = np.array([d.box for d in group])
    inside = (boxes[:, 0] < item.width) & (boxes[:, 1] < item.height) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    report.problems += [(d.row, f"outside_image: bbox lies outside the {item.width}x{item.height} image")
                        for d, ok in zip(group, inside) if not ok]
    fits = refiner.boxes_fit(boxes, item.width, item.height)
    report.problems += [(d.row, f"bad_box: bbox {json.dumps(rows[d.row]['bbox'])[:60]} is too large to refine")
                        for d, ok, inner in zip(group, fits, inside) if inner and not ok]
    inside &= fits
    group = [d for d, ok in zip(group, inside) if ok]
    if not group:
        return []
    result = refiner.refine_features(item.map, item.width, item.height, boxes[inside])
    if masks is not None:
        predicted, scores = refiner.prompter.masks(*item.decoder_inputs, item.width, item.height, result.boxes)
    for k, detection in enumerate(group):
        row = report.rows[detection.row]
        row["bbox_input"] = rows[detection.row]["bbox"]
        row["bbox"] = from_xyxy(result.boxes[k], box_format)
        row["refine_steps"] = int(result.applied_steps[k])
        if result.iou_pred is not None:
            row["iou_pred"] = round(float(result.iou_pred[k]), 4)
        if masks is not None:
            path = masks / f"{detection.row:06d}_{Path(detection.file_name).stem}.png"
            picture = Image.fromarray(predicted[k].astype(np.uint8) * 255)
            atomic_write(path, functools.partial(picture.save, format="PNG"))
            row["mask"], row["mask_score"] = str(path), round(float(scores[k]), 4)
    report.refined += len(group)
    report.images += 1
    return [d.row for d in group]


def merge_ranks(report: RefineReport, touched: list[int], shared: int) -> None:
    """Every rank's refined rows and problems into `report` (the problems before `shared` are every
    rank's alike: rows that did not parse)."""
    mine = ({k: report.rows[k] for k in touched}, report.problems[shared:], report.refined, report.images, report.sizes)
    report.problems, report.refined, report.images = report.problems[:shared], 0, 0
    for rows, problems, refined, images, sizes in distributed.gather(mine):
        for k, row in rows.items():
            report.rows[k] = row
        report.problems += problems
        report.refined += refined
        report.images += images
        report.sizes.update(sizes)
