"""Pictures of boxes moving: a grid of images with the truth, input and refined boxes of each object
and the IoU gain written on each refined box (the run folder's `val_boxes.jpg`, TensorBoard's box
grid), and one picture per image of what `refine` returned."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from boxrefiner.boxes import box_iou
from boxrefiner.data.images import load_rgb
from boxrefiner.plots.draw import (
    INPUT,
    PROBLEM,
    REFINED,
    TRUTH,
    Box,
    draw_boxes,
    grid,
    label,
    legend,
    overlay_masks,
    scale_to,
)

CELL = 384  # pixels of one grid cell


@dataclass
class Thumbnail:
    """One pictured image, decoded and scaled once: `scale` is thumbnail pixels per image pixel."""
    file_name: str
    image: Image.Image
    scale: float
    objects: list[int] = field(default_factory=list)  # the split's objects on it

    @classmethod
    def of(cls, path: Path, file_name: str, objects: list[int], longest: int = CELL - 8) -> Thumbnail:
        picture, scale = scale_to(Image.fromarray(load_rgb(path)), longest)
        return cls(file_name, picture, scale, objects)


def box_tile(thumb: Thumbnail, truth: np.ndarray, inputs: np.ndarray, refined: np.ndarray) -> Image.Image:
    """The thumbnail with each object's truth, input and refined box (xyxy pixels of the full image,
    one row per object of `thumb.objects`; a NaN row is not drawn), the IoU gain on each refined box
    and the image's mean IoU input -> refined at the bottom."""
    tile = thumb.image.copy()
    s = thumb.scale
    ok = np.isfinite(refined).all(1)
    before = box_iou(torch.from_numpy(inputs[ok]), torch.from_numpy(truth[ok])).numpy()
    after = box_iou(torch.from_numpy(refined[ok]), torch.from_numpy(truth[ok])).numpy()
    boxes = [Box(b * s, TRUTH, width=3) for b in truth]
    boxes += [Box(b * s, REFINED, f"{gain(a - i):+.2f}") for b, i, a in zip(refined[ok], before, after)]
    boxes += [Box(b * s, INPUT, dashed=True) for b in inputs[ok]]
    draw_boxes(tile, boxes, text_size=13)
    caption = (f"{Path(thumb.file_name).name}  IoU {before.mean():.2f} -> {after.mean():.2f}" if ok.any()
               else f"{Path(thumb.file_name).name}  (not validated)")
    label(ImageDraw.Draw(tile), (0, tile.height), caption, (235, 235, 235), 13, tile.size)
    return tile


def gain(value: float) -> float:
    """An IoU gain as written on a box: one that rounds to zero is +0.00, never -0.00."""
    return value if abs(value) >= 0.005 else 0.0


def boxes_grid(tiles: Sequence[Image.Image], title: str, columns: int = 4) -> Image.Image:
    """Tiles in a grid under a legend of the three colours."""
    header = legend(min(columns, max(1, len(tiles))) * CELL,
                    [("truth", TRUTH), ("input (dashed)", INPUT), ("refined (+IoU gain)", REFINED)], title)
    return grid(tiles, columns, CELL, header)


def refine_picture(image: Image.Image, rows: Sequence[dict], boxes: Sequence[tuple[np.ndarray, np.ndarray | None]],
                   masks: Sequence[np.ndarray] = (), smallest: int = 640) -> Image.Image:
    """One image of `refine`'s output: HQ-SAM's masks tinted (when given), each row's input box (dashed)
    and refined box (None: not refined, drawn grey with its reason), labelled with the predicted IoU.
    A small image is enlarged to `smallest` pixels on its longest side, so that the labels read."""
    picture = overlay_masks(image, masks) if len(masks) else image.copy()
    s = 1.0
    if max(picture.size) < smallest:
        picture, s = scale_to(picture, smallest)
    width = max(2, round(max(picture.size) / 400))
    drawn: list[Box] = []
    for row, (before, after) in zip(rows, boxes):
        if after is None:
            drawn.append(Box(before * s, PROBLEM, str(row.get("refine_error", "not refined")).split(":")[0], width))
            continue
        predicted = row.get("iou_pred")
        drawn.append(Box(after * s, REFINED, f"IoU pred {predicted:.2f}" if isinstance(predicted, float) else "",
                         width))
        drawn.append(Box(before * s, INPUT, width=width, dashed=True))
    draw_boxes(picture, drawn)
    return picture
