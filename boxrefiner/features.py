"""Where embeddings come from during training: the warm cache, or the encoder run on every batch.

With the cache on, `warm_up` extracts every missing entry once, in batches, before training;
epochs then only read `.npy` files. With it off, `FeatureLoader` runs the encoder on each batch:
the original behaviour, kept as the baseline that the speed-ups are measured against.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .cache import FeatureCache, count_entries, file_digest
from .config import Config
from .data import Sample, SplitData, load_rgb
from .encoder import EncoderIdentity, ImageEncoder, build_encoder, encoder_identity, preprocess
from .progress import progress

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Decoded, SAM-preprocessed images (decoding and resizing run in DataLoader workers)."""

    def __init__(self, samples: Sequence[Sample], input_size: int):
        self.samples = samples
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, preprocess(load_rgb(self.samples[index].image_path), self.input_size)


class CachedFeatureDataset(Dataset):
    """Stored embeddings, in their storage dtype (converted to float32 on the device, per batch)."""

    def __init__(self, cache: FeatureCache, keys: Sequence[str]):
        self.cache = cache
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        stored = self.cache.load(self.keys[index])
        if stored is None:
            raise RuntimeError(f"feature cache entry {self.cache.path(self.keys[index])} disappeared during "
                               "training; run again to re-extract it")
        return index, torch.from_numpy(stored)


class EpochShuffle(Sampler):
    """A permutation that depends only on (seed, epoch): the same order with any number of workers."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device,
                sampler: Sampler | None = None) -> DataLoader:
    # A private generator: creating an iterator must not draw from the global RNG, or a run that had
    # to extract features would initialise and train differently from one that found them cached.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(0))


class FeatureLoader:
    """Batches of (sample indices, float32 embeddings on the device), from the cache or the encoder."""

    def __init__(self, loader: DataLoader, device: torch.device, encoder: ImageEncoder | None = None,
                 encode_precision: str | None = None):
        self.loader = loader
        self.device = device
        self.encoder = encoder
        self.encode_precision = encode_precision
        self.cache_reads = 0  # entries served from the cache since the last reset

    @property
    def from_cache(self) -> bool:
        return self.encoder is None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices, tensors in self.loader:
            if self.encoder is not None:
                features = self.encoder.encode(tensors, self.encode_precision)
            else:
                features = tensors.to(self.device, non_blocking=True).float()
                self.cache_reads += len(indices)
            yield indices, features


def warm_up(cache: FeatureCache, samples: Sequence[Sample], keys: Sequence[str],
            get_encoder: Callable[[], ImageEncoder], batch_size: int, num_workers: int) -> tuple[int, int]:
    """Extract every entry that is missing or bad; returns (hits, extracted)."""
    missing = [i for i, key in enumerate(keys) if not cache.is_valid(key)]
    hits = len(keys) - len(missing)
    log.info("feature cache %s: %d of %d entries present (%.0f%%), %d to extract", cache.dir, hits, len(keys),
             100.0 * hits / max(1, len(keys)), len(missing))
    if not missing:
        return hits, 0
    encoder = get_encoder()
    subset = [samples[i] for i in missing]
    loader = make_loader(ImageDataset(subset, cache.identity.input_size), batch_size, num_workers, encoder.device)
    with progress(total=len(subset), desc=f"Extracting {cache.dir.name}", unit="img") as bar:
        for indices, images in loader:
            features = encoder.encode(images).cpu().numpy()
            for j, feature in zip(indices.tolist(), features):
                cache.save(keys[missing[j]], feature)
            bar.update(len(indices))
    return hits, len(missing)


class FeatureSources:
    """Train/val feature loaders plus the encoder, which is built only if something needs it."""

    def __init__(self, cfg: Config, device: torch.device, train: SplitData, val: SplitData, amp: str):
        self.cfg = cfg
        self.device = device
        cache_cfg = cfg.optimization.feature_cache
        self.identity: EncoderIdentity = encoder_identity(cfg.hqsam, memo_dir=cache_cfg.cache_dir)
        self._encoder: ImageEncoder | None = None
        self.train_sampler = EpochShuffle(len(train.samples), cfg.training.seed)
        eval_batch = cfg.evaluation.batch_size or cfg.training.batch_size
        workers = cfg.data.num_workers
        if cfg.cache_enabled:
            datasets = [self._warm_cache(split) for split in (train, val)]
            encoder, precision = None, None
            log.info("feature cache on: epochs read %s only%s", cache_cfg.cache_dir,
                     "" if self._encoder else "; the HQ-SAM encoder was never built (every feature was cached)")
        else:
            datasets = [ImageDataset(s.samples, cfg.hqsam.input_size) for s in (train, val)]
            encoder, precision = self.encoder, (amp if amp != "fp32" else None)
            log.info("feature cache off: the encoder runs on every batch of every epoch (baseline mode)")
        self.train = FeatureLoader(make_loader(datasets[0], cfg.training.batch_size, workers, device, self.train_sampler),
                                   device, encoder, precision)
        self.val = FeatureLoader(make_loader(datasets[1], eval_batch, workers, device), device, encoder, precision)

    @property
    def encoder(self) -> ImageEncoder:
        if self._encoder is None:
            self._encoder = build_encoder(self.cfg.hqsam, self.device, self.identity)
        return self._encoder

    def _warm_cache(self, split: SplitData) -> CachedFeatureDataset:
        cache_cfg = self.cfg.optimization.feature_cache
        cache = FeatureCache(cache_cfg.cache_dir, split.split, self.identity, cache_cfg.storage_dtype)
        keys = [cache.key_for(file_digest(s.image_path)) for s in split.samples]
        if cache_cfg.auto_detect:
            present = sum(cache.path(k).is_file() for k in keys)
            total = count_entries(cache_cfg.cache_dir, split.split)
            log.info("auto-detect %s: %d entries, %d of them for this run's images with %s", cache.dir, total, present,
                     self.identity.short())
        warm_up(cache, split.samples, keys, lambda: self.encoder, self.cfg.hqsam.batch_size, self.cfg.data.num_workers)
        return CachedFeatureDataset(cache, keys)
