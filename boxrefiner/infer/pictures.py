"""`refine --visualize`: one picture per image of what refine returned: the input box (dashed) and
the refined box of each detection, labelled with the predicted IoU; rows not refined in grey with
their reason; HQ-SAM's masks tinted underneath when they were drawn (`--masks`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from boxrefiner.data.detections import to_xyxy
from boxrefiner.data.images import DECODE_ERRORS, load_rgb
from boxrefiner.infer.apply import ImagePaths
from boxrefiner.infer.export import check_folder, claim_folder, output_paths, remove_stale
from boxrefiner.plots import refine_picture, save_picture
from boxrefiner.utils.files import first_line
from boxrefiner.utils.progress import progress

log = logging.getLogger("boxrefiner")
UNREAD = ("missing_image", "unreadable_image")  # refine_error of a row whose image there is no picture of


def row_boxes(row: dict, box_format: str) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(input box, refined box or None when not refined) as xyxy pixels; None for a row without a usable box."""
    try:
        if "bbox_input" in row and "refine_error" not in row:
            return np.array(to_xyxy(row["bbox_input"], box_format)), np.array(to_xyxy(row["bbox"], box_format))
        return np.array(to_xyxy(row.get("bbox"), box_format)), None
    except ValueError:
        return None


def write_pictures(rows: list[Any], resolve: ImagePaths, box_format: str, folder: Path) -> tuple[int, int]:
    """A JPEG per image of the rows in `folder` (this tool's: an earlier run's other pictures are
    removed), named by the image's file name; returns (written, not drawn). An image that cannot be
    read or drawn is a log line: the rows were written before."""
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("file_name"), str) and row_boxes(row, box_format) is not None \
                and str(row.get("refine_error")).split(":")[0] not in UNREAD:  # refine said so already
            by_image.setdefault(row["file_name"], []).append(row)
    check_folder(folder, "pictures")
    paths = output_paths(by_image, folder, ".jpg")
    claim_folder(folder)
    written: set[Path] = set()
    for name in progress(sorted(by_image), desc="Pictures", unit="img"):
        mine = by_image[name]
        try:
            image = Image.fromarray(load_rgb(resolve(name)))
            masks = [np.asarray(Image.open(r["mask"]).convert("L")) > 127 for r in mine if isinstance(r.get("mask"), str)]
            boxes = [row_boxes(r, box_format) for r in mine]
            save_picture(refine_picture(image, mine, [b for b in boxes if b is not None], masks), paths[name])
        except (*DECODE_ERRORS, ValueError) as exc:  # the image or a mask file is gone or broken; a full disk
            log.warning("no picture of %s: %s", name, first_line(exc))
            continue
        written.add(paths[name])
    remove_stale(folder, written, ".jpg")
    return len(written), len(by_image) - len(written)
