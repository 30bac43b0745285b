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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boxrefiner.config import DataConfig
from boxrefiner.data.layout import NORMALISED, Layout, RawObject, SkipImage
from boxrefiner.data.reading import read_images
from boxrefiner.utils.memo import FileMemo

log = logging.getLogger(__name__)





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
    digest: str | None = None  # sha256 of the file's bytes, when indexing was asked for it


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
               seed: int = 0, detections: str | None = None, memo: FileMemo | None = None,
               digests: bool = False) -> SplitData:
    """Index one split: its images, their objects' boxes in the loaded images' pixels, and what was
    skipped and why; with `detections` (a detections JSON), detector boxes matched to the objects.

    With `memo`, what was read of an unchanged file (image size, content hash, its objects) is taken
    from there; `digests` also hashes each image (the feature cache's key)."""
    layout = read_layout(cfg, split)
    result = SplitData(split, [], categories=dict(layout.categories), masks_file=layout.masks_file)
    for name, reason, detail in layout.skipped:
        result.skip(name, reason, detail)
    listed = sorted(layout.images, key=lambda r: r.file_name)
    chosen = [listed[i] for i in choose_subset(len(listed), sample_ratio, max_samples, seed)]
    facts = read_images(chosen, memo if memo is not None else FileMemo(None), digests, f"Indexing {split}")
    for raw, fact in zip(chosen, facts):
        if not fact.present:
            result.skip(raw.file_name, "missing_image", str(raw.path))
            continue
        if isinstance(fact.annotated, SkipImage):
            log.debug("%s: %s %s", raw.file_name, fact.annotated.reason, fact.annotated.detail)
            result.skip(raw.file_name, fact.annotated.reason, fact.annotated.detail)
            continue
        if fact.size is None:
            result.skip(raw.file_name, "unreadable_image")
            continue
        assert fact.annotated is not None  # read for every present image
        (width, height), (annotated, objects) = fact.size, fact.annotated
        kept = _place_objects(result, raw.file_name, objects, annotated, width, height, cfg.min_box_size)
        if not kept:
            if not objects:  # (when every object was left out, their own reasons say why)
                result.skip(raw.file_name, "no_objects")
            continue
        image = len(result.images)
        result.images.append(ImageRecord(raw.file_name, raw.path, width, height, fact.digest))
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
