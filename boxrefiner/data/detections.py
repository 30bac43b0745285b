"""Detector output as JSON: a list of objects with `file_name`, `bbox` and any other fields.

    [{"file_name": "0-4100.JPG", "bbox": [x0, y0, x1, y1], "score": 0.91, "category_id": 3}, ...]

`bbox` is in pixels of the image after EXIF orientation, `xyxy` or `xywh` (COCO style: left, top,
width, height). Rows are validated one by one: a malformed row is reported with its index and
reason and left out, never the end of the run. Writing keeps every row and every field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boxrefiner.errors import UserError
from boxrefiner.utils.files import read_json

BOX_FORMATS = ("xyxy", "xywh")


class DetectionsError(UserError):
    """The detections file as a whole cannot be used; one-line message."""


@dataclass(frozen=True)
class Detection:
    row: int  # index in the file's list
    file_name: str
    box: tuple[float, float, float, float]  # xyxy pixels


def read_detections(path: str | Path) -> list[Any]:
    path = Path(path)
    if not path.is_file():
        raise DetectionsError(f"detections file '{path}' does not exist")
    return read_json(path, "detections file", DetectionsError)


def to_xyxy(bbox: Any, box_format: str) -> tuple[float, float, float, float]:
    """A row's `bbox` as xyxy floats; ValueError saying what is wrong with it."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"bbox must be a list of 4 numbers, got {json.dumps(bbox)[:80]}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in bbox):
        raise ValueError(f"bbox must hold 4 finite numbers, got {json.dumps(bbox)[:80]}")
    a, b, c, d = (float(v) for v in bbox)
    if box_format == "xywh":
        if c <= 0 or d <= 0:
            raise ValueError(f"bbox width and height must be positive (xywh), got {bbox}")
        return a, b, a + c, b + d
    if c <= a or d <= b:
        raise ValueError(f"bbox needs x1 > x0 and y1 > y0 (xyxy), got {bbox}" +
                         ("; is it xywh? (box format xywh)" if c > 0 and d > 0 else ""))
    return a, b, c, d


def from_xyxy(box, box_format: str, decimals: int = 2) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    values = (x0, y0, x1 - x0, y1 - y0) if box_format == "xywh" else (x0, y0, x1, y1)
    return [round(v, decimals) for v in values]


def parse_detections(rows: list[Any], box_format: str) -> tuple[list[Detection], list[tuple[int, str]]]:
    """Valid detections, and (row index, reason) for each row that is not one."""
    if box_format not in BOX_FORMATS:
        raise DetectionsError(f"box format '{box_format}': use one of {', '.join(BOX_FORMATS)}")
    detections, problems = [], []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append((index, f"not an object: {json.dumps(row)[:80]}"))
            continue
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            problems.append((index, "no 'file_name' string"))
            continue
        if "bbox" not in row:
            problems.append((index, "no 'bbox'"))
            continue
        try:
            detections.append(Detection(index, name, to_xyxy(row["bbox"], box_format)))
        except ValueError as exc:
            problems.append((index, str(exc)))
    return detections, problems


