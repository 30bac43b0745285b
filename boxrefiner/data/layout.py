"""What a layout reader (`fungitastic`, `coco`, `yolo`) hands to `splits.load_split`: images with
a way to read their objects, what it already left out, and the category names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boxrefiner.errors import UserError

NORMALISED = (1.0, 1.0)  # the annotated frame of coordinates given as fractions of the image (YOLO)


class DataError(UserError):
    """The dataset cannot be used as configured; the message is one line naming the path."""


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
    costly reader (FungiTastic's mask decoding) decodes nothing it does not use.

    `memo` (the annotation file the objects come from, and the name they have in it) lets a warm
    start take them from the start-up memo while that file is unchanged; None: always read."""
    file_name: str
    path: Path
    annotated: Callable[[], tuple[tuple[float, float] | None, list[RawObject]]]
    memo: tuple[Path, str] | None = None


@dataclass
class Layout:
    """What a layout reader hands to `load_split`: images in any order, what it already left out
    (e.g. an annotation pointing at an unknown image), the category names, and the masks parquet."""
    images: list[RawImage]
    categories: dict[int, str]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (file_name, reason, detail)
    masks_file: Path | None = None
