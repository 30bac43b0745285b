"""COCO instances JSON: `images`, `annotations` and `categories`, one object per annotation.

    data.<split>_images       folder the images' `file_name`s are relative to
    data.<split>_annotations  {"images": [{id, file_name, width, height}],
                               "annotations": [{id, image_id, category_id, bbox: [x, y, w, h], segmentation, iscrowd}],
                               "categories": [{id, name}]}

Boxes are in pixels of the image as its `width` x `height` say (the loaded size when they are
missing). A file that is not such a JSON is a `DataError`; a row that cannot be used is skipped
and named (annotation id, or its index in the list when it has no id), never the end of the run.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from boxrefiner.config import DataConfig
from boxrefiner.data.layout import DataError, Layout, RawImage, RawObject
from boxrefiner.utils.files import read_json


def read_coco(cfg: DataConfig, split: str) -> Layout:
    """The split's images with their annotations (checked per object when load_split asks for them)."""
    if split not in ("train", "val"):
        raise DataError(f"data.format coco has the splits train and val, not '{split}'")
    images_dir = Path(getattr(cfg, f"{split}_images") or "")
    annotations = Path(getattr(cfg, f"{split}_annotations") or "")
    if not annotations.is_file():
        raise DataError(f"data.{split}_annotations '{annotations}' does not exist")
    if not images_dir.is_dir():
        raise DataError(f"data.{split}_images '{images_dir}' is not a folder")
    doc = _read_json(annotations)
    categories = _categories(doc["categories"], annotations)
    layout = Layout([], categories)
    entries = _images(doc["images"], annotations, layout)  # image id -> (file_name, size, annotations)
    for index, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict):
            layout.skipped.append((str(annotations), "bad_annotation", f"annotations[{index}]: not an object"))
        elif _is_id(ann.get("image_id")) and ann["image_id"] in entries:
            entries[ann["image_id"]][2].append((index, ann))
        else:
            layout.skipped.append((str(annotations), "unknown_image",
                                   f"{_ref(ann, index)}: image_id {ann.get('image_id')!r} is not in 'images'"))
    for file_name, size, anns in entries.values():
        if file_name is not None:
            read = functools.partial(_objects, anns, size, categories)
            layout.images.append(RawImage(file_name, images_dir / file_name, read))
    return layout


def _read_json(path: Path) -> dict:
    """The annotations document, with its three lists present (one-line DataError otherwise)."""
    doc = read_json(path, "COCO annotations", DataError, dict)
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            what = "is missing" if key not in doc else f"is a {type(doc[key]).__name__}"
            raise DataError(f"COCO annotations '{path}': key '{key}' {what}; it must be a list")
    return doc


def _categories(rows: list, path: Path) -> dict[int, str]:
    """{id: name}; a category that cannot be read makes the whole file unusable (its objects could not be named)."""
    categories: dict[int, str] = {}
    for index, row in enumerate(rows):
        cid = row.get("id") if isinstance(row, dict) else None
        if not _is_int(cid) or not isinstance(row.get("name"), str):
            raise DataError(f"COCO annotations '{path}': categories[{index}] needs an integer 'id' and a 'name'")
        if cid in categories:
            raise DataError(f"COCO annotations '{path}': categories[{index}] repeats category id {cid}")
        categories[row["id"]] = row["name"]
    return categories


def _images(rows: list, path: Path, layout: Layout) -> dict[Any, tuple[str | None, tuple[float, float] | None, list]]:
    """Image id -> (file_name, annotated size, its annotations to come); a left-out image keeps its id with
    file_name None, so that its annotations are dropped with it instead of being reported as unknown_image."""
    entries: dict[Any, tuple[str | None, tuple[float, float] | None, list]] = {}
    owner: dict[str, Any] = {}  # file_name -> image id
    for index, row in enumerate(rows):
        image_id = row.get("id") if isinstance(row, dict) else None
        name = row.get("file_name") if isinstance(row, dict) else None
        if not _is_id(image_id) or not isinstance(name, str) or not name:
            layout.skipped.append((str(path), "bad_image_entry", f"images[{index}]: needs an 'id' and a 'file_name'"))
        elif image_id in entries:
            detail = f"images[{index}]: image id {image_id!r} is used twice; its annotations go to the first"
            layout.skipped.append((name, "duplicate_image", detail))
        elif name in owner:
            detail = f"image {image_id!r}: file_name is also image {owner[name]!r}'s; its annotations are left out"
            layout.skipped.append((name, "duplicate_image", detail))
            entries[image_id] = (None, None, [])
        else:
            owner[name] = image_id
            entries[image_id] = (name, _size(row), [])
    return entries


def _size(row: dict) -> tuple[float, float] | None:
    """The annotated frame (width, height), or None (the loaded image's own size) when not given."""
    width, height = row.get("width"), row.get("height")
    if _is_number(width) and _is_number(height) and row["width"] > 0 and row["height"] > 0:
        return float(row["width"]), float(row["height"])
    return None


def _objects(anns: list[tuple[int, dict]], size: tuple[float, float] | None,
             categories: dict[int, str]) -> tuple[tuple[float, float] | None, list[RawObject]]:
    return size, [_object(ann, index, size, categories) for index, ann in anns]


def _object(ann: dict, index: int, size: tuple[float, float] | None, categories: dict[int, str]) -> RawObject:
    """One annotation as an object, or with the reason it cannot be one."""
    ref = _ref(ann, index)

    def unusable(reason: str, detail: str) -> RawObject:
        return RawObject.unusable(ref, reason, detail)

    if ann.get("iscrowd"):
        return unusable("crowd", "iscrowd is set: a crowd region is not one object")
    category = ann.get("category_id")
    if not _is_int(category) or category not in categories:
        return unusable("unknown_category", f"category_id {category!r} is not in 'categories'")
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return unusable("invalid_box", f"bbox must be 4 finite numbers [x, y, width, height], got {_short(bbox)}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return unusable("invalid_box", f"bbox {bbox} has no positive width and height")
    try:
        mask = _segmentation(ann.get("segmentation"), size)
    except (TypeError, ValueError) as exc:
        return unusable("bad_segmentation", str(exc))
    return RawObject((x, y, x + w, y + h), category, mask, ref)


def _segmentation(segm: Any, size: tuple[float, float] | None) -> tuple | None:
    """The mask value `masks.object_mask` draws: ("coco", segmentation, annotated width, height), or None
    when there is none; TypeError or ValueError saying what is wrong with a malformed one."""
    if segm is None or segm == []:
        return None
    if isinstance(segm, list):
        for i, polygon in enumerate(segm):
            if not (isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
                    and all(_is_number(v) for v in polygon)):
                raise ValueError(f"segmentation polygon {i} must be a list of at least 3 x, y points, got {_short(polygon)}")
    elif isinstance(segm, dict):
        _check_rle(segm)
    else:
        raise TypeError(f"segmentation must be a list of polygons or an RLE object, got {_short(segm)}")
    return ("coco", segm) + (size or (None, None))


def _check_rle(rle: dict) -> None:
    """An RLE object that decodes: `size` [height, width] and `counts`, either runs covering every pixel
    or the compressed string."""
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        raise ValueError(f"segmentation RLE needs 'size' [height, width], got {_short(size)}")
    if isinstance(counts, list):
        if not all(_is_int(v) and v >= 0 for v in counts) or sum(counts) != size[0] * size[1]:
            raise ValueError(f"segmentation RLE 'counts' must be runs covering the {size[1]}x{size[0]} pixels")
    elif isinstance(counts, str):
        try:
            mask_utils.decode({"size": size, "counts": counts})
        except ValueError:
            raise ValueError(f"segmentation RLE 'counts' does not decode to {size[1]}x{size[0]} pixels") from None
    else:
        raise TypeError(f"segmentation RLE 'counts' must be a list of runs or a string, got {_short(counts)}")


def _ref(ann: dict, index: int) -> str:
    return f"annotation {ann['id']}" if _is_id(ann.get("id")) else f"annotations[{index}]"


def _short(value: Any) -> str:
    return json.dumps(value)[:80]


def _is_id(value: Any) -> bool:
    """An image or annotation id: an integer or a string (JSON has no other hashable values)."""
    return _is_int(value) or isinstance(value, str)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
