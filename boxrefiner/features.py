"""Where embeddings come from during training: the cache (in memory or streamed) or the encoder.

With the cache on, `warm_up` extracts every missing entry once, in batches, before training. Epochs
then read only cached values: from one in-memory tensor when the split fits the RAM (or GPU) budget,
else streamed from the `.npy` files by DataLoader workers. With the cache off, the encoder runs on
every batch: the original behaviour, kept as the baseline that the speed-ups are measured against.

A sample whose image stops decoding, or whose features are not finite even when extracted again, is
excluded (listed in skipped.jsonl) but keeps its index: batches are cut from the same permutation
whether that was found at warm-up or in the middle of a run, so resuming stays exact.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .cache import FeatureCache, file_digest
from .config import Config
from .data import DECODE_ERRORS, Sample, SplitData, load_rgb, readable
from .encoder import EncoderIdentity, ImageEncoder, build_encoder, encoder_identity, preprocess
from .progress import progress
from .signals import StopRequest, ignore_stop_signals, reap_workers_at_exit, stop_signals_blocked

log = logging.getLogger(__name__)


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


def torch_dtype(dtype: np.dtype) -> torch.dtype:
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


class _StopSafeLoader(DataLoader):
    """A DataLoader whose workers start with SIGINT/SIGTERM held back (see `stop_signals_blocked`)."""

    def _get_iterator(self):  # type: ignore[no-untyped-def]
        if self.num_workers == 0:
            return super()._get_iterator()
        with stop_signals_blocked():
            return super()._get_iterator()


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device,
                sampler: Sampler | None = None, collate_fn=None, persistent: bool = True) -> DataLoader:
    # A private generator: creating an iterator must not draw from the global RNG, or a run that had
    # to extract features would initialise and train differently from one that found them cached.
    if num_workers > 0:
        reap_workers_at_exit()
    return _StopSafeLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                           pin_memory=device.type == "cuda", persistent_workers=persistent and num_workers > 0,
                           collate_fn=collate_fn, generator=torch.Generator().manual_seed(0),
                           worker_init_fn=ignore_stop_signals if num_workers > 0 else None)


@dataclass
class Extraction:
    """What `extract` did: the stored arrays (with `keep`) and the samples it could not store, with why."""
    stored: dict[int, np.ndarray] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # index -> unreadable_image | nonfinite_features


def entry_record(sample: Sample) -> dict:
    return {"file": sample.file_name, "width": sample.width, "height": sample.height}


def extract(cache: FeatureCache, samples: Sequence[Sample], keys: Sequence[str], indices: Sequence[int],
            encoder: ImageEncoder, batch_size: int, num_workers: int, bar_desc: str | None = None,
            keep: bool = False, stop: StopRequest | None = None) -> Extraction:
    """Encode the given samples and store them. Features that are not finite are encoded once more,
    alone; if they still are not, nothing is stored and the sample fails. With `stop`, a requested
    stop ends the work after the batch in hand (every entry written is complete and listed)."""
    subset = [samples[i] for i in indices]
    loader = make_loader(ImageDataset([s.image_path for s in subset], cache.identity.input_size), batch_size,
                         num_workers, encoder.device, collate_fn=collate_images, persistent=False)
    result = Extraction()
    with progress(total=len(subset), desc=bar_desc, unit="img", disable=bar_desc is None) as bar:
        for positions, images, bad in loader:
            result.failed.update((indices[p], "unreadable_image") for p in bad)
            if len(positions):
                features = encoder.encode(images).cpu().numpy()
                for row, (position, feature) in enumerate(zip(positions.tolist(), features)):
                    index = indices[position]
                    stored = cache.save(keys[index], feature, entry_record(samples[index]))
                    if stored is None:
                        again = encoder.encode(images[row:row + 1]).cpu().numpy()[0]
                        stored = cache.save(keys[index], again, entry_record(samples[index]))
                    if stored is None:
                        log.warning("%s: its features are not finite (NaN or inf), also when encoded again; "
                                    "leaving the image out", samples[index].image_path)
                        result.failed[index] = "nonfinite_features"
                    elif keep:
                        result.stored[index] = stored
            bar.update(len(positions) + len(bad))
            if stop is not None:
                stop.check("feature extraction")
    return result


def warm_up(cache: FeatureCache, samples: Sequence[Sample], keys: Sequence[str],
            get_encoder: Callable[[], ImageEncoder], batch_size: int, num_workers: int,
            stop: StopRequest | None = None) -> tuple[int, int, dict[int, str]]:
    """Extract every entry the manifest does not list; returns (found, extracted, failed samples).

    Listed entries are trusted here and verified when read; an entry on disk that no manifest lists
    (written by a version before journals) is listed now instead of extracted again."""
    listed = cache.listed()
    missing, unlisted, queued = [], {}, set()
    for i, key in enumerate(keys):
        if key in listed or key in queued:
            continue
        if cache.find(key) is not None:
            unlisted[key] = entry_record(samples[i])
        else:
            missing.append(i)
            queued.add(key)
    if unlisted:
        try:
            cache.manifest.add(cache.tag, cache.info, unlisted)
        except OSError as exc:  # a read-only cache: they are found by key all the same
            log.debug("cannot list %d entries in %s: %s", len(unlisted), cache.dir, exc)
    hits = len(keys) - len(missing)
    log.info("feature cache %s: %d of %d entries present (%.0f%%), %d to extract%s", cache.dir, hits, len(keys),
             100.0 * hits / max(1, len(keys)), len(missing),
             f" ({len(missing) * cache.entry_bytes / 2**20:.0f} MiB)" if missing else "")
    cache.ensure_room(len(missing))
    failed: dict[int, str] = {}
    try:
        if missing:
            cache.remove_stale_temps()
            failed = extract(cache, samples, keys, missing, get_encoder(), batch_size, num_workers,
                             bar_desc=f"Extracting {cache.dir.name}", stop=stop).failed
    finally:
        cache.manifest.close()
    failed_keys = {keys[i]: reason for i, reason in failed.items()}  # copies of a failed image fail with it
    extracted = sum(keys[i] not in failed_keys for i in missing)
    return hits, extracted, {i: failed_keys[k] for i, k in enumerate(keys) if k in failed_keys}


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
    """Common interface: iterate (sample indices, embeddings on the device); count where they came from."""

    from_cache = True

    def __init__(self, split: SplitData, batch_size: int, sampler: Sampler | None):
        self.split = split
        self.batch_size = batch_size
        self.size = len(split.samples)
        self.sampler = sampler
        self.cache_reads = 0  # features served from the cache, cumulative
        self.encoded = 0  # features the encoder computed while training (cache off, or a broken entry)
        self.healed = 0  # entries found bad while reading and extracted again, cumulative

    def __len__(self) -> int:
        return (self.size + self.batch_size - 1) // self.batch_size

    def _usable(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows of a batch whose sample is not excluded."""
        if not self.split.excluded:
            return torch.ones(len(indices), dtype=torch.bool)
        return torch.tensor([int(i) not in self.split.excluded for i in indices], dtype=torch.bool)


class InMemoryFeatures(FeatureBatches):
    """The whole split in one tensor (float32 when it fits, else the storage dtype), indexed per batch."""

    def __init__(self, store: torch.Tensor, split: SplitData, batch_size: int, device: torch.device,
                 sampler: Sampler | None = None):
        super().__init__(split, batch_size, sampler)
        self.store = store
        self.device = device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler) if self.sampler is not None else range(self.size))
        for indices in order.split(self.batch_size):
            indices = indices[self._usable(indices)]
            batch = self.store.index_select(0, indices.to(self.store.device))
            self.cache_reads += len(indices)
            yield indices, batch.to(self.device, non_blocking=True)


Healer = Callable[[list[int]], dict[int, np.ndarray]]


class StreamedFeatures(FeatureBatches):
    """Entries read from disk by DataLoader workers; an entry that turns out bad is re-extracted here."""

    def __init__(self, cache: FeatureCache, keys: Sequence[str], split: SplitData, heal: Healer, batch_size: int,
                 num_workers: int, device: torch.device, sampler: Sampler | None = None):
        super().__init__(split, batch_size, sampler)
        collate = functools.partial(_collate_entries, shape=cache.shape, dtype=torch_dtype(cache.dtype))
        self.loader = make_loader(CachedFeatureDataset(cache, keys), batch_size, num_workers, device, sampler, collate)
        self.heal = heal
        self.device = device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices, features, bad in self.loader:
            usable = self._usable(indices)
            broken = (bad & usable).nonzero().flatten().tolist()
            if broken:
                fresh = self.heal([int(indices[p]) for p in broken])
                for p in broken:
                    if int(indices[p]) in fresh:
                        features[p] = torch.from_numpy(fresh[int(indices[p])])
                    else:
                        usable[p] = False
                self.healed += len(broken)
                self.encoded += len(broken)
            self.cache_reads += int((usable & ~bad).sum())
            yield indices[usable], features[usable].to(self.device, non_blocking=True)


class EncodedFeatures(FeatureBatches):
    """The encoder on every batch (cache off)."""

    from_cache = False

    def __init__(self, split: SplitData, encoder: ImageEncoder, precision: str | None, batch_size: int,
                 num_workers: int, sampler: Sampler | None = None):
        super().__init__(split, batch_size, sampler)
        self.loader = make_loader(ImageDataset([s.image_path for s in split.samples], encoder.identity.input_size),
                                  batch_size, num_workers, encoder.device, sampler, collate_fn=collate_images)
        self.encoder = encoder
        self.precision = precision

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices, images, bad in self.loader:
            for index in bad:  # images were checked before training; one that broke since cannot stop a run
                self.split.exclude(index, "unreadable_image")
            if not len(indices):
                continue
            features = self.encoder.encode(images, self.precision)
            finite = torch.isfinite(features).flatten(1).all(dim=1).cpu()
            for index in indices[~finite].tolist():
                log.warning("%s: its features are not finite (NaN or inf); leaving the image out",
                            self.split.samples[index].image_path)
                self.split.exclude(index, "nonfinite_features")
            keep = finite & self._usable(indices)
            self.encoded += int(keep.sum())
            yield indices[keep], features[keep.to(features.device)]


class FeatureSources:
    """Train/val feature batches plus the encoder, which is built only if something needs it."""

    def __init__(self, cfg: Config, device: torch.device, train: SplitData, val: SplitData, amp: str,
                 stop: StopRequest | None = None):
        self.cfg = cfg
        self.device = device
        self.stop = stop
        cache_cfg = cfg.optimization.feature_cache
        self.identity: EncoderIdentity = encoder_identity(cfg.hqsam, memo_dir=cache_cfg.cache_dir)
        self._encoder: ImageEncoder | None = None
        self.caches: dict[str, FeatureCache] = {}
        self.found = 0  # entries present in the cache when the run started
        self.extracted = 0  # entries extracted before training
        batch_sizes = (cfg.training.batch_size, cfg.evaluation.batch_size or cfg.training.batch_size)
        self.train_sampler = EpochShuffle(len(train.samples), cfg.training.seed)
        self.train: FeatureBatches
        self.val: FeatureBatches
        if cfg.cache_enabled:
            self._budget = self._memory_budget()
            self.train = self._cached(train, batch_sizes[0], self.train_sampler)
            self.val = self._cached(val, batch_sizes[1], None)
            log.info("feature cache on: epochs read cached features only%s",
                     "" if self._encoder else "; the HQ-SAM encoder was never built (every feature was cached)")
        else:
            for split in (train, val):  # decode every image once, so that a corrupt one cannot stop an epoch
                for i, sample in enumerate(split.samples):
                    if not readable(sample.image_path):
                        split.exclude(i, "unreadable_image")
            precision = amp if amp != "fp32" else None
            self.train, self.val = (EncodedFeatures(split, self.encoder, precision, b, cfg.data.num_workers, s)
                                    for split, b, s in zip((train, val), batch_sizes, (self.train_sampler, None)))
            log.info("feature cache off: the encoder runs on every batch of every epoch (baseline mode)%s",
                     f", under {amp} autocast" if precision else "")

    def get_cache_stats(self) -> dict:
        """Warm-up: entries found in the cache at the start and entries extracted then. Training reads:
        features served from the cache and features the encoder computed (cache off, or an entry that
        broke), their hit rate, entries healed, and bytes of entries read from disk."""
        batches = (self.train, self.val)
        streamed = [b for b in batches if isinstance(b, StreamedFeatures)]
        entry = max((int(np.prod(c.shape)) * c.dtype.itemsize for c in self.caches.values()), default=0)
        served, encoded = sum(b.cache_reads for b in batches), sum(b.encoded for b in batches)
        healed = sum(b.healed for b in streamed) + sum(c.stats.healed for c in self.caches.values())
        return {"found": self.found, "extracted": self.extracted, "served": served, "encoded": encoded,
                "hit_rate": served / (served + encoded) if served + encoded else None, "healed": healed,
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

    def _cached(self, split: SplitData, batch_size: int, sampler: Sampler | None) -> FeatureBatches:
        cache_cfg = self.cfg.optimization.feature_cache
        cache = FeatureCache(cache_cfg.cache_dir, split.split, self.identity, cache_cfg.storage_dtype)
        self.caches[split.split] = cache
        keys = [cache.key_for(file_digest(s.image_path)) for s in split.samples]
        if cache_cfg.auto_detect:
            mine, other = cache.census()
            log.info("auto-detect %s: %d entries for %s, %d for other encoders", cache.dir, mine,
                     self.identity.short(), other)
        found, extracted, failed = warm_up(cache, split.samples, keys, lambda: self.encoder, self.cfg.hqsam.batch_size,
                                           self.cfg.data.num_workers, self.stop)
        self.found += found
        self.extracted += extracted
        for index, reason in sorted(failed.items()):
            split.exclude(index, reason)

        def heal(indices: list[int]) -> dict[int, np.ndarray]:
            result = extract(cache, split.samples, keys, indices, self.encoder, self.cfg.hqsam.batch_size, 0,
                             keep=True)
            for index, reason in sorted(result.failed.items()):
                log.warning("%s: its cached features broke and cannot be extracted again (%s); leaving it out",
                            split.samples[index].image_path, reason)
                split.exclude(index, reason)
            cache.manifest.close(compact=False)
            return result.stored

        store = self._load_store(cache, keys, split, heal)
        if store is None:
            return StreamedFeatures(cache, keys, split, heal, batch_size, self.cfg.data.num_workers, self.device, sampler)
        return InMemoryFeatures(store, split, batch_size, self.device, sampler)

    def _load_store(self, cache: FeatureCache, keys: Sequence[str], split: SplitData, heal: Healer) -> torch.Tensor | None:
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
        store = torch.zeros((len(keys), *cache.shape), dtype=torch_dtype(dtype), device=self.device)
        broken = []
        for i, key in enumerate(progress(keys, desc=f"Loading {cache.dir.name} into memory", unit="entry", leave=False)):
            if i in split.excluded:
                continue
            stored = cache.load(key)
            if stored is None:
                broken.append(i)
            else:
                store[i] = torch.from_numpy(stored)  # fp16 -> fp32 once per run, not once per epoch
        for i, stored in heal(broken).items() if broken else ():
            store[i] = torch.from_numpy(stored)
        log.info("%s: %d entries held in %s memory as %s (%.0f MiB)", cache.dir, len(keys), place, dtype.name, size / 2**20)
        return store
