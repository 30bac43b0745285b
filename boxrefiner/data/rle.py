"""CVAT run-length encoding, as stored in FungiTastic's masks parquet.

A value is a list of integers: run lengths alternating background/foreground, starting with a
background run (possibly 0), covering the part's bounding box row by row; the last four numbers are
that box `[left, top, right, bottom]`, inclusive, in the coordinates of the annotated image.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np


class RLEError(ValueError):
    """A mask value that does not decode; the message says why."""


class BoxOutsideImage(RLEError):
    """The part's box lies (partly) outside the image the mask was drawn on."""


def parse_rle(value: Any) -> np.ndarray:
    """Accept a list/array of ints or the same numbers stored as a string ("[1, 2, ...]" or "1,2,...")."""
    if isinstance(value, (bytes, str)):
        text = value.decode() if isinstance(value, bytes) else value
        tokens = re.findall(r"-?\d+(?:\.\d+)?", text)
        if len(re.sub(r"[\s,\[\]\d.-]", "", text)):
            raise RLEError(f"RLE string has characters other than numbers: {text[:40]!r}")
        numbers = np.array([float(t) for t in tokens])
    else:
        try:
            numbers = np.asarray(value, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise RLEError(f"RLE is neither a list of numbers nor a string: {type(value).__name__}") from None
    if numbers.size < 5:
        raise RLEError(f"RLE has {numbers.size} numbers; needs runs plus a 4-number box")
    if not np.all(numbers == np.round(numbers)) or np.any(numbers < 0):
        raise RLEError("RLE holds negative or non-integer numbers")
    return numbers.astype(np.int64)


def _runs_and_box(value: Any, width: int | None, height: int | None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The runs and the part's box of a valid value (RLEError saying what is wrong otherwise)."""
    numbers = parse_rle(value)
    runs, (left, top, right, bottom) = numbers[:-4], (int(v) for v in numbers[-4:])
    box_w, box_h = right - left + 1, bottom - top + 1
    if box_w <= 0 or box_h <= 0:
        raise RLEError(f"RLE box [{left}, {top}, {right}, {bottom}] is empty")
    if width is not None and height is not None and (right >= width or bottom >= height):
        raise BoxOutsideImage(f"RLE box [{left}, {top}, {right}, {bottom}] lies outside the {width}x{height} image")
    if runs.sum() != box_w * box_h:
        raise RLEError(f"RLE runs cover {int(runs.sum())} pixels but the box has {box_w}x{box_h}={box_w * box_h}")
    return runs, (left, top, right, bottom)


def decode_cvat_rle(value: Any, width: int | None = None, height: int | None = None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Decode to (mask over the part's box, box). With width/height, the box is checked against the image."""
    runs, (left, top, right, bottom) = _runs_and_box(value, width, height)
    values = np.zeros(runs.size, dtype=bool)
    values[1::2] = True
    mask = np.repeat(values, runs).reshape(bottom - top + 1, right - left + 1)
    return mask, (left, top, right, bottom)


def rle_box(value: Any, width: int | None = None, height: int | None = None) -> tuple[int, int, int, int] | None:
    """The tight inclusive box of a part's foreground, from its runs alone (no mask is built: a part
    annotated at full resolution has millions of pixels), checked as `decode_cvat_rle` checks; None
    when the part has no foreground pixel."""
    runs, (left, top, right, _) = _runs_and_box(value, width, height)
    box_w = right - left + 1
    ends = np.cumsum(runs)
    starts = ends - runs
    fg = np.arange(runs.size) % 2 == 1
    fg &= runs > 0
    if not fg.any():
        return None
    first, last = starts[fg], ends[fg] - 1  # pixel offsets in the box, row by row
    first_row, last_row = first // box_w, last // box_w
    one_row = first_row == last_row  # a run over a row's end covers both the last and the first column
    x0 = int(np.where(one_row, first % box_w, 0).min())
    x1 = int(np.where(one_row, last % box_w, box_w - 1).max())
    return left + x0, top + int(first_row.min()), left + x1, top + int(last_row.max())


def encode_cvat_rle(mask: np.ndarray) -> list[int]:
    """Encode a full-image boolean mask (H, W) with at least one foreground pixel."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise RLEError("cannot encode an empty mask")
    left, top, right, bottom = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    flat = mask[top:bottom + 1, left:right + 1].ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:  # runs must start with background
        runs = [0, *runs]
    return [int(r) for r in runs] + [left, top, right, bottom]


def mask_box(mask: np.ndarray, origin: Sequence[int] = (0, 0)) -> tuple[int, int, int, int] | None:
    """Tight inclusive box of the foreground pixels, offset by origin (left, top); None when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return (int(xs.min()) + origin[0], int(ys.min()) + origin[1], int(xs.max()) + origin[0], int(ys.max()) + origin[1])
