"""Boxes and masks drawn on images with Pillow: the same three colours everywhere (truth, input,
refined), labels that stay readable at any image size, and tiles laid out in a grid. No display
is needed: everything is drawn in memory and saved atomically."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from boxrefiner.utils.files import atomic_write

# Three colours bright on natural images; the input box is also dashed, so that it shows on top of a
# refined box that kept it, and a colour-blind reader tells it from the truth
TRUTH = (0, 220, 110)
INPUT = (255, 150, 0)
REFINED = (40, 160, 255)
PROBLEM = (160, 160, 160)  # a box that was not refined
MASK_COLOURS = ((86, 180, 233), (240, 228, 66), (204, 121, 167), (213, 94, 0), (0, 158, 115), (0, 114, 178))


@functools.lru_cache(maxsize=8)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own font at `size` pixels (no system font needed)."""
    return ImageFont.load_default(size=max(8, size))


@dataclass
class Box:
    """A box to draw: xyxy pixels of the picture, its colour, and an optional label above it."""
    xyxy: Sequence[float] | np.ndarray
    colour: tuple[int, int, int]
    label: str = ""
    width: int = 2
    dashed: bool = False


def scale_to(image: Image.Image, longest: int) -> tuple[Image.Image, float]:
    """The image resized so that its longest side is `longest` pixels, and the factor applied."""
    factor = longest / max(image.size)
    if factor == 1:
        return image.copy(), 1.0
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.Resampling.BILINEAR), factor


def draw_boxes(image: Image.Image, boxes: Sequence[Box], text_size: int | None = None) -> Image.Image:
    """`image` with the boxes drawn in order (later ones on top), each label on a dark strip so it
    reads on any background."""
    draw = ImageDraw.Draw(image)
    size = text_size or max(10, round(max(image.size) / 40))
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box.xyxy)
        if not all(np.isfinite([x0, y0, x1, y1])):
            continue
        if box.dashed:
            dashed_rectangle(draw, (x0, y0, x1, y1), box.colour, box.width)
        else:
            draw.rectangle((x0, y0, x1, y1), outline=box.colour, width=box.width)
        if box.label:
            label(draw, (x0, y0), box.label, box.colour, size, image.size)
    return image


def dashed_rectangle(draw: ImageDraw.ImageDraw, xyxy: tuple[float, float, float, float], colour: tuple[int, int, int],
                     width: int, dash: int = 8) -> None:
    """A rectangle outline in dashes of `dash` pixels (Pillow draws solid outlines only)."""
    x0, y0, x1, y1 = xyxy
    for a, b, horizontal, at in ((x0, x1, True, y0), (x0, x1, True, y1), (y0, y1, False, x0), (y0, y1, False, x1)):
        start = a
        while start < b:
            end = min(start + dash, b)
            draw.line((start, at, end, at) if horizontal else (at, start, at, end), fill=colour, width=width)
            start += 2 * dash


def label(draw: ImageDraw.ImageDraw, at: tuple[float, float], text: str, colour: tuple[int, int, int], size: int,
          bounds: tuple[int, int]) -> None:
    """`text` in `colour` on a dark strip, just above `at` (below it at the top edge), kept inside the picture."""
    face = font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    w, h = right - left + 4, bottom - top + 4
    x = min(max(0.0, at[0]), max(0.0, bounds[0] - w))
    y = at[1] - h if at[1] - h >= 0 else min(at[1], bounds[1] - h)
    draw.rectangle((x, y, x + w, y + h), fill=(20, 20, 20))
    draw.text((x + 2 - left, y + 2 - top), text, fill=colour, font=face)


def overlay_masks(image: Image.Image, masks: Sequence[np.ndarray], alpha: float = 0.45) -> Image.Image:
    """`image` with each boolean mask (the image's size) tinted in its own colour."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    for k, mask in enumerate(masks):
        if mask.shape != pixels.shape[:2]:
            raise ValueError(f"mask {k} is {mask.shape[1]}x{mask.shape[0]}, the image {image.width}x{image.height}")
        colour = np.array(MASK_COLOURS[k % len(MASK_COLOURS)], dtype=np.float32)
        pixels[mask] = (1 - alpha) * pixels[mask] + alpha * colour
    return Image.fromarray(pixels.round().astype(np.uint8))


def legend(width: int, entries: Sequence[tuple[str, tuple[int, int, int]]], title: str = "",
           size: int = 16) -> Image.Image:
    """A dark strip naming what each colour is (and a title on the right)."""
    strip = Image.new("RGB", (width, size + 12), (20, 20, 20))
    draw = ImageDraw.Draw(strip)
    x = 8
    for text, colour in entries:
        draw.rectangle((x, 6, x + size, 6 + size), outline=colour, width=3)
        x += size + 6
        draw.text((x, 4), text, fill=colour, font=font(size))
        x += round(draw.textlength(text, font=font(size))) + 18
    if title:
        right = width - 8 - round(draw.textlength(title, font=font(size)))
        draw.text((max(x, right), 4), title, fill=(230, 230, 230), font=font(size))
    return strip


def grid(tiles: Sequence[Image.Image], columns: int, cell: int, header: Image.Image | None = None) -> Image.Image:
    """Tiles (each at most `cell` pixels on its longest side) centred in a grid of square cells, under
    an optional header strip."""
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    top = header.height if header is not None else 0
    canvas = Image.new("RGB", (columns * cell, top + rows * cell), (40, 40, 40))
    if header is not None:
        canvas.paste(header, (0, 0))
    for k, tile in enumerate(tiles):
        x, y = (k % columns) * cell, top + (k // columns) * cell
        canvas.paste(tile, (x + (cell - tile.width) // 2, y + (cell - tile.height) // 2))
    return canvas


def save_picture(image: Image.Image, path: str | Path) -> None:
    """JPEG or PNG by the file's suffix, written atomically (a viewer never sees half a file)."""
    kind = "PNG" if Path(path).suffix.lower() == ".png" else "JPEG"
    options = {"quality": 90, "subsampling": 0} if kind == "JPEG" else {}  # full colour: thin lines keep theirs
    atomic_write(path, lambda f: image.convert("RGB").save(f, format=kind, **options))
