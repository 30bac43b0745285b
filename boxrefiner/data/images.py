"""Decoding images as HQ-SAM sees them: EXIF orientation applied, wide integer and float images
scaled to 8 bits, RGB; and their size from the header alone."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
# What decoding a broken, truncated or absurdly large image raises (PIL's bomb check is a plain Exception).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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
