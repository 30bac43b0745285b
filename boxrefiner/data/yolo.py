"""Ultralytics YOLO layout: a data.yaml, image folders or lists, and one label file per image.

    data.yaml   path: <dataset root>   (relative to the yaml's folder; default that folder)
                train: images/train    (a folder, searched recursively; a .txt list of image paths; or a list of these)
                val: images/val
                names: [cat, dog]      (or {0: cat, 1: dog})
    labels      <root>/labels/train/a.txt for <root>/images/train/a.jpg (the last /images/ becomes /labels/),
                one object a line: `class cx cy w h` or a segment `class x1 y1 x2 y2 x3 y3 ...`, normalised to 0..1

An image without a label file has no objects. A malformed line is skipped and named (label file
and line number); a data.yaml that does not say where the split is, is a `DataError`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from boxrefiner.config import DataConfig
from boxrefiner.data.layout import NORMALISED, DataError, Layout, RawImage, RawObject, SkipImage

# Ultralytics' image suffixes (ultralytics.data.utils.IMG_FORMATS), compared in lower case
IMG_FORMATS = {"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm", "heic"}


def read_yolo(cfg: DataConfig, split: str) -> Layout:
    """The images the data.yaml's `split` key names, each with its label file (read when load_split asks)."""
    data_yaml = Path(cfg.yolo_data or "")
    doc = _read_yaml(data_yaml)
    names = _names(doc.get("names"), data_yaml)
    root = _root(doc.get("path"), data_yaml)
    layout = Layout([], names)
    classes = hashlib.sha256(json.dumps(sorted(names.items())).encode()).hexdigest()[:12]  # what a line's class is checked against
    seen: set[Path] = set()
    for path in _image_paths(doc, split, root, data_yaml, layout):
        file_name = _display(path, root)
        if path in seen:
            layout.skipped.append((file_name, "duplicate_image", f"listed twice in '{split}' of {data_yaml}"))
            continue
        seen.add(path)
        label = label_path(path)
        shown = _display(label, root)
        layout.images.append(RawImage(file_name, path, functools.partial(_objects, label, shown, names),
                                      memo=(label, f"{shown}|{classes}")))
    return layout


def label_path(image: Path) -> Path:
    """Ultralytics' rule (img2label_paths): the last /images/ of the path becomes /labels/, the suffix .txt."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(labels.join(str(image).rsplit(images, 1))).with_suffix(".txt")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"data.yolo_data '{path}' does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"YOLO data.yaml '{path}' is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise DataError(f"YOLO data.yaml '{path}'{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(doc, dict):
        raise DataError(f"YOLO data.yaml '{path}' must hold a mapping (path, train, val, names)")
    return doc


def _names(names: Any, path: Path) -> dict[int, str]:
    """{class index: name} from a list or a mapping."""
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 and isinstance(v, str) for k, v in names.items()):
        raise DataError(f"YOLO data.yaml '{path}': key 'names' must be a list of class names or a mapping "
                        "index: name, e.g. {0: cat, 1: dog}")
    return names


def _root(value: Any, path: Path) -> Path:
    """The dataset root: `path`, relative to the yaml's folder unless absolute; that folder when not given."""
    if value is not None and not isinstance(value, str):
        raise DataError(f"YOLO data.yaml '{path}': key 'path' must be a folder name, got {value!r}")
    root = Path(os.path.abspath(path.parent / (value or "")))
    if not root.is_dir():
        raise DataError(f"YOLO data.yaml '{path}': key 'path' names {root}, which is not a folder")
    return root


def _image_paths(doc: dict, split: str, root: Path, path: Path, layout: Layout) -> list[Path]:
    """Every image the split's entries name, in their order (a folder's sorted)."""
    if split not in doc:
        raise DataError(f"YOLO data.yaml '{path}' has no key '{split}' (data.train_split / data.val_split choose the "
                        "key)")
    entries = doc[split]
    if isinstance(entries, str):
        entries = [entries]
    if not entries or not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise DataError(f"YOLO data.yaml '{path}': key '{split}' must name a folder, a .txt list of images or a "
                        f"list of these, got {entries!r}")
    images: list[Path] = []
    for entry in entries:
        where = Path(os.path.abspath(root / entry))
        if where.is_dir():
            images += sorted(Path(folder) / f for folder, _, files in os.walk(where, followlinks=True)
                             for f in files if _is_image(f))
        elif where.is_file() and _is_image(where.name):
            images.append(where)
        elif where.is_file():
            images += _listed(where, root, layout)
        else:
            raise DataError(f"YOLO data.yaml '{path}': key '{split}' names {where}, which does not exist")
    return images


def _listed(txt: Path, root: Path, layout: Layout) -> list[Path]:
    """The image paths of a .txt list: "./x" relative to the list's folder, other relative paths to the root."""
    try:
        lines = txt.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"YOLO image list '{txt}' is not UTF-8 text") from None
    images = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if not _is_image(line):
            detail = f"{txt} line {number}: the suffix is not one of {', '.join(sorted(IMG_FORMATS))}"
            layout.skipped.append((line, "not_an_image", detail))
            continue
        base = txt.parent if line.startswith("./") else root
        images.append(Path(os.path.abspath(base / line)))
    return images


def _is_image(name: str) -> bool:
    return Path(name).suffix[1:].lower() in IMG_FORMATS


def _display(path: Path, root: Path) -> str:
    """A path as messages and file names show it: relative to the dataset root, or absolute outside it."""
    return (path.relative_to(root) if path.is_relative_to(root) else path).as_posix()


def _objects(label: Path, shown: str, names: dict[int, str]) -> tuple[tuple[float, float], list[RawObject]]:
    """The label file's objects in the normalised 1 x 1 frame; none when there is no label file."""
    if not label.is_file():
        return NORMALISED, []
    try:
        lines = label.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SkipImage("bad_label_file", f"{shown}: not UTF-8 text") from None
    objects = [_parse_line(line, f"{shown} line {number}", names) for number, line in enumerate(lines, 1) if line.strip()]
    return NORMALISED, objects


def _parse_line(line: str, ref: str, names: dict[int, str]) -> RawObject:
    """`class cx cy w h` as a box, `class x1 y1 ... xn yn` (n >= 3) as a segment's box and polygon."""
    def unusable(reason: str, detail: str) -> RawObject:
        return RawObject.unusable(ref, reason, detail)

    fields = line.split()
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        return unusable("bad_label_line", f"{len(fields)} values; expected 'class cx cy w h' or "
                                          "'class x1 y1 x2 y2 x3 y3 ...'")
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return unusable("bad_label_line", f"not numbers: {line.strip()[:60]!r}")
    if not all(math.isfinite(v) for v in values):
        return unusable("bad_label_line", f"not finite: {line.strip()[:60]!r}")
    if not values[0].is_integer():
        return unusable("bad_label_line", f"class {fields[0]!r} is not an integer")
    category = int(values[0])
    if category not in names:
        return unusable("unknown_category", f"class {category} is not in 'names'")
    coords = values[1:]
    if len(coords) == 4:
        cx, cy, w, h = coords
        return RawObject((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), category, None, ref)
    xs, ys = coords[0::2], coords[1::2]
    return RawObject((min(xs), min(ys), max(xs), max(ys)), category, ("polygon", coords), ref)
