"""Where embeddings come from during training: the cache (in memory or streamed) or the encoder.

With the cache on, `warm_up` extracts every missing entry once, in batches, before training. Epochs
then read only cached values: from one in-memory tensor when the split fits the RAM (or GPU) budget,
else streamed from the `.npy` files by DataLoader workers. With the cache off, the encoder runs on
every batch: the original behaviour, kept as the baseline that the speed-ups are measured against.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .cache import FeatureCache, file_digest
from .config import Config
from .data import DECODE_ERRORS, DataError, Sample, SplitData, drop_unreadable, load_rgb, readable
from .encoder import EncoderIdentity, ImageEncoder, build_encoder, encoder_identity, preprocess
from .progress import progress

log = logging.getLogger(__name__)
_RECORD_EVERY = 256  # extracted entries between manifest updates


class ImageDataset(Dataset):
    """Decoded, SAM-preprocessed images (decoding and resizing run in DataLoader workers)."""

    def __init__(self, paths: Sequence[Path], input_size: int):
        self.paths = paths
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        try:
            return index, preprocess(load_rgb(self.paths[index]), self.input_size)
        except DECODE_ERRORS:  # truncated or corrupt: an empty tensor, dropped by the caller
            log.warning("cannot decode %s; skipping it", self.paths[index])
            return index, torch.empty(0)


def collate_images(batch: list[tuple[int, torch.Tensor]]):
    good = [(i, t) for i, t in batch if t.numel()]
    bad = [i for i, t in batch if not t.numel()]
    images = torch.stack([t for _, t in good]) if good else torch.empty(0)
    return torch.tensor([i for i, _ in good], dtype=torch.long), images, bad


class CachedFeatureDataset(Dataset):
    """Stored embeddings in their storage dtype; an unreadable entry comes back empty (healed by the loader)."""

    def __init__(self, cache: FeatureCache, keys: Sequence[str]):
        self.cache = cache
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        stored = self.cache.load(self.keys[index], count=False)
        return index, torch.empty(0) if stored is None else torch.from_numpy(stored)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype)).dtype


def _collate_entries(batch: list[tuple[int, torch.Tensor]], shape: tuple, dtype: torch.dtype):
    indices = torch.tensor([i for i, _ in batch])
    bad = torch.tensor([t.numel() == 0 for _, t in batch])
    features = torch.stack([torch.zeros(shape, dtype=dtype) if t.numel() == 0 else t for _, t in batch])
    return indices, features, bad


class EpochShuffle(Sampler):
    """A permutation that depends only on (seed, epoch): the same order with any number of workers."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Also skip the first `skip` samples of this epoch's order (continuing an interrupted epoch)."""
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[self.skip:].tolist())

    def __len__(self) -> int:
        return self.size - self.skip


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device,
                sampler: Sampler | None = None, collate_fn=None, persistent: bool = True) -> DataLoader:
    # A private generator: creating an iterator must not draw from the global RNG, or a run that had
    # to extract features would initialise and train differently from one that found them cached.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=persistent and num_workers > 0,
                      collate_fn=collate_fn, generator=torch.Generator().manual_seed(0))


def extract(cache: FeatureCache, samples: Sequence[Sample], keys: Sequence[str], indices: Sequence[int],
            encoder: ImageEncoder, batch_size: int, num_workers: int, bar_desc: str | None = None,
            unreadable: set[int] | None = None, keep: bool = False) -> dict[int, np.ndarray]:
    """Encode the given samples and store them; with `keep`, returns the stored arrays (healing).
    Samples whose image does not decode are added to `unreadable`."""
    subset = [samples[i] for i in indices]
    loader = make_loader(ImageDataset([s.image_path for s in subset], cache.identity.input_size), batch_size, num_workers, encoder.device,
                         collate_fn=collate_images, persistent=False)
    stored, pending = {}, {}
    with progress(total=len(subset), desc=bar_desc, unit="img", disable=bar_desc is None) as bar:
        for positions, images, bad in loader:
            if unreadable is not None:
                unreadable.update(indices[p] for p in bad)
            bar.update(len(bad))
            if not len(positions):
                continue
            features = encoder.encode(images).cpu().numpy()
            for position, feature in zip(positions.tolist(), features):
                index = indices[position]
                value = cache.save(keys[index], feature)
                pending[keys[index]] = _entry_record(samples[index])
                if keep:
                    stored[index] = value
            if len(pending) >= _RECORD_EVERY:
                cache.record(pending)
                pending = {}
            bar.update(len(positions))
    if pending:
        cache.record(pending)
    return stored


def _entry_record(sample: Sample) -> dict:
    return {"file": sample.file_name, "width": sample.width, "height": sample.height}


def warm_up(cache: FeatureCache, samples: Sequence[Sample], keys: Sequence[str],
            get_encoder: Callable[[], ImageEncoder], batch_size: int, num_workers: int,
            unreadable: set[int] | None = None) -> tuple[int, int]:
    """Extract every entry that is missing or bad; returns (hits, extracted). Samples whose image
    does not decode are added to `unreadable`."""
    missing = [i for i, key in enumerate(keys) if not cache.is_valid(key)]
    hits = len(keys) - len(missing)
    log.info("feature cache %s: %d of %d entries present (%.0f%%), %d to extract%s", cache.dir, hits, len(keys),
             100.0 * hits / max(1, len(keys)), len(missing),
             f" ({len(missing) * cache.entry_bytes / 2**20:.0f} MiB)" if missing else "")
    cache.ensure_room(len(missing))
    if missing:
        extract(cache, samples, keys, missing, get_encoder(), batch_size, num_workers,
                bar_desc=f"Extracting {cache.dir.name}", unreadable=unreadable)
    missing_set = set(missing)
    cache.record({keys[i]: _entry_record(samples[i]) for i in range(len(keys)) if i not in missing_set})
    return hits, len(missing)


def available_memory() -> int:
    """Bytes of RAM the kernel says are available without swapping."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class FeatureBatches:
    """Common interface: iterate (sample indices, embeddings on the device); count what came from the cache."""

    from_cache = True

    def __init__(self, batch_size: int, size: int, sampler: Sampler | None):
        self.batch_size = batch_size
        self.size = size
        self.sampler = sampler
        self.cache_reads = 0  # entries served from the cache, cumulative
        self.healed = 0  # entries found bad while reading and extracted again, cumulative

    def __len__(self) -> int:
        return (self.size + self.batch_size - 1) // self.batch_size


class InMemoryFeatures(FeatureBatches):
    """The whole split in one tensor (float32 when it fits, else the storage dtype), indexed per batch."""

    def __init__(self, store: torch.Tensor, batch_size: int, device: torch.device, sampler: Sampler | None = None):
        super().__init__(batch_size, store.shape[0], sampler)
        self.store = store
        self.device = device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler) if self.sampler is not None else range(self.size))
        for indices in order.split(self.batch_size):
            batch = self.store.index_select(0, indices.to(self.store.device))
            self.cache_reads += len(indices)
            yield indices, batch.to(self.device, non_blocking=True)


class StreamedFeatures(FeatureBatches):
    """Entries read from disk by DataLoader workers; an entry that turns out bad is re-extracted here."""

    def __init__(self, cache: FeatureCache, keys: Sequence[str], heal: Callable[[list[int]], dict[int, np.ndarray]],
                 batch_size: int, num_workers: int, device: torch.device, sampler: Sampler | None = None):
        super().__init__(batch_size, len(keys), sampler)
        collate = functools.partial(_collate_entries, shape=cache.shape, dtype=_torch_dtype(cache.dtype))
        self.loader = make_loader(CachedFeatureDataset(cache, keys), batch_size, num_workers, device, sampler, collate)
        self.heal = heal
        self.device = device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices, features, bad in self.loader:
            if bad.any():
                positions = bad.nonzero().flatten().tolist()
                fresh = self.heal([int(indices[p]) for p in positions])
                for p in positions:
                    features[p] = torch.from_numpy(fresh[int(indices[p])])
                self.healed += len(positions)
            self.cache_reads += len(indices) - int(bad.sum())
            yield indices, features.to(self.device, non_blocking=True)


class EncodedFeatures(FeatureBatches):
    """The encoder on every batch (cache off)."""

    from_cache = False

    def __init__(self, samples: Sequence[Sample], encoder: ImageEncoder, precision: str | None, batch_size: int,
                 num_workers: int, sampler: Sampler | None = None):
        super().__init__(batch_size, len(samples), sampler)
        self.loader = make_loader(ImageDataset([s.image_path for s in samples], encoder.identity.input_size), batch_size, num_workers,
                                  encoder.device, sampler, collate_fn=collate_images)
        self.encoder = encoder
        self.precision = precision

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices, images, bad in self.loader:
            if bad:  # images were checked before training; one that broke since cannot stop a long run
                log.warning("skipping %d image(s) that no longer decode", len(bad))
            if len(indices):
                yield indices, self.encoder.encode(images, self.precision)


class FeatureSources:
    """Train/val feature batches plus the encoder, which is built only if something needs it."""

    def __init__(self, cfg: Config, device: torch.device, train: SplitData, val: SplitData, amp: str):
        self.cfg = cfg
        self.device = device
        cache_cfg = cfg.optimization.feature_cache
        self.identity: EncoderIdentity = encoder_identity(cfg.hqsam, memo_dir=cache_cfg.cache_dir)
        self._encoder: ImageEncoder | None = None
        self.caches: dict[str, FeatureCache] = {}
        self.found = 0  # entries valid in the cache when the run started
        self.extracted = 0  # entries extracted: missing at the start, or broken later
        batch_sizes = (cfg.training.batch_size, cfg.evaluation.batch_size or cfg.training.batch_size)
        if cfg.cache_enabled:
            self._budget = self._memory_budget()
            self.train, self.val = (self._cached(split, b, shuffle) for split, b, shuffle in
                                    zip((train, val), batch_sizes, (True, False)))
            log.info("feature cache on: epochs read cached features only%s",
                     "" if self._encoder else "; the HQ-SAM encoder was never built (every feature was cached)")
        else:
            for split in (train, val):  # decode every image once, so that a corrupt one cannot stop an epoch
                drop_unreadable(split, {i for i, s in enumerate(split.samples) if not readable(s.image_path)})
            precision = amp if amp != "fp32" else None
            self.train_sampler = EpochShuffle(len(train.samples), cfg.training.seed)
            self.train, self.val = (EncodedFeatures(split.samples, self.encoder, precision, b, cfg.data.num_workers, s)
                                    for split, b, s in zip((train, val), batch_sizes, (self.train_sampler, None)))
            log.info("feature cache off: the encoder runs on every batch of every epoch (baseline mode)%s",
                     f", under {amp} autocast" if precision else "")

    def get_cache_stats(self) -> dict:
        """hits: entries found valid in the cache at the start; misses: entries that had to be extracted
        (missing, or broken later); healed: broken entries deleted and extracted again; bytes_read: bytes
        of entries read from disk."""
        streamed = [b for b in (self.train, self.val) if isinstance(b, StreamedFeatures)]
        entry = max((int(np.prod(c.shape)) * c.dtype.itemsize for c in self.caches.values()), default=0)
        healed = sum(b.healed for b in streamed) + sum(c.stats.healed for c in self.caches.values())
        total = self.found + self.extracted
        return {"hits": self.found, "misses": self.extracted, "hit_rate": self.found / total if total else 0.0,
                "healed": healed,
                "bytes_read": sum(c.stats.bytes_read for c in self.caches.values()) + entry * sum(
                    b.cache_reads for b in streamed)}

    @property
    def encoder(self) -> ImageEncoder:
        if self._encoder is None:
            self._encoder = build_encoder(self.cfg.hqsam, self.device, self.identity)
        return self._encoder

    def _memory_budget(self) -> tuple[str, int]:
        """Where an in-memory split lives (the training device) and how many bytes it may take there."""
        setting = self.cfg.optimization.feature_cache
        if setting.in_memory is False:
            return "none", 0
        if setting.memory_budget_gb:
            return self.device.type, int(setting.memory_budget_gb * 2**30)
        if self.device.type == "cuda":
            return "cuda", int(torch.cuda.mem_get_info(self.device)[0] * 0.5)
        return "cpu", available_memory() // 2

    def _cached(self, split: SplitData, batch_size: int, shuffle: bool) -> FeatureBatches:
        cache_cfg = self.cfg.optimization.feature_cache
        cache = FeatureCache(cache_cfg.cache_dir, split.split, self.identity, cache_cfg.storage_dtype)
        self.caches[split.split] = cache
        keys = [cache.key_for(file_digest(s.image_path)) for s in split.samples]
        if cache_cfg.auto_detect:
            mine, other, unknown = cache.census()
            log.info("auto-detect %s: %d entries for %s, %d for other encoders%s", cache.dir, mine,
                     self.identity.short(), other, f", {unknown} not in its manifest" if unknown else "")
        unreadable: set[int] = set()
        found, extracted = warm_up(cache, split.samples, keys, lambda: self.encoder, self.cfg.hqsam.batch_size,
                                   self.cfg.data.num_workers, unreadable)
        self.found += found
        self.extracted += extracted - len(unreadable)
        if unreadable:
            drop_unreadable(split, unreadable)
            keys = [k for i, k in enumerate(keys) if i not in unreadable]
        sampler = None
        if shuffle:
            sampler = self.train_sampler = EpochShuffle(len(split.samples), self.cfg.training.seed)

        def heal(indices: list[int]) -> dict[int, np.ndarray]:
            lost: set[int] = set()
            self.extracted += len(indices)
            fresh = extract(cache, split.samples, keys, indices, self.encoder, self.cfg.hqsam.batch_size, 0,
                            unreadable=lost, keep=True)
            if lost:  # its entry broke and its image no longer decodes: nothing left to train on honestly
                raise DataError(f"{split.samples[min(lost)].image_path}: cached features broke and the image no "
                                "longer decodes; restore the file or remove it from the split's CSV")
            return fresh

        store = self._load_store(cache, keys, heal)
        if store is None:
            return StreamedFeatures(cache, keys, heal, batch_size, self.cfg.data.num_workers, self.device, sampler)
        return InMemoryFeatures(store, batch_size, self.device, sampler)

    def _load_store(self, cache: FeatureCache, keys: Sequence[str], heal) -> torch.Tensor | None:
        """Read every entry into one tensor, when the budget allows; None means stream from disk."""
        place, budget = self._budget
        setting = self.cfg.optimization.feature_cache.in_memory
        per_entry = int(np.prod(cache.shape))
        dtype = None
        for candidate in (np.dtype(np.float32), cache.dtype):
            if len(keys) * per_entry * candidate.itemsize <= budget or (setting is True and candidate == cache.dtype):
                dtype = candidate
                break
        if place == "none" or dtype is None:
            log.info("%s: %d entries (%.0f MiB) stream from disk (in_memory=%s, budget %.0f MiB)", cache.dir, len(keys),
                     len(keys) * cache.entry_bytes / 2**20, setting, budget / 2**20)
            return None
        size = len(keys) * per_entry * dtype.itemsize
        self._budget = (place, budget - size)
        store = torch.empty((len(keys), *cache.shape), dtype=_torch_dtype(dtype), device=self.device)
        for i, key in enumerate(progress(keys, desc=f"Loading {cache.dir.name} into memory", unit="entry", leave=False)):
            stored = cache.load(key)
            if stored is None:
                stored = heal([i])[i]
            store[i] = torch.from_numpy(stored)  # fp16 -> fp32 once per run, not once per epoch
        log.info("%s: %d entries held in %s memory as %s (%.0f MiB)", cache.dir, len(keys), place, dtype.name, size / 2**20)
        return store
