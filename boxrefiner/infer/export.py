"""Refined boxes in the formats other tools read, besides the tool's own JSON:

- `coco`: a COCO results list, `[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`, what
  `pycocotools`' `COCO.loadRes` and COCOeval read. `image_id` comes from a COCO annotations file
  (its `images` entry of the same file name, or the same bare name where unambiguous), else it is
  the 1-based index of the file name among the sorted file names of the detections. `category_id`
  is the row's (default 1), `score` the detector's (default 1.0); `file_name`, `iou_pred` and
  `refine_error` ride along as their own fields.
- `yolo`: one `<file name>.txt` per image, a line `class cx cy w h score` per box, normalised by the
  image's width and height (a box reaching outside the image clipped to it); `class` is the row's
  `class`, else its `category_id` as it is (YOLO's classes are 0-based: give `class` when the
  detector's ids are not), else 0. The folder is marked as this tool's: a later run into it
  replaces its txt files, and a folder holding files of another origin is refused.

Every object row is written with the box it ends with: the refined box, or the input box where it
could not be refined (`refine_error`, which the log counts). What cannot be written (no usable bbox; in COCO an
image the annotations file lacks; in YOLO an image whose size is unknown because it could not be
read) is counted by reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from boxrefiner.data.detections import DetectionsError, to_xyxy
from boxrefiner.data.splits import ImageNames
from boxrefiner.utils.files import read_json, write_bytes

OUTPUT_FORMATS = ("json", "coco", "yolo")
MARKER = ".boxrefiner-output"  # in a folder of per-image files this tool wrote (YOLO labels, pictures)
Box = tuple[float, float, float, float]


def final_boxes(rows: list[Any], box_format: str) -> tuple[list[tuple[dict, Box]], Counter]:
    """Each object row with the xyxy box it ends with, and the rows that have none, counted by reason."""
    found: list[tuple[dict, Box]] = []
    counts: Counter[str] = Counter()
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
            counts["not a detection row"] += 1
            continue
        try:
            box = to_xyxy(row.get("bbox"), box_format)
        except ValueError:
            counts["malformed bbox"] += 1
            continue
        found.append((row, box))
    return found, counts


def annotation_image_ids(path: str | Path) -> Callable[[str], int | None]:
    """file_name -> image id of a COCO annotations file's `images` (exact name, else the bare name
    where only one image has it)."""
    data = read_json(Path(path), "COCO annotations file", DetectionsError, kind=dict)
    images = data.get("images")
    if not isinstance(images, list) or not all(isinstance(i, dict) and isinstance(i.get("file_name"), str)
                                              and isinstance(i.get("id"), int) for i in images):
        raise DetectionsError(f"COCO annotations file '{path}': 'images' must be a list of {{id, file_name}} objects")
    names = ImageNames([i["file_name"] for i in images])
    ids = [i["id"] for i in images]

    def find(name: str) -> int | None:
        k = names.find(name)
        if k is None:  # a detector that names the image by a longer path than the annotations do
            k = names.find(PurePosixPath(name.replace("\\", "/")).name)
        return None if k is None else ids[k]
    return find


def index_image_ids(rows: list[Any]) -> Callable[[str], int | None]:
    """file_name -> 1-based index among the rows' sorted distinct file names (stable for the same files)."""
    names = sorted({r["file_name"] for r in rows if isinstance(r, dict) and isinstance(r.get("file_name"), str)})
    ids = {name: k + 1 for k, name in enumerate(names)}
    return ids.get


def _number(row: dict, key: str, default: float) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _integer(row: dict, *keys: str, default: int) -> int:
    for key in keys:
        value = row.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def coco_results(rows: list[Any], box_format: str,
                 image_id: Callable[[str], int | None]) -> tuple[list[dict], Counter, int]:
    """The COCO results list of `rows`, the rows not written by reason, and how many of those written
    carry their input box (not refined)."""
    found, counts = final_boxes(rows, box_format)
    results = []
    for row, (x0, y0, x1, y1) in found:
        image = image_id(row["file_name"])
        if image is None:
            counts["image not in the COCO annotations"] += 1
            continue
        result = {"image_id": image, "category_id": _integer(row, "category_id", default=1),
                  "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)], "score": _number(row, "score", 1.0),
                  "file_name": row["file_name"]}
        for key in ("iou_pred", "refine_error"):
            if key in row:
                result[key] = row[key]
        results.append(result)
    return results, counts, sum("refine_error" in r for r in results)


def yolo_labels(rows: list[Any], box_format: str,
                sizes: dict[str, tuple[int, int]]) -> tuple[dict[str, list[str]], Counter, int]:
    """file_name -> its lines `class cx cy w h score` (normalised), the rows not written by reason, and
    how many of those written carry their input box (not refined)."""
    found, counts = final_boxes(rows, box_format)
    labels: dict[str, list[str]] = {}
    unrefined = 0
    for row, (x0, y0, x1, y1) in found:
        size = sizes.get(row["file_name"])
        if size is None:
            counts["image size unknown (the image could not be read)"] += 1
            continue
        w, h = size  # YOLO's frame is the image: a box reaching outside is clipped to it
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))
        if x1 <= x0 or y1 <= y0:
            counts["box outside its image"] += 1
            continue
        values = ((x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h, _number(row, "score", 1.0))
        labels.setdefault(row["file_name"], []).append(
            f"{_integer(row, 'class', 'category_id', default=0)} " + " ".join(f"{v:.6f}" for v in values))
        unrefined += "refine_error" in row
    return labels, counts, unrefined


def output_path(folder: Path, file_name: str, suffix: str) -> Path:
    """Where an image's own output file goes: its relative path under `folder` with `suffix` (an
    absolute name, or one that climbs with '..', by its bare name)."""
    name = PurePosixPath(file_name.replace("\\", "/"))
    if name.is_absolute() or ".." in name.parts:
        name = PurePosixPath(name.name)
    return folder / Path(*name.parts).with_suffix(suffix)


def output_paths(names: Iterable[str], folder: Path, suffix: str) -> dict[str, Path]:
    """file_name -> its output file; two images that would share one file are refused (before any work)."""
    paths: dict[str, Path] = {}
    owner: dict[Path, str] = {}
    for name in sorted(set(names)):
        path = output_path(folder, name, suffix)
        if path in owner:
            raise DetectionsError(f"images '{owner[path]}' and '{name}' would both write {path}")
        paths[name], owner[path] = path, name
    return paths


def check_folder(folder: Path, what: str) -> None:
    """Refuse an output folder that holds files this tool did not write there (a dataset's images or
    labels would be overwritten or mixed with the output)."""
    if folder.exists() and not folder.is_dir():
        raise DetectionsError(f"'{folder}' is a file; {what} go into a folder")
    if folder.is_dir() and not (folder / MARKER).exists() and any(folder.iterdir()):
        raise DetectionsError(f"'{folder}' holds files this tool did not write (a dataset's images or labels?); "
                              f"{what} go into a new or empty folder")


def claim_folder(folder: Path) -> None:
    """Mark a folder as this tool's output, so that a later run may replace what it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).exists():
        write_bytes(folder / MARKER, b"written by boxrefiner refine; its files are replaced by the next run\n")


def remove_stale(folder: Path, written: set[Path], suffix: str) -> int:
    """Delete the `suffix` files an earlier run left in this tool's folder that this run did not write."""
    if not (folder / MARKER).exists():
        return 0
    stale = [p for p in folder.rglob(f"*{suffix}") if p not in written and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def write_yolo(folder: Path, labels: dict[str, list[str]]) -> int:
    """One txt per image (each atomically) in this tool's folder, an earlier run's other txt files
    removed; returns the number of files written."""
    check_folder(folder, "YOLO labels")
    paths = output_paths(labels, folder, ".txt")
    claim_folder(folder)
    for name, path in paths.items():
        write_bytes(path, ("\n".join(labels[name]) + "\n").encode())
    remove_stale(folder, set(paths.values()), ".txt")
    return len(paths)
