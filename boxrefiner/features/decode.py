"""Images decoded and resized for the encoder.

`ImageDataset` serves DataLoader workers (the cache-off baseline decodes inside its batches) with
preprocessed float images. `image_batches` is what extraction and inference use: a few threads decode
and resize ahead of the encoder in the same process and hand out uint8 batches, which the caller
normalises where the encoder runs (`encoder.normalise`: on the GPU there, after copying a quarter of
float32's bytes). Threads, not worker processes, because PIL's decoding and
resizing release the GIL, and a forked worker makes the parent pay a copy-on-write fault for every
page of its memory it touches while the workers live: with the encoder's activations churning the
heap, that cost the extraction pipeline a third of the encoder's throughput on 2 cores.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from boxrefiner.data.images import DECODE_ERRORS, load_rgb
from boxrefiner.features.encoder import normalise, resized_pixels

log = logging.getLogger(__name__)


def decode_image(path: Path, input_size: int) -> torch.Tensor:
    """The preprocessed (3, S, S) float image, or an empty tensor when it cannot be decoded (logged)."""
    resized = _resized(path, input_size)
    return torch.empty(0) if resized is None else normalise(resized[0][None], [resized[1]])[0]


class ImageDataset(Dataset):
    """Decoded, SAM-preprocessed images by position (for DataLoader workers)."""

    def __init__(self, paths: Sequence[Path], input_size: int):
        self.paths = paths
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, decode_image(self.paths[index], self.input_size)


@dataclass
class PixelBatch:
    """Resized images of one batch: `pixels` (B, 3, S, S) uint8, zero-padded, each image's size before
    padding, their positions in the list given, and the positions that could not be decoded."""
    positions: list[int]
    pixels: torch.Tensor
    sizes: list[tuple[int, int]]
    bad: list[int]

    def normalised(self, device: torch.device) -> torch.Tensor:
        """The encoder's input on `device`: SAM's normalisation, exactly as `preprocess` does it."""
        return normalise(self.pixels.to(device, non_blocking=True), self.sizes)


def _resized(path: Path, input_size: int) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """The image resized and padded (uint8) and its size, or None when it cannot be decoded (logged)."""
    try:
        return resized_pixels(load_rgb(path), input_size)
    except DECODE_ERRORS:  # truncated or corrupt: the caller reports it by position
        log.warning("cannot decode %s; skipping it", path)
        return None


def image_batches(paths: Sequence[Path], input_size: int, batch_size: int, threads: int, pin: bool = False,
                  ahead: int = 2) -> Iterator[PixelBatch]:
    """The images in order, `batch_size` at a time, decoded by `threads` threads up to `ahead` batches
    before the one handed out (threads 0: in the caller, one image after another). `pin`: batches in
    pinned memory, for a copy to the GPU that overlaps the next batch's decoding."""
    starts = range(0, len(paths), batch_size)
    if threads <= 0:
        for start in starts:
            yield _batch(start, [_resized(p, input_size) for p in paths[start:start + batch_size]], pin)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="boxrefiner-decode")
    queued: deque[tuple[int, list[Future]]] = deque()
    try:
        for start in starts:
            queued.append((start, [pool.submit(_resized, p, input_size) for p in paths[start:start + batch_size]]))
            if len(queued) > ahead:
                first, futures = queued.popleft()
                yield _batch(first, [f.result() for f in futures], pin)
        while queued:
            first, futures = queued.popleft()
            yield _batch(first, [f.result() for f in futures], pin)
    finally:  # also when the consumer stops early: drop what is queued, wait for what is running
        pool.shutdown(wait=True, cancel_futures=True)


def _batch(start: int, decoded: list[tuple[torch.Tensor, tuple[int, int]] | None], pin: bool) -> PixelBatch:
    good = [(start + k, item) for k, item in enumerate(decoded) if item is not None]
    bad = [start + k for k, item in enumerate(decoded) if item is None]
    pixels = torch.stack([item[0] for _, item in good]) if good else torch.empty(0, dtype=torch.uint8)
    if pin and good:
        pixels = pixels.pin_memory()
    return PixelBatch([p for p, _ in good], pixels, [item[1] for _, item in good], bad)
