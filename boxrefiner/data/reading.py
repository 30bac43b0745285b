"""What start-up reads of each image and its annotation, remembered and read in parallel.

Per image: whether the file is there, its size after EXIF orientation and (for the feature cache)
the sha256 of its bytes; per annotation source (a label file, the masks parquet): the objects it
gives the image. Each is remembered in a `FileMemo` by the file's (path, size, mtime_ns), so a warm
start stats the files and reads none of them; what must be read is read by a pool of threads (file
reads, hashing and image decoding release the GIL; network file systems reward many requests in
flight).
"""

from __future__ import annotations

import logging
import os
import stat as stat_module
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boxrefiner.data.images import DECODE_ERRORS, oriented_size
from boxrefiner.data.layout import RawImage, RawObject, SkipImage
from boxrefiner.utils.files import sha256_file
from boxrefiner.utils.memo import FileMemo
from boxrefiner.utils.progress import progress

log = logging.getLogger(__name__)

Annotated = tuple[tuple[float, float] | None, list[RawObject]]
# Memo kinds, with the version of what they hold: a reader that derives them differently bumps it.
IMAGE, OBJECTS = "image/1", "objects/1"
TRANSIENT = "transient"  # the file could not be read now (not remembered)
_THREADS = min(16, 4 * (os.cpu_count() or 1))


@dataclass
class ImageFacts:
    """What load_split needs of one listed image."""
    present: bool = False
    annotated: Annotated | SkipImage | None = None  # None when the image is missing
    size: tuple[int, int] | None = None  # None: the header does not decode
    digest: str | None = None


def _encode(found: Annotated | SkipImage) -> dict:
    if isinstance(found, SkipImage):
        return {"skip": [found.reason, found.detail]}
    frame, objects = found
    return {"frame": None if frame is None else list(frame),
            "objects": [[list(o.box), o.category_id, o.mask, o.ref, None if o.problem is None else list(o.problem)]
                        for o in objects]}


def _decode(value: Any) -> Annotated | SkipImage | None:
    """A memo value back as what the reader returned; None when it has another form (a miss)."""
    try:
        if "skip" in value:
            return SkipImage(*value["skip"])
        frame = None if value["frame"] is None else (float(value["frame"][0]), float(value["frame"][1]))
        objects = [RawObject(tuple(box), category, mask, ref, None if problem is None else (problem[0], problem[1]))
                   for box, category, mask, ref, problem in value["objects"]]
        return frame, objects
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _stat(path: Path) -> os.stat_result | None:
    try:
        found = path.stat()
    except OSError:
        return None
    return found if stat_module.S_ISREG(found.st_mode) else None


class _Sources:
    """The stat of each annotation source file, taken once per start."""

    def __init__(self) -> None:
        self.stats: dict[Path, os.stat_result | None] = {}

    def __call__(self, path: Path) -> os.stat_result | None:
        if path not in self.stats:
            self.stats[path] = _stat(path)
        return self.stats[path]


def read_images(images: Sequence[RawImage], memo: FileMemo, digests: bool, desc: str = "Indexing") -> list[ImageFacts]:
    """Facts of every image, in order: remembered ones from the memo, the others read in parallel."""
    sources = _Sources()
    facts = [ImageFacts() for _ in images]
    todo: list[tuple[int, os.stat_result, bool, bool]] = []  # (index, image stat, annotation needed, image needed)
    for i, raw in enumerate(images):
        found = _stat(raw.path)
        if found is None:
            continue
        fact = facts[i]
        fact.present = True
        if raw.memo is not None and (source := sources(raw.memo[0])) is not None:
            remembered = memo.get(OBJECTS, raw.memo[0], source, raw.memo[1])
            fact.annotated = None if remembered is None else _decode(remembered)
        value = memo.get(IMAGE, raw.path, found)
        known = isinstance(value, dict) and isinstance(value.get("w"), int) and isinstance(value.get("h"), int)
        if known:
            fact.size = (value["w"], value["h"])
            fact.digest = value["d"] if isinstance(value.get("d"), str) else None
        need_image = not (value == "unreadable" or (known and (fact.digest is not None or not digests)))
        if fact.annotated is None or need_image:
            todo.append((i, found, fact.annotated is None, need_image))
    if todo:
        _read(images, facts, todo, memo, sources, digests, desc)
    memo.flush()
    return facts


def _read(images: Sequence[RawImage], facts: list[ImageFacts], todo: list[tuple[int, os.stat_result, bool, bool]],
          memo: FileMemo, sources: _Sources, digests: bool, desc: str) -> None:
    """Read what the memo did not know, in threads; record it (from this thread: the memo is not shared)."""
    def work(item: tuple[int, os.stat_result, bool, bool]) -> tuple[int, os.stat_result, int, Annotated | SkipImage | None, Any]:
        index, stat, annotation, image = item
        raw, started = images[index], time.time_ns()
        found: Annotated | SkipImage | None = None
        if annotation:
            try:
                found = raw.annotated()
            except SkipImage as skip:
                found = skip
        value: Any = None
        if image:
            try:
                width, height = oriented_size(raw.path)
                value = {"w": width, "h": height, **({"d": sha256_file(raw.path)} if digests else {})}
            except DECODE_ERRORS as exc:
                # the file's content does not decode: remembered; the system refused to read it (access,
                # I/O, a stale mount): unreadable now, read again next time, when it may be fixed
                value = TRANSIENT if isinstance(exc, OSError) and exc.errno is not None else "unreadable"
        return index, stat, started, found, value

    log.info("%s: reading %d of %d images and their annotations (%d threads); the others are remembered", desc,
             len(todo), len(images), _THREADS)
    pool = ThreadPoolExecutor(_THREADS)
    try:
        with progress(total=len(todo), desc=desc, unit="img", leave=False) as bar:
            for index, stat, started, found, value in pool.map(work, todo):
                _record(images[index], facts[index], stat, started, found, value, memo, sources)
                bar.update()
    except BaseException:  # an error or a second Ctrl-C: do not wait for the reads still queued
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _record(raw: RawImage, fact: ImageFacts, stat: os.stat_result, started: int, found: Annotated | SkipImage | None,
            value: Any, memo: FileMemo, sources: _Sources) -> None:
    """Take what a thread read into the image's facts, and remember what can be remembered."""
    if found is not None:
        fact.annotated = found
        source = sources(raw.memo[0]) if raw.memo is not None else None
        if raw.memo is not None and source is not None:
            memo.put(OBJECTS, raw.memo[0], source, _encode(found), raw.memo[1], read_at=started)
    if isinstance(value, dict):
        fact.size, fact.digest = (value["w"], value["h"]), value.get("d")
    if value is not None and value != TRANSIENT:
        memo.put(IMAGE, raw.path, stat, value, read_at=started)
