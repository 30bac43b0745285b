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

import functools
import threading
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from boxrefiner.config import DataConfig
from boxrefiner.data.layout import DataError, Layout, RawImage, RawObject, SkipImage
from boxrefiner.data.rle import BoxOutsideImage, RLEError, decode_cvat_rle, rle_box

_SPLITS = {
    # split: (CSV name suffixes tried in order, image folder, masks parquet suffix)
    "train": (("Train",), "train", "TrainMasks"),
    "val": (("ClosedSet-Val", "Val"), "val", "ValidationMasks"),
    "test": (("ClosedSet-Test", "Test"), "test", "TestMasks"),
}
FUNGUS = {1: "fungus"}  # one category: the whole fruiting body


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
        box = rle_box(rle, width, height)
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
    return np.asarray(Image.fromarray(canvas).resize((width, height), Image.Resampling.NEAREST))


def read_fungitastic(cfg: DataConfig, split: str) -> Layout:
    """The split's images that have masks, one object each (the union of its parts). Only the parquet's
    file names are read here; its masks are read when the first image needs its box (none, on a warm
    start: the boxes come from the start-up memo) and decoded only for the images `load_split` keeps."""
    csv, image_dir, masks = split_paths(cfg, split)
    names = read_filenames(csv)
    with_masks = _masked_names(masks)
    rows = _LazyRows(masks, set(names) & with_masks)
    layout = Layout([], dict(FUNGUS), masks_file=masks)
    for name in names:
        if name in with_masks:
            layout.images.append(RawImage(name, image_dir / name, functools.partial(_union_object, rows, name),
                                          memo=(masks, name)))
        else:
            layout.skipped.append((name, "no_mask", ""))
    return layout


def _masked_names(parquet: Path) -> set[str]:
    try:
        return set(pd.read_parquet(parquet, columns=["file_name"])["file_name"].dropna())
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{parquet}: cannot read masks parquet with columns file_name, width, height, rle ({exc})") from None


class _LazyRows:
    """The mask rows of the split's images, read from the parquet once, when first asked (from any thread)."""

    def __init__(self, parquet: Path, names: set[str]):
        self.parquet, self.names = parquet, names
        self._rows: dict[str, list[tuple]] | None = None
        self._error: DataError | None = None
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> list[tuple]:
        with self._lock:
            if self._error is not None:
                raise self._error  # read once: a bad parquet fails every image at once, not once each
            if self._rows is None:
                try:
                    self._rows = read_masks(self.parquet, self.names)
                except DataError as exc:
                    self._error = exc
                    raise
        if name not in self._rows:  # the parquet was replaced since its names were read
            raise SkipImage("no_mask", f"{self.parquet} no longer has masks for it")
        return self._rows[name]


def _union_object(rows: _LazyRows, name: str) -> tuple[tuple[float, float], list[RawObject]]:
    try:
        x0, y0, x1, y1, mask_w, mask_h = union_box(rows[name])
    except RLEError as exc:
        raise SkipImage("outside_image" if isinstance(exc, BoxOutsideImage) else "bad_rle", str(exc)) from None
    return (mask_w, mask_h), [RawObject((x0, y0, x1, y1), 1, "parts", "mask union")]
