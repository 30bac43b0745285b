"""Deterministic synthetic data, so demos and tests run the real loaders.

FungiTastic layout (`generate`): each image shows one mushroom (cap + stem, varied colours, sizes and
positions) on a textured background with leaf-like distractors. The image and its part masks are
drawn at a "full" size; the JPEG is saved at `<size>p` (longest side), and the masks go into a
CVAT-RLE parquet in full-size coordinates, exactly like the published dataset.

COCO + YOLO layout (`generate_multi_object`): 1..max_objects mushrooms per image in three categories
(by cap colour), described twice over the same JPEGs (a COCO instances JSON and Ultralytics labels),
with a simulated, systematically biased detector's output to refine.

    boxrefiner synth --out data/synthetic_fungitastic --train 96 --val 32 --seed 0
    boxrefiner synth --out data/synthetic_multi --layout coco-yolo --train 192 --val 48
"""

from __future__ import annotations

import colorsys
import functools
import logging
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from boxrefiner.config import Config, DataConfig
from boxrefiner.data.rle import encode_cvat_rle, mask_box
from boxrefiner.utils.files import atomic_write, write_bytes, write_json

SUBSET = "FungiTastic-Mini"
FULL_LONG_SIDE = 960
_ASPECTS = ((4, 3), (3, 4), (1, 1), (3, 2))
log = logging.getLogger(__name__)
_SPLIT_FILES = {"train": ("Train", "TrainMasks"), "val": ("ClosedSet-Val", "ValidationMasks")}


def _write_csv(frame: pd.DataFrame, f: BinaryIO) -> None:
    f.write(frame.to_csv(index=False).encode())


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))  # type: ignore[return-value]


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Earthy low-frequency texture with fine grain and a few leaf-like blobs."""
    base = np.array([_hsv(rng.uniform(0.05, 0.30), rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.6)) for _ in range(2)], float)
    coarse = rng.random((rng.integers(6, 14), rng.integers(6, 14)))
    blend = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    img = base[0] * blend[..., None] + base[1] * (1 - blend[..., None])
    img += rng.normal(0, 12, (height, width, 1))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(3, 9)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.02, 0.08) * width, rng.uniform(0.01, 0.04) * height
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry),
                     fill=_hsv(rng.uniform(0.08, 0.35), rng.uniform(0.4, 0.9), rng.uniform(0.2, 0.7)))
    return canvas.filter(ImageFilter.GaussianBlur(1.0))


def draw_mushroom(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """One image and its part masks ({'cap': HxW bool, 'stem': HxW bool}) at full size."""
    image = _background(rng, width, height)
    short = min(width, height)
    cap_w = rng.uniform(0.18, 0.55) * short
    cap_h = cap_w * rng.uniform(0.35, 0.75)
    stem_w = cap_w * rng.uniform(0.15, 0.32)
    stem_h = cap_w * rng.uniform(0.35, 1.0)
    total_h = cap_h * 0.6 + stem_h
    cx = rng.uniform(cap_w / 2 + 2, width - cap_w / 2 - 2)
    top = rng.uniform(2, height - total_h - 2)
    lean = rng.uniform(-0.25, 0.25) * stem_w

    stem_top = top + cap_h * 0.6
    stem = [(cx - stem_w / 2, stem_top), (cx + stem_w / 2, stem_top),
            (cx + stem_w * 0.6 + lean, stem_top + stem_h), (cx - stem_w * 0.6 + lean, stem_top + stem_h)]
    cap = (cx - cap_w / 2, top, cx + cap_w / 2, top + cap_h)

    masks = {}
    for part, shape in (("stem", stem), ("cap", cap)):
        layer = Image.new("L", (width, height), 0)
        (ImageDraw.Draw(layer).polygon if part == "stem" else ImageDraw.Draw(layer).ellipse)(shape, fill=255)
        masks[part] = np.asarray(layer) > 127

    hue = rng.choice([rng.uniform(0.0, 0.12), rng.uniform(0.12, 0.17), rng.uniform(0.55, 0.9)])
    cap_colour = _hsv(hue, rng.uniform(0.3, 0.95), rng.uniform(0.45, 0.95))
    stem_colour = _hsv(hue, rng.uniform(0.05, 0.3), rng.uniform(0.75, 0.98))
    draw = ImageDraw.Draw(image)
    draw.polygon(stem, fill=stem_colour)
    draw.ellipse(cap, fill=cap_colour)
    if rng.random() < 0.5:  # spots, inside the cap
        for _ in range(rng.integers(3, 10)):
            sx, sy = rng.uniform(cap[0] + cap_w * 0.2, cap[2] - cap_w * 0.2), rng.uniform(top + cap_h * 0.15, top + cap_h * 0.6)
            r = cap_w * rng.uniform(0.02, 0.06)
            draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(235, 230, 220))
    return image, masks


def generate(out: str | Path, train: int = 96, val: int = 32, seed: int = 0, sizes: tuple[int, ...] = (300,)) -> Path:
    """Write the dataset under `out`; the same arguments always give the same files."""
    out = Path(out)
    for split, count in (("train", train), ("val", val)):
        csv_suffix, masks_suffix = _SPLIT_FILES[split]
        rows, mask_rows = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
            aw, ah = _ASPECTS[rng.integers(len(_ASPECTS))]
            scale = FULL_LONG_SIDE / max(aw, ah)
            width, height = round(aw * scale), round(ah * scale)
            image, masks = draw_mushroom(rng, width, height)
            name = f"{split}-{seed}-{i:05d}.JPG"
            for size in sizes:
                factor = size / max(width, height)
                small = image.resize((round(width * factor), round(height * factor)), Image.Resampling.LANCZOS)
                atomic_write(out / SUBSET / split / f"{size}p" / name, functools.partial(small.save, format="JPEG", quality=90))
            rows.append({"filename": name, "observationID": 1000 * (seed + 1) + i, "species": "Synthetica fungoides",
                         "category_id": int(i % 5)})
            for label, mask in masks.items():
                mask_rows.append({"file_name": name, "label": label, "width": width, "height": height,
                                  "rle": encode_cvat_rle(mask)})
        atomic_write(out / "metadata" / SUBSET / f"{SUBSET}-{csv_suffix}.csv",
                     functools.partial(_write_csv, pd.DataFrame(rows)))
        atomic_write(out / "masks" / f"{SUBSET}-{masks_suffix}.parquet",
                     functools.partial(pd.DataFrame(mask_rows).to_parquet, index=False))
    return out


def simulated_detections(root: str | Path | None, split: str = "val", center_std: float = 0.15, scale_std: float = 0.2,
                         seed: int = 0, per_image: int = 1, data: DataConfig | None = None) -> list[dict]:
    """A stand-in for a detector's output on a dataset: every object's ground-truth box (read by the
    real loader) with detector-like noise, a score and its category name, as refine_boxes.py reads them;
    `per_image` independent detections of each object (rows grouped by object, in object order).
    `data` reads any layout; without it, `root` is a FungiTastic root."""
    import torch

    from boxrefiner.boxes import jitter_draws, normalise_boxes, pixel_boxes
    from boxrefiner.config import BoxNoiseConfig
    from boxrefiner.data.splits import load_split

    loaded = load_split(data if data is not None else DataConfig(data_root=str(root)), split)
    if not loaded.objects:
        return []
    images = [loaded.images[o.image] for o in loaded.objects]
    width, height = loaded.image_sizes()
    truth, extent = normalise_boxes(torch.tensor([o.box for o in loaded.objects], dtype=torch.float64), width, height)
    max_sigma = BoxNoiseConfig().max_sigma  # draws clipped as in training
    generator = torch.Generator().manual_seed(seed)
    noisy = pixel_boxes(jitter_draws(truth, extent, center_std, scale_std, max_sigma, per_image, generator), width, height)
    scores = np.random.default_rng(seed).uniform(0.3, 0.99, (len(images), per_image))
    return [{"file_name": im.file_name, "bbox": [round(float(v), 2) for v in box], "score": round(float(score), 3),
             "label": loaded.category_name(o.category_id)}
            for im, o, boxes, row in zip(images, loaded.objects, noisy, scores) for box, score in zip(boxes, row)]


# --- several objects per image, in COCO and YOLO layouts ---------------------------------------------------

MULTI_CATEGORIES = {1: "red_cap", 2: "yellow_cap", 3: "violet_cap"}
_CAP_HUES = {1: (-0.02, 0.03), 2: (0.12, 0.16), 3: (0.74, 0.84)}  # far apart, so colour tells the category
_SUPERSAMPLE = 3  # drawn at this multiple of the saved size: smooth edges, and an exact pixel grid per saved pixel
_CAP_POINTS = 40  # vertices of a cap's ellipse (drawn and annotated as the same polygon)
_CAP_FRACTION = (0.2, 0.5)  # cap width / shorter image side, log-uniform (the FungiTastic demo: 0.18-0.55)
_PLACEMENT_TRIES = 40
# The simulated detector: boxes too large and shifted down-right by these factors of the box size.
DETECTOR_SCALE = (1.25, 1.35)
DETECTOR_SHIFT = (0.08, 0.12)
DETECTOR_MISS_RATE = 0.05
DETECTOR_FALSE_POSITIVES = 1 / 3  # per image

Box = tuple[float, float, float, float]
Polygon = list[tuple[float, float]]


def _saved_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """Width and height of a saved image: one of `_ASPECTS` with longest side `size`."""
    aw, ah = _ASPECTS[rng.integers(len(_ASPECTS))]
    return round(aw * size / max(aw, ah)), round(ah * size / max(aw, ah))


def _mushroom_outline(rng: np.random.Generator, short: float) -> tuple[Polygon, Polygon, float, float]:
    """Cap and stem polygons with the cap's top centre at (0, 0), and the outline's width and height:
    placement needs the extent before the position."""
    cap_w = short * float(np.exp(rng.uniform(*np.log(_CAP_FRACTION))))
    cap_h = cap_w * rng.uniform(0.35, 0.75)
    stem_w = cap_w * rng.uniform(0.15, 0.32)
    stem_h = cap_w * rng.uniform(0.35, 1.0)
    lean = rng.uniform(-0.25, 0.25) * stem_w  # the stem's foot stays within the cap's width
    angles = np.linspace(0, 2 * np.pi, _CAP_POINTS, endpoint=False)
    cap = [(float(cap_w / 2 * np.cos(a)), float(cap_h / 2 * (1 + np.sin(a)))) for a in angles]
    stem_top = cap_h * 0.6
    stem = [(-stem_w / 2, stem_top), (stem_w / 2, stem_top),
            (stem_w * 0.6 + lean, stem_top + stem_h), (-stem_w * 0.6 + lean, stem_top + stem_h)]
    return cap, stem, cap_w, stem_top + stem_h


def _overlaps(box: Box, others: list[Box], gap: float) -> bool:
    return any(box[0] < o[2] + gap and o[0] < box[2] + gap and box[1] < o[3] + gap and o[1] < box[3] + gap
               for o in others)


def _place_mushrooms(rng: np.random.Generator, width: int, height: int, count: int) -> list[tuple[Polygon, Polygon]]:
    """Up to `count` (cap, stem) outlines in full-size pixels whose boxes do not touch (so that every
    mask is the whole drawn shape); one that finds no free place in a few tries is dropped."""
    placed: list[tuple[Polygon, Polygon]] = []
    boxes: list[Box] = []
    margin = 2.0 * _SUPERSAMPLE
    for _ in range(count):
        cap, stem, w, h = _mushroom_outline(rng, min(width, height))
        for _ in range(_PLACEMENT_TRIES):
            cx = rng.uniform(w / 2 + margin, width - w / 2 - margin)
            top = rng.uniform(margin, height - h - margin)
            box = (cx - w / 2, top, cx + w / 2, top + h)
            if not _overlaps(box, boxes, margin):
                boxes.append(box)
                placed.append(([(x + cx, y + top) for x, y in cap], [(x + cx, y + top) for x, y in stem]))
                break
    return placed


def _saved_mask(shapes: tuple[Polygon, Polygon], width: int, height: int) -> np.ndarray:
    """The outline's mask in saved-image pixels: each saved pixel is a `_SUPERSAMPLE`-square block of
    drawn pixels, foreground when at least half of it is (drawn in a crop around the outline, for speed)."""
    k = _SUPERSAMPLE
    xs = [x for shape in shapes for x, _ in shape]
    ys = [y for shape in shapes for _, y in shape]
    left, top = max(0, int(min(xs) // k) - 1), max(0, int(min(ys) // k) - 1)
    right, bottom = min(width, int(max(xs) // k) + 2), min(height, int(max(ys) // k) + 2)
    layer = Image.new("L", ((right - left) * k, (bottom - top) * k), 0)
    draw = ImageDraw.Draw(layer)
    for shape in shapes:
        draw.polygon([(x - left * k, y - top * k) for x, y in shape], fill=255)
    blocks = np.asarray(layer, dtype=np.float32).reshape(bottom - top, k, right - left, k).mean(axis=(1, 3))
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = blocks >= 127.5
    return mask


def _paint_mushroom(draw: ImageDraw.ImageDraw, rng: np.random.Generator, shapes: tuple[Polygon, Polygon],
                    category_id: int) -> None:
    """Stem, cap in its category's hue, and sometimes pale spots kept well inside the cap (so the mask
    is exactly the outline)."""
    cap, stem = shapes
    hue = rng.uniform(*_CAP_HUES[category_id])
    draw.polygon(stem, fill=_hsv(hue, rng.uniform(0.05, 0.3), rng.uniform(0.75, 0.98)))
    draw.polygon(cap, fill=_hsv(hue, rng.uniform(0.6, 0.95), rng.uniform(0.65, 0.95)))
    if rng.random() < 0.5:
        xs, ys = [x for x, _ in cap], [y for _, y in cap]
        cx, cy, rx, ry = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, (max(xs) - min(xs)) / 2, (max(ys) - min(ys)) / 2
        for _ in range(rng.integers(3, 10)):
            angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.55)
            sx, sy = cx + radius * rx * np.cos(angle), cy + radius * ry * np.sin(angle)
            r = ry * rng.uniform(0.06, 0.16)
            draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(235, 230, 220))


def _tight_box(mask: np.ndarray) -> Box:
    """`rle.mask_box`'s tight box of a non-empty mask, in pixel-edge coordinates (right = last column + 1)."""
    box = mask_box(mask)
    assert box is not None, "the caller keeps only non-empty masks"
    left, top, right, bottom = box
    return float(left), float(top), float(right + 1), float(bottom + 1)


def _segmentation(shapes: tuple[Polygon, Polygon], mask: np.ndarray, as_polygon: bool) -> list | dict:
    """COCO segmentation in saved pixels: the outline's polygons (cap, stem), or the mask's compressed RLE.
    A drawn vertex p covers the pixel centred on p, so its pixel-edge coordinate is p + 0.5."""
    if as_polygon:
        return [[round((v + 0.5) / _SUPERSAMPLE, 2) for point in shape for v in point] for shape in shapes]
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def draw_scene(rng: np.random.Generator, size: int, max_objects: int,
               first_category: int = 1) -> tuple[Image.Image, list[dict]]:
    """One saved-size image with 1..max_objects mushrooms, and its objects in drawing order as
    {category_id, box (xyxy saved pixels: the tight box of the mask), mask (saved pixels), shapes (the
    outline's polygons, drawn pixels)}. The first object is `first_category` (so that a split of a few
    images already shows every category), the others random."""
    width, height = _saved_size(rng, size)
    full_w, full_h = width * _SUPERSAMPLE, height * _SUPERSAMPLE
    # The texture needs no supersampling (only the mushrooms' edges do): drawn at the saved size, 9x cheaper.
    image = _background(rng, width, height).resize((full_w, full_h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    objects = []
    for n, shapes in enumerate(_place_mushrooms(rng, full_w, full_h, int(rng.integers(1, max_objects + 1)))):
        category_id = first_category if n == 0 else int(rng.integers(1, len(MULTI_CATEGORIES) + 1))
        mask = _saved_mask(shapes, width, height)
        _paint_mushroom(draw, rng, shapes, category_id)
        if mask.any():
            objects.append({"category_id": category_id, "box": _tight_box(mask), "mask": mask, "shapes": shapes})
    return image.resize((width, height), Image.Resampling.LANCZOS), objects


def _clip(box: Box, width: int, height: int) -> Box:
    return (min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
            min(max(box[2], 0.0), width), min(max(box[3], 0.0), height))


def _detection(file_name: str, box: Box, score: float, category_id: int) -> dict:
    return {"file_name": file_name, "bbox": [round(float(v), 2) for v in box], "score": round(float(score), 3),
            "category_id": int(category_id)}


def _biased_box(rng: np.random.Generator, box: Box) -> Box:
    """The detector's box of one object: too large and shifted down-right, the same way every time."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    scale = rng.uniform(*DETECTOR_SCALE) * np.exp(rng.normal(0, 0.03, 2))
    shift = rng.uniform(*DETECTOR_SHIFT) + rng.normal(0, 0.015, 2)
    cx, cy = (x0 + x1) / 2 + shift[0] * w, (y0 + y1) / 2 + shift[1] * h
    return cx - w * scale[0] / 2, cy - h * scale[1] / 2, cx + w * scale[0] / 2, cy + h * scale[1] / 2


def _background_box(rng: np.random.Generator, boxes: list[Box], width: int, height: int) -> Box | None:
    """A random box that touches no object (a false positive), or None when the image has no room."""
    scale = max(width, height)  # false positives of 6-30% of the image's longest side
    for _ in range(_PLACEMENT_TRIES):
        w, h = (min(v, side - 1) for v, side in zip(rng.uniform(0.06, 0.3, 2) * scale, (width, height)))
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = (x0, y0, x0 + w, y0 + h)
        if not _overlaps(box, boxes, 0.0):
            return box
    return None


def biased_detections(rng: np.random.Generator, file_name: str, objects: list[tuple[Box, int]], width: int,
                      height: int) -> list[dict]:
    """A detector that is wrong the same way on every object (`_biased_box`), clipped to the image;
    it misses about `DETECTOR_MISS_RATE` of the objects, and about `DETECTOR_FALSE_POSITIVES` times per
    image adds a low-score box on the background. `objects`: (xyxy box, category_id) in saved pixels;
    rows in refine_boxes.py's format, objects first (in their order), then the false positive."""
    rows = []
    for box, category_id in objects:
        if rng.random() >= DETECTOR_MISS_RATE:
            rows.append(_detection(file_name, _clip(_biased_box(rng, box), width, height), rng.uniform(0.55, 0.99),
                                   category_id))
    if rng.random() < DETECTOR_FALSE_POSITIVES:
        stray = _background_box(rng, [b for b, _ in objects], width, height)
        if stray is not None:
            rows.append(_detection(file_name, stray, rng.uniform(0.05, 0.35),
                                   int(rng.integers(1, len(MULTI_CATEGORIES) + 1))))
    return rows


def _coco_annotation(ann_id: int, image_id: int, obj: dict) -> dict:
    """One COCO annotation; every other one carries its mask as polygons, the rest as compressed RLE,
    so that readers meet both kinds."""
    x0, y0, x1, y1 = obj["box"]
    return {"id": ann_id, "image_id": image_id, "category_id": obj["category_id"],
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(obj["mask"].sum()), "iscrowd": 0,
            "segmentation": _segmentation(obj["shapes"], obj["mask"], as_polygon=ann_id % 2 == 1)}


def _yolo_lines(objects: list[dict], width: int, height: int) -> str:
    """Ultralytics labels: `class cx cy w h`, normalised, class = COCO category_id - 1; 10 decimals (Ultralytics
    writes 6), so that both layouts give the same float32 boxes and the same training run."""
    lines = []
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        lines.append(f"{obj['category_id'] - 1} {(x0 + x1) / 2 / width:.10f} {(y0 + y1) / 2 / height:.10f} "
                     f"{(x1 - x0) / width:.10f} {(y1 - y0) / height:.10f}\n")
    return "".join(lines)


def _data_yaml() -> str:
    names = "".join(f"  {category_id - 1}: {name}\n" for category_id, name in MULTI_CATEGORIES.items())
    return f"path: .\ntrain: images/train\nval: images/val\nnames:\n{names}"


def _write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def _multi_split(out: Path, split: str, count: int, seed: int, size: int, max_objects: int) -> int:
    """Write one split's images, YOLO labels, COCO JSON and biased detections; returns the object count."""
    split_index = 0 if split == "train" else 1
    images: list[dict] = []
    annotations: list[dict] = []
    detections: list[dict] = []
    for i in range(count):
        image, objects = draw_scene(np.random.default_rng([seed, split_index, i, 0]), size, max_objects,
                                    first_category=i % len(MULTI_CATEGORIES) + 1)
        name = f"{split}-{seed}-{i:05d}.jpg"
        width, height = image.size
        atomic_write(out / "images" / split / name, functools.partial(image.save, format="JPEG", quality=90))
        _write_text(out / "labels" / split / f"{Path(name).stem}.txt", _yolo_lines(objects, width, height))
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        annotations += [_coco_annotation(len(annotations) + n + 1, i + 1, obj) for n, obj in enumerate(objects)]
        detections += biased_detections(np.random.default_rng([seed, split_index, i, 1]), name,
                                        [(obj["box"], obj["category_id"]) for obj in objects], width, height)
    categories = [{"id": c, "name": n, "supercategory": "mushroom"} for c, n in MULTI_CATEGORIES.items()]
    write_json(out / "annotations" / f"instances_{split}.json",
               {"info": {"description": "synthetic mushrooms (boxrefiner.data.synthetic)", "version": "1"},
                "images": images, "annotations": annotations, "categories": categories})
    write_json(out / "detections" / f"{split}.json", detections)
    return len(annotations)


def generate_multi_object(out: str | Path, train: int = 192, val: int = 48, seed: int = 0, size: int = 300,
                          max_objects: int = 3) -> Path:
    """Write a multi-object detection dataset under `out`, in COCO and YOLO layouts over the same JPEGs,
    with a biased detector's boxes of both splits; the same arguments always give the same files.

        images/{train,val}/<split>-<seed>-<i:05d>.jpg    longest side `size`
        annotations/instances_{train,val}.json          COCO: bbox = tight box of the mask, saved pixels
        labels/{train,val}/<stem>.txt, data.yaml        YOLO: class = category_id - 1
        detections/{train,val}.json                     [{file_name, bbox xyxy, score, category_id}]
    """
    if size < 32 or max_objects < 1 or train < 0 or val < 0:
        raise ValueError(f"need size >= 32, max_objects >= 1 and non-negative counts, got size {size}, "
                         f"max_objects {max_objects}, train {train}, val {val}")
    out = Path(out)
    for split, count in (("train", train), ("val", val)):
        _multi_split(out, split, count, seed, size, max_objects)
    _write_text(out / "data.yaml", _data_yaml())
    return out








def ensure_synthetic_data(cfg: Config) -> None:
    """Generate the demo dataset when the config asks for it (`data.synthetic`) and it is not there yet:
    FungiTastic's layout at data.data_root, or for coco / yolo the multi-object dataset (both layouts
    and simulated detections) at data.data_root, which the config's paths then point into."""
    data, s = cfg.data, cfg.data.synthetic
    if s is None:
        return
    root = Path(data.data_root)
    if data.format == "fungitastic":
        if (root / "metadata").is_dir():
            return
        from boxrefiner.data.synthetic import generate
        log.info("data.data_root %s is missing: generating %d train + %d val synthetic images (seed %d)", root,
                 s.train_images, s.val_images, s.seed)
        generate(root, s.train_images, s.val_images, s.seed)
        return
    wanted = data.yolo_data if data.format == "yolo" else data.train_annotations
    if not data.data_root or (wanted and Path(wanted).is_file()):
        return
    from boxrefiner.data.synthetic import generate_multi_object
    log.info("%s is missing: generating a %d train + %d val multi-object synthetic dataset (seed %d) in %s", wanted,
             s.train_images, s.val_images, s.seed, root)
    generate_multi_object(root, s.train_images, s.val_images, s.seed)
