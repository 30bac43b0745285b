"""FungiTastic in its published layout: split CSVs, `<size>p` image folders and the CVAT-RLE masks parquet.

    <data_root>/metadata/FungiTastic-Mini/FungiTastic-Mini-Train.csv         (column `filename`)
    <data_root>/metadata/FungiTastic-Mini/FungiTastic-Mini-ClosedSet-Val.csv
    <data_root>/FungiTastic-Mini/{train,val,test}/{300p,500p,720p,fullsize}/<filename>
    <data_root>/masks/FungiTastic-Mini-TrainMasks.parquet                   (file_name, label, width, height, rle)
    <data_root>/masks/FungiTastic-Mini-ValidationMasks.parquet

The ground-truth box of an image is the tight box of the union of all its mask parts (cap, stem,
gills, ...): the smallest box holding every foreground pixel, in continuous pixel-edge coordinates
(`right = last column + 1`), scaled from the annotated `width` x `height` image to the loaded one.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from .config import DataConfig
from .rle import BoxOutsideImage, RLEError, decode_cvat_rle, mask_box

log = logging.getLogger(__name__)

_SPLITS = {
    # split: (CSV name suffixes tried in order, image folder, masks parquet suffix)
    "train": (("Train",), "train", "TrainMasks"),
    "val": (("ClosedSet-Val", "Val"), "val", "ValidationMasks"),
    "test": (("ClosedSet-Test", "Test"), "test", "TestMasks"),
}
_EXIF_ORIENTATION = 0x0112
# What decoding a broken, truncated or absurdly large image raises (PIL's bomb check is a plain Exception).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataError(ValueError):
    """The dataset cannot be used as configured; the message is one line naming the path."""


@dataclass(frozen=True)
class Sample:
    file_name: str
    image_path: Path
    width: int  # of the loaded (EXIF-oriented) image
    height: int
    box: tuple[float, float, float, float]  # ground truth, xyxy pixels of the loaded image


@dataclass
class SplitData:
    split: str
    samples: list[Sample]
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (file_name, reason)
    # Samples left out after indexing (their image stopped decoding, or its features are not finite):
    # they keep their index, so sampling order and resumption do not depend on when this was found.
    excluded: dict[int, str] = field(default_factory=dict)

    def skip(self, file_name: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.skipped_files.append((file_name, reason))

    def exclude(self, index: int, reason: str) -> None:
        if index not in self.excluded:
            self.excluded[index] = reason
            self.skip(self.samples[index].file_name, reason)

    @property
    def usable(self) -> int:
        return len(self.samples) - len(self.excluded)


def subset_name(subset: str) -> str:
    return subset if subset.startswith("FungiTastic") else f"FungiTastic-{subset}"


def expected_layout(cfg: DataConfig) -> str:
    name = subset_name(cfg.data_subset)
    return (f"expected {cfg.data_root}/metadata/{name}/{name}-Train.csv, "
            f"{cfg.data_root}/{name}/<split>/{_size_folder(cfg.image_size)}/<filename>, "
            f"{cfg.data_root}/masks/{name}-TrainMasks.parquet")


def _size_folder(image_size: int | str) -> str:
    return "fullsize" if image_size == "fullsize" else f"{image_size}p"


def split_paths(cfg: DataConfig, split: str) -> tuple[Path, Path, Path]:
    """(metadata CSV, image folder, masks parquet) of a split; DataError when the layout is off."""
    if split not in _SPLITS:
        raise DataError(f"unknown split '{split}' (data.train_split / data.val_split): use one of {', '.join(_SPLITS)}")
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise DataError(f"data.data_root '{root}' does not exist; {expected_layout(cfg)}")
    name = subset_name(cfg.data_subset)
    csv_suffixes, folder, masks_suffix = _SPLITS[split]
    candidates = [root / "metadata" / name / f"{name}-{s}.csv" for s in csv_suffixes]
    csv = next((c for c in candidates if c.is_file()), None)
    if csv is None:
        raise DataError(f"metadata CSV for split '{split}' not found: {candidates[0]}; {expected_layout(cfg)}")
    images = root / name / folder / _size_folder(cfg.image_size)
    if not images.is_dir():
        raise DataError(f"image folder for split '{split}' not found: {images} (data.image_size={cfg.image_size!r})")
    masks = Path(cfg.masks_file) if cfg.masks_file else root / "masks" / f"{name}-{masks_suffix}.parquet"
    if not masks.is_file():
        raise DataError(f"masks file for split '{split}' not found: {masks} (data.masks_file overrides it)")
    return csv, images, masks


def read_filenames(csv: Path) -> list[str]:
    try:
        frame = pd.read_csv(csv, usecols=["filename"], dtype=str)
    except ValueError as exc:
        raise DataError(f"{csv}: needs a 'filename' column ({exc})") from None
    return list(dict.fromkeys(frame["filename"].dropna()))  # unique, in file order


def read_masks(parquet: Path, file_names: set[str]) -> dict[str, list[tuple]]:
    """Mask rows (rle, width, height) per file name, for the given files only."""
    try:
        frame = pd.read_parquet(parquet, columns=["file_name", "width", "height", "rle"])
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{parquet}: cannot read masks parquet with columns file_name, width, height, rle ({exc})") from None
    frame = frame[frame["file_name"].isin(file_names)]
    rows: dict[str, list[tuple]] = {}
    for name, rle, width, height in zip(frame["file_name"], frame["rle"], frame["width"], frame["height"]):
        try:
            size = int(width), int(height)
        except (TypeError, ValueError):  # NaN or text: the row cannot be placed; the image is skipped as bad_rle
            size = (0, 0)
        rows.setdefault(name, []).append((rle, *size))
    return rows


def union_box(rows: list[tuple]) -> tuple[float, float, float, float, int, int]:
    """Tight box (pixel edges) of all parts of one image, and the annotated image size."""
    boxes = []
    for rle, width, height in rows:
        if width <= 0 or height <= 0:
            raise RLEError(f"mask row without a valid image size ({width}x{height})")
        mask, (left, top, _, _) = decode_cvat_rle(rle, width, height)
        box = mask_box(mask, (left, top))
        if box is not None:
            boxes.append(box)
    if not boxes:
        raise RLEError("every part mask is empty")
    arr = np.array(boxes)
    _, width, height = rows[0]
    return float(arr[:, 0].min()), float(arr[:, 1].min()), float(arr[:, 2].max() + 1), float(arr[:, 3].max() + 1), width, height


def ground_truth_mask(rows: list[tuple], width: int, height: int) -> np.ndarray:
    """Union of an image's part masks (rows from `read_masks`), scaled (nearest) from the annotated size
    to the loaded `width` x `height` image: the object HQ-SAM should cut out."""
    _, mask_w, mask_h = rows[0]
    canvas = np.zeros((mask_h, mask_w), dtype=bool)
    for rle, part_w, part_h in rows:
        part, (left, top, _, _) = decode_cvat_rle(rle, part_w, part_h)
        canvas[top:top + part.shape[0], left:left + part.shape[1]] |= part
    if (mask_w, mask_h) == (width, height):
        return canvas
    return np.asarray(Image.fromarray(canvas).resize((width, height), Image.NEAREST))


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
    """Seeded random subset of indices (kept in file order), not a prefix."""
    count = n if ratio is None else max(1, int(round(n * ratio)))
    if max_count is not None:
        count = min(count, max_count)
    if count >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=count, replace=False).tolist())


def load_split(cfg: DataConfig, split: str, *, sample_ratio: float | None = None, max_samples: int | None = None,
               seed: int = 0) -> SplitData:
    """Index one split: images with masks, their ground-truth boxes, and what was skipped and why."""
    csv, image_dir, masks = split_paths(cfg, split)
    names = read_filenames(csv)
    rows = read_masks(masks, set(names))
    result = SplitData(split, [])
    with_masks = []
    for name in names:
        if name in rows:
            with_masks.append(name)
        else:
            result.skip(name, "no_mask")
    for index in choose_subset(len(with_masks), sample_ratio, max_samples, seed):
        name = with_masks[index]
        path = image_dir / name
        if not path.is_file():
            result.skip(name, "missing_image")
            continue
        try:
            x0, y0, x1, y1, mask_w, mask_h = union_box(rows[name])
        except RLEError as exc:
            log.debug("%s: %s", name, exc)
            result.skip(name, "out_of_image" if isinstance(exc, BoxOutsideImage) else "bad_rle")
            continue
        try:
            width, height = oriented_size(path)
        except DECODE_ERRORS:
            result.skip(name, "unreadable_image")
            continue
        sx, sy = width / mask_w, height / mask_h
        box = (x0 * sx, y0 * sy, min(x1 * sx, width), min(y1 * sy, height))
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            result.skip(name, "empty_box")
            continue
        result.samples.append(Sample(name, path, width, height, box))
    return result
