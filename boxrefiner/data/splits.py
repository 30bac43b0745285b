"""Labelled splits in any supported layout, as images and the objects in them.

Every layout reader (`fungitastic`, `coco`, `yolo`) lists a split's images with their annotated
objects in the annotation's own pixel frame; `load_split` then does what is common to all of them:
the seeded image subset (`data.sample_ratio`, `debug.max_samples` count images, and every object of
a chosen image comes along), the checks that need the image file (present, decodable, its size after
EXIF orientation), the scaling of boxes to that loaded image, and the per-object checks (inside the
image, at least `data.min_box_size` pixels). Objects, not images, are the training samples; an
image's embedding is computed and cached once however many objects it holds.

Whatever is left out is counted by reason and listed (`SplitData.skipped_files`, written to the run
folder's skipped.jsonl), naming the file and, where there is one, the annotation or line.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from boxrefiner.config import DataConfig
from boxrefiner.errors import UserError

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
# What decoding a broken, truncated or absurdly large image raises (PIL's bomb check is a plain Exception).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


NORMALISED = (1.0, 1.0)  # the annotated frame of coordinates given as fractions of the image (YOLO)


class DataError(UserError):
    """The dataset cannot be used as configured; the message is one line naming the path."""


class ImageNames:
    """Finds an image by the name a detection file gives it: its own name in the split, or its bare
    file name when no other image has it (a YOLO image is named by its path under the dataset root, a
    detector usually writes the file name alone)."""

    def __init__(self, names: list[str]):
        self.exact = {name: i for i, name in enumerate(names)}
        bare: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            bare.setdefault(Path(name).name, []).append(i)
        self.bare = {name: found[0] for name, found in bare.items() if len(found) == 1}

    def find(self, name: str) -> int | None:
        found = self.exact.get(name)
        return found if found is not None else self.bare.get(name)


@dataclass(frozen=True)
class ImageRecord:
    file_name: str  # as the annotations and detection files name it
    image_path: Path
    width: int  # of the loaded (EXIF-oriented) image
    height: int


@dataclass(frozen=True)
class ObjectRecord:
    image: int  # index into SplitData.images
    box: tuple[float, float, float, float]  # ground truth, xyxy pixels of the loaded image
    category_id: int = 1
    mask: Any = None  # what draws its ground-truth mask (see `masks.object_mask`); None: none annotated
    ref: str = ""  # where it came from, for messages: "annotation 17", "line 3"


@dataclass
class SplitData:
    split: str
    images: list[ImageRecord]
    objects: list[ObjectRecord] = field(default_factory=list)  # ordered by image file name, then annotation order
    categories: dict[int, str] = field(default_factory=lambda: {1: "object"})
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_files: list[dict] = field(default_factory=list)  # {file_name, reason[, detail]}
    # Images left out after indexing (their file stopped decoding, or their features are not finite):
    # they and their objects keep their index, so sampling order and resumption do not depend on when
    # this was found.
    excluded: dict[int, str] = field(default_factory=dict)  # image index -> reason
    masks_file: Path | None = None  # FungiTastic: the parquet the objects' masks are read from
    # Detector boxes matched one-to-one to objects (data.train_detections / data.val_detections):
    # object index -> xyxy pixels; detections that matched no object are counted in `skipped`.
    detections: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    _names: ImageNames | None = field(default=None, init=False, repr=False, compare=False)

    def skip(self, file_name: str, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.skipped_files.append({"file_name": file_name, "reason": reason, **({"detail": detail} if detail else {})})

    def exclude(self, image: int, reason: str) -> None:
        if image not in self.excluded:
            self.excluded[image] = reason
            self.skip(self.images[image].file_name, reason)

    @property
    def usable(self) -> int:
        """Objects whose image is not excluded."""
        if not self.excluded:
            return len(self.objects)
        return sum(o.image not in self.excluded for o in self.objects)

    @property
    def object_image(self) -> torch.Tensor:
        """(N,) image index of every object."""
        return torch.tensor([o.image for o in self.objects], dtype=torch.long)

    def category_name(self, category_id: int) -> str:
        return self.categories.get(category_id, str(category_id))

    def image_named(self, file_name: str) -> int | None:
        """The image a detection's `file_name` names (see `ImageNames`)."""
        if self._names is None:
            self._names = ImageNames([image.file_name for image in self.images])
        return self._names.find(file_name)

    def objects_by_image(self) -> dict[int, list[int]]:
        """Image index -> its objects' indices, in order."""
        grouped: dict[int, list[int]] = {}
        for k, obj in enumerate(self.objects):
            grouped.setdefault(obj.image, []).append(k)
        return grouped

    def image_sizes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) float64 each: the width and the height of each object's image."""
        images = [self.images[o.image] for o in self.objects]
        return (torch.tensor([i.width for i in images], dtype=torch.float64),
                torch.tensor([i.height for i in images], dtype=torch.float64))


@dataclass
class RawObject:
    """An annotated object in its annotation's pixel frame (YOLO: normalised, a 1 x 1 frame)."""
    box: tuple[float, float, float, float]  # xyxy
    category_id: int = 1
    mask: Any = None
    ref: str = ""  # "annotation 17", "labels/a.txt line 3": named in every message about it
    problem: tuple[str, str] | None = None  # (reason, detail): the reader found it unusable (skipped, counted)

    @classmethod
    def unusable(cls, ref: str, reason: str, detail: str) -> RawObject:
        """An annotation a reader could not make an object of: skipped and counted where its image is used."""
        return cls((0.0, 0.0, 0.0, 0.0), ref=ref, problem=(reason, detail))


class SkipImage(Exception):
    """A layout reader's verdict on a whole image: left out for `reason` (a short snake_case word)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class RawImage:
    """An image as a layout lists it. `annotated` returns (annotated width, height or None for the
    loaded image's own size, objects), or raises SkipImage; it runs for the chosen subset only, so a
    costly reader (FungiTastic's mask decoding) decodes nothing it does not use."""
    file_name: str
    path: Path
    annotated: Callable[[], tuple[tuple[float, float] | None, list[RawObject]]]


@dataclass
class Layout:
    """What a layout reader hands to `load_split`: images in any order, what it already left out
    (e.g. an annotation pointing at an unknown image), the category names, and the masks parquet."""
    images: list[RawImage]
    categories: dict[int, str]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (file_name, reason, detail)
    masks_file: Path | None = None


def oriented_size(path: Path) -> tuple[int, int]:
    """Width and height after EXIF orientation, read from the header only."""
    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


_WIDE_MODES_SEEN: set[str] = set()


def to_8bit(img: Image.Image, path: Path | str = "") -> Image.Image:
    """16-bit, 32-bit and float images as 8 bits: Pillow's `convert("RGB")` would clip them to 255
    (all white). 16-bit by its full range (/257); 32-bit integer and float by the image's own
    min-max range, which has no fixed scale (logged once per kind and process)."""
    if img.mode.startswith("I;16"):
        values = np.asarray(img).astype(np.float64) / 257.0
    elif img.mode in ("I", "F"):
        values = np.asarray(img).astype(np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        values = np.nan_to_num((values - lo) / (hi - lo) * 255.0 if hi > lo else values * 0.0, nan=0.0,
                               posinf=255.0, neginf=0.0)
        if img.mode not in _WIDE_MODES_SEEN:
            _WIDE_MODES_SEEN.add(img.mode)
            kind = "32-bit integer" if img.mode == "I" else "floating-point"
            log.warning("%s is a %s image: scaled to 8 bits by its own min-max range (%g..%g); further such "
                        "images are scaled the same way without a message", path, kind, lo, hi)
    else:
        return img
    return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), mode="L")


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image as HxWx3 uint8 RGB, EXIF orientation applied (wide images scaled to 8 bits)."""
    with Image.open(path) as img:
        return np.asarray(to_8bit(ImageOps.exif_transpose(img), path).convert("RGB"))


def readable(path: Path) -> bool:
    """Whether the whole image decodes (a truncated JPEG has a valid header but fails here)."""
    try:
        load_rgb(path)
        return True
    except DECODE_ERRORS:
        return False


def choose_subset(n: int, ratio: float | None, max_count: int | None, seed: int) -> list[int]:
    """Seeded random subset of indices (kept in order), not a prefix."""
    count = n if ratio is None else max(1, round(n * ratio))
    if max_count is not None:
        count = min(count, max_count)
    if count >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=count, replace=False).tolist())


def read_layout(cfg: DataConfig, split: str) -> Layout:
    """The configured layout's reader (DataError when its files are not where the config says)."""
    if cfg.format == "coco":
        from boxrefiner.data.coco import read_coco
        return read_coco(cfg, split)
    if cfg.format == "yolo":
        from boxrefiner.data.yolo import read_yolo
        return read_yolo(cfg, split)
    from boxrefiner.data.fungitastic import read_fungitastic
    return read_fungitastic(cfg, split)


def describe_layout(cfg: DataConfig) -> str:
    """Where the configured layout expects its files, for messages about an unusable split."""
    if cfg.format == "coco":
        return "data.format coco reads data.<split>_images and data.<split>_annotations (COCO instances JSON)"
    if cfg.format == "yolo":
        return f"data.format yolo reads {cfg.yolo_data} (Ultralytics data.yaml: path, train, val, names)"
    from boxrefiner.data.fungitastic import expected_layout
    return expected_layout(cfg)


def load_split(cfg: DataConfig, split: str, *, sample_ratio: float | None = None, max_samples: int | None = None,
               seed: int = 0, detections: str | None = None) -> SplitData:
    """Index one split: its images, their objects' boxes in the loaded images' pixels, and what was
    skipped and why; with `detections` (a detections JSON), detector boxes matched to the objects."""
    layout = read_layout(cfg, split)
    result = SplitData(split, [], categories=dict(layout.categories), masks_file=layout.masks_file)
    for name, reason, detail in layout.skipped:
        result.skip(name, reason, detail)
    listed = sorted(layout.images, key=lambda r: r.file_name)
    for index in choose_subset(len(listed), sample_ratio, max_samples, seed):
        raw = listed[index]
        if not raw.path.is_file():
            result.skip(raw.file_name, "missing_image", str(raw.path))
            continue
        try:
            annotated, objects = raw.annotated()
        except SkipImage as skip:
            log.debug("%s: %s %s", raw.file_name, skip.reason, skip.detail)
            result.skip(raw.file_name, skip.reason, skip.detail)
            continue
        try:
            width, height = oriented_size(raw.path)
        except DECODE_ERRORS:
            result.skip(raw.file_name, "unreadable_image")
            continue
        kept = _place_objects(result, raw.file_name, objects, annotated, width, height, cfg.min_box_size)
        if not kept:
            if not objects:  # (when every object was left out, their own reasons say why)
                result.skip(raw.file_name, "no_objects")
            continue
        image = len(result.images)
        result.images.append(ImageRecord(raw.file_name, raw.path, width, height))
        result.objects += [ObjectRecord(image, box, o.category_id, o.mask, o.ref) for box, o in kept]
    if detections:
        from boxrefiner.data.matching import attach_detections
        attach_detections(result, detections, cfg.detection_box_format, cfg.detection_match_iou)
    return result


def _place_objects(result: SplitData, file_name: str, objects: list[RawObject], annotated: tuple[float, float] | None,
                   width: int, height: int, min_size: float) -> list[tuple[tuple[float, float, float, float], RawObject]]:
    """Objects scaled from the annotated frame to the loaded image, clipped to it; those outside it,
    without area or smaller than `min_size` pixels are skipped by reason."""
    sx, sy = (1.0, 1.0) if annotated is None else (width / annotated[0], height / annotated[1])
    # normalised coordinates (YOLO) come back as pixels with decimal noise (152.99999997): snap to 1e-6 px
    snap = (lambda v: round(v, 6)) if annotated == NORMALISED else (lambda v: v)
    kept = []
    for obj in objects:
        if obj.problem is not None:
            result.skip(file_name, obj.problem[0], f"{obj.ref}: {obj.problem[1]}")
            continue
        x0, y0, x1, y1 = obj.box
        if not (x1 > x0 and y1 > y0):
            result.skip(file_name, "invalid_box", f"{obj.ref}: box {list(obj.box)} has no positive width and height")
            continue
        box = (max(0.0, snap(x0 * sx)), max(0.0, snap(y0 * sy)), min(snap(x1 * sx), float(width)),
               min(snap(y1 * sy), float(height)))
        if box[2] <= box[0] or box[3] <= box[1]:
            result.skip(file_name, "outside_image", f"{obj.ref}: box {[round(v, 2) for v in obj.box]} lies outside "
                                                    f"the {width}x{height} image")
            continue
        if box[2] - box[0] < min_size or box[3] - box[1] < min_size:
            result.skip(file_name, "too_small", f"{obj.ref}: {box[2] - box[0]:.1f}x{box[3] - box[1]:.1f} pixels, "
                                                f"below data.min_box_size {min_size:g}")
            continue
        kept.append((box, obj))
    return kept
