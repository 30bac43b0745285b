"""Ground-truth masks of objects, at the size of the loaded image, whatever layout annotated them.

An object's `mask` value says how to draw it:

    "parts"                     FungiTastic: the union of its image's part masks in `SplitData.masks_file`
    ("coco", segm, w, h)        COCO polygons or RLE drawn on a w x h image (None x None: the loaded size)
    ("polygon", [x1, y1, ...])  YOLO segment, normalised to 0..1
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from boxrefiner.data.fungitastic import ground_truth_mask, read_masks
from boxrefiner.data.splits import SplitData


class GroundTruthMasks:
    """Bool HxW masks of a split's objects at the loaded image size, drawn on request, image by image
    (a split's masks together would not fit in memory); FungiTastic's parquet rows of the images
    named at the start are read once."""

    def __init__(self, split: SplitData, objects: Sequence[int]):
        self.split = split
        parts = {split.images[split.objects[i].image].file_name for i in objects if split.objects[i].mask == "parts"}
        self.rows = read_masks(split.masks_file, parts) if parts and split.masks_file is not None else {}

    def __call__(self, objects: Sequence[int]) -> dict[int, np.ndarray]:
        """The mask of each of `objects` that has one."""
        masks = {}
        for index in objects:
            obj = self.split.objects[index]
            image = self.split.images[obj.image]
            if obj.mask == "parts":
                if image.file_name in self.rows:
                    masks[index] = ground_truth_mask(self.rows[image.file_name], image.width, image.height)
            elif obj.mask is not None:
                masks[index] = object_mask(obj.mask, image.width, image.height)
        return masks


def ground_truth_masks(split: SplitData, objects: Sequence[int]) -> dict[int, np.ndarray]:
    """The masks of `objects` (indices into `split.objects`) that have one, all at once."""
    return GroundTruthMasks(split, objects)(objects)


def object_mask(value: Any, width: int, height: int) -> np.ndarray:
    """A COCO or YOLO mask value drawn at the loaded `width` x `height` (COCO: nearest-neighbour scaled
    from its annotated size, as the boxes are)."""
    kind, *rest = value
    if kind == "polygon":
        coords = np.asarray(rest[0], dtype=np.float64).reshape(-1, 2) * (width, height)
        return _decode(mask_utils.frPyObjects([coords.ravel().tolist()], height, width), width, height)
    segm, ann_w, ann_h = rest
    if isinstance(segm, list):  # polygons, in pixels of the annotated image
        ann_w, ann_h = (width, height) if ann_w is None else (round(ann_w), round(ann_h))
        return _decode(mask_utils.frPyObjects(segm, ann_h, ann_w), width, height)
    if isinstance(segm["counts"], list):  # uncompressed RLE (its own `size` is the frame)
        return _decode([mask_utils.frPyObjects(segm, *segm["size"])], width, height)
    return _decode([segm], width, height)


def _decode(rles: list[dict], width: int, height: int) -> np.ndarray:
    """The union of RLEs as a bool mask, resized (nearest) to `width` x `height` when drawn at another size."""
    mask = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    if mask.shape == (height, width):
        return mask
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
