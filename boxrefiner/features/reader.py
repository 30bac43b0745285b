"""Streaming cache entries into reused batch buffers, a few batches ahead of training.

An epoch that streams from disk must run at the head's speed: each entry is read straight into its
row of a batch buffer (`readinto` after checking the `.npy` header bytes: no parsing, no temporary
array, no stacking, no copy between processes), by a pool of threads (file reads release the GIL,
and the next batches are read while the head computes on this one). A ring of buffers is reused
from batch to batch (pinned memory when training on CUDA, so the copy to the GPU is asynchronous);
a float16 cache is converted to float32 rows in the same threads, so training reads float32 maps
whatever the storage dtype. An entry whose header differs, that is short, or holds NaN/inf takes
the cache's own checked path (`FeatureCache.load`), which deletes a bad entry; the caller then
extracts it again.
"""

from __future__ import annotations

import io
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from boxrefiner.features.cache import FeatureCache


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The exact bytes `np.save` writes before the data of a C-ordered array of this shape and dtype."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


class EntryReader:
    """Reads one cache's entries into given float32 (or storage dtype) rows."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache
        self.storage = cache.storage
        self.header = npy_header(self.storage.disk_shape, self.storage.disk_dtype)
        self.nbytes = self.storage.disk_bytes

    def scratch_for(self, dtype: np.dtype | torch.dtype) -> np.ndarray | None:
        """The buffer read_into needs for rows of `dtype` (None: it reads straight into them)."""
        if isinstance(dtype, torch.dtype):
            dtype = torch.empty(0, dtype=dtype).numpy().dtype
        if dtype == self.storage.disk_dtype and not self.storage.quantised:
            return None
        return np.empty(self.storage.disk_shape, self.storage.disk_dtype)

    def read_into(self, key: str, row: torch.Tensor, scratch: np.ndarray | None, count: bool = False) -> bool:
        """Fill `row` with the entry's values; False when it is missing or bad (the cache healed what was
        bad, counted in its stats with `count`: from one thread only). `scratch` (see scratch_for) is
        needed when `row` has another dtype than the stored one, or the entry is int8."""
        target = row.numpy() if scratch is None else scratch
        path = self.cache.find(key)
        if path is None:
            return False
        try:
            with open(path, "rb", buffering=0) as f:
                ok = f.read(len(self.header)) == self.header and f.readinto(target.data.cast("B")) == self.nbytes
        except OSError:
            ok = False
        if ok and scratch is not None:
            row.copy_(torch.from_numpy(self.storage.decode(scratch)))
        # NaN/inf anywhere make the sum NaN/inf (a finite map cannot overflow float32's sum): one pass,
        # no temporary mask; a map that fails this takes the checked path, which looks cell by cell
        if ok and math.isfinite(float(row.sum(dtype=torch.float32))):
            if count:
                self.cache.stats.bytes_read += self.nbytes
            return True
        stored = self.cache.load(key, count=count)  # the checked path: says why, deletes what is bad
        if stored is None:
            return False
        row.copy_(torch.from_numpy(stored))
        return True


@dataclass
class ReadBatch:
    """One batch of objects with its images' maps in a ring buffer (valid until the ring comes round)."""
    objects: torch.Tensor
    images: torch.Tensor  # (U,) image indices
    inverse: torch.Tensor  # (B,) row of `features` of each object
    features: torch.Tensor  # (U, C, H, W) view into the ring buffer
    bad: torch.Tensor  # (U,) rows that could not be read (zeros)
    done: torch.cuda.Event | None = None  # set by the consumer once the rows were copied to the GPU


class BatchStream:
    """Batches of entries read `ahead` batches in advance by `threads` threads into a ring of
    `ahead + 2` reused buffers, so a buffer is refilled only after its batch was used."""

    def __init__(self, cache: FeatureCache, keys: Sequence[str], threads: int, batch_images: int,
                 dtype: torch.dtype = torch.float32, pin: bool = False, ahead: int = 2):
        self.reader = EntryReader(cache)
        self.keys = keys
        self.threads = max(1, threads)
        self.ahead = max(1, ahead)
        self.dtype = dtype
        self.convert = self.reader.scratch_for(dtype) is not None
        self.shape = cache.shape
        self.buffers = [torch.empty((batch_images, *cache.shape), dtype=dtype, pin_memory=pin)
                        for _ in range(self.ahead + 2)]
        self.scratch = [self.reader.scratch_for(dtype) for _ in range(self.threads)] if self.convert else []

    def _fill(self, slot: int, images: torch.Tensor, previous: ReadBatch | None, readers: ThreadPoolExecutor) -> torch.Tensor:
        """Read a batch's entries into ring buffer `slot`; returns which rows could not be read."""
        if previous is not None and previous.done is not None:
            previous.done.synchronize()  # the GPU has its copy of what this buffer held
        rows = self.buffers[slot][:len(images)]
        order = images.tolist()

        def work(t: int) -> list[int]:
            scratch = self.scratch[t] if self.convert else None
            return [i for i in range(t, len(order), self.threads)
                    if not self.reader.read_into(self.keys[order[i]], rows[i], scratch)]

        bad = torch.zeros(len(order), dtype=torch.bool)
        for failed in readers.map(work, range(self.threads)):
            for i in failed:
                rows[i].zero_()
                bad[i] = True
        return bad

    def batches(self, plan: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Iterator[ReadBatch]:
        """ReadBatch for each (objects, images, inverse) of `plan`, in order: one filler thread works
        through the batches ahead, its readers share each batch's entries."""
        ring: list[ReadBatch | None] = [None] * len(self.buffers)
        pending: deque[tuple[int, tuple, Future]] = deque()
        items = iter(plan)
        with ThreadPoolExecutor(1) as filler, ThreadPoolExecutor(self.threads) as readers:
            def submit(slot: int) -> None:
                item = next(items, None)
                if item is None:
                    return
                if len(item[1]) > self.buffers[0].shape[0]:
                    raise ValueError(f"a batch holds {len(item[1])} images, more than the buffers' "
                                     f"{self.buffers[0].shape[0]}")
                pending.append((slot, item, filler.submit(self._fill, slot, item[1], ring[slot], readers)))

            for k in range(self.ahead):
                submit(k)
            served = 0
            while pending:
                here, (objects, images, inverse), future = pending.popleft()
                batch = ReadBatch(objects, images, inverse, self.buffers[here][:len(images)], future.result())
                ring[here] = batch
                submit((served + self.ahead) % len(self.buffers))
                served += 1
                yield batch
