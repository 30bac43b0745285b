"""Images decoded and SAM-preprocessed for the encoder.

`ImageDataset` serves DataLoader workers (the cache-off baseline decodes inside its batches).
`image_batches` is what extraction and inference use: a few threads decode ahead of the encoder in
the same process. Threads, not worker processes, because PIL's decoding and resizing and torch's
normalisation release the GIL, and a forked worker makes the parent pay a copy-on-write fault for
every page of its memory it touches while the workers live: with the encoder's activations churning
the heap, that cost the extraction pipeline a third of the encoder's throughput on 2 cores.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Dataset

from boxrefiner.data.images import DECODE_ERRORS, load_rgb
from boxrefiner.features.encoder import preprocess

log = logging.getLogger(__name__)

ImageBatch = tuple[torch.Tensor, torch.Tensor, list[int]]  # positions decoded, their images, positions that failed


def decode_image(path: Path, input_size: int) -> torch.Tensor:
    """The preprocessed (3, S, S) image, or an empty tensor when it cannot be decoded (logged)."""
    try:
        return preprocess(load_rgb(path), input_size)
    except DECODE_ERRORS:  # truncated or corrupt: an empty tensor, dropped by the caller
        log.warning("cannot decode %s; skipping it", path)
        return torch.empty(0)


class ImageDataset(Dataset):
    """Decoded, SAM-preprocessed images by position (for DataLoader workers)."""

    def __init__(self, paths: Sequence[Path], input_size: int):
        self.paths = paths
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, decode_image(self.paths[index], self.input_size)


def collate_images(batch: Sequence[tuple[int, torch.Tensor]]) -> ImageBatch:
    good = [(i, t) for i, t in batch if t.numel()]
    bad = [i for i, t in batch if not t.numel()]
    images = torch.stack([t for _, t in good]) if good else torch.empty(0)
    return torch.tensor([i for i, _ in good], dtype=torch.long), images, bad


def image_batches(paths: Sequence[Path], input_size: int, batch_size: int, threads: int, pin: bool = False,
                  ahead: int = 2) -> Iterator[ImageBatch]:
    """The images in order, `batch_size` at a time, decoded by `threads` threads up to `ahead` batches
    before the one handed out (threads 0: in the caller, one image after another). `pin`: batches in
    pinned memory, for a copy to the GPU that overlaps the next batch's decoding."""
    starts = range(0, len(paths), batch_size)
    if threads <= 0:
        for start in starts:
            yield _collated(start, [decode_image(p, input_size) for p in paths[start:start + batch_size]], pin)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="boxrefiner-decode")
    queued: deque[tuple[int, list[Future]]] = deque()
    try:
        for start in starts:
            queued.append((start, [pool.submit(decode_image, p, input_size) for p in paths[start:start + batch_size]]))
            if len(queued) > ahead:
                first, futures = queued.popleft()
                yield _collated(first, [f.result() for f in futures], pin)
        while queued:
            first, futures = queued.popleft()
            yield _collated(first, [f.result() for f in futures], pin)
    finally:  # also when the consumer stops early: drop what is queued, wait for what is running
        pool.shutdown(wait=True, cancel_futures=True)


def _collated(start: int, images: list[torch.Tensor], pin: bool) -> ImageBatch:
    positions, stacked, bad = collate_images(list(enumerate(images, start)))
    return positions, stacked.pin_memory() if pin and stacked.numel() else stacked, bad
