"""Where a training epoch's time goes: cache off (encoder in the loop), cache warm, and the head alone.

    boxrefiner bench epoch --config configs/demo.yaml --epochs 3 --cache-off-epochs 1

Runs write to a temporary output folder, never over the config's checkpoints. The head-only time
runs the same training steps on batches already materialised on the device: the floor that a warm
epoch can reach.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from boxrefiner.config import Config, replace, with_cache
from boxrefiner.data.splits import SplitData
from boxrefiner.data.targets import Targets
from boxrefiner.features.sources import FeatureBatch, FeatureBatches, FeatureSources
from boxrefiner.modeling.build import build_model
from boxrefiner.training.loop import train_one_epoch
from boxrefiner.training.precision import amp_precision
from boxrefiner.training.rng import seed_everything
from boxrefiner.training.schedule import build_optimization
from boxrefiner.training.trainer import prepare_splits, train


class PreparedBatches(FeatureBatches):
    """Batches held as ready tensors on the device: no reading, copying or indexing left."""

    def __init__(self, batches: list[FeatureBatch], split: SplitData, batch_size: int):
        super().__init__(split, batch_size, None)
        self.batches = batches

    def __iter__(self) -> Iterator[FeatureBatch]:
        for batch in self.batches:
            self.cache_reads += len(batch)
            yield batch


def isolated_outputs(cfg: Config, folder: Path) -> Config:
    """The config with every output (metrics, checkpoints, logs) under `folder`, and no pictures: a
    benchmark times training, and the pictures' background drawing would add its own noise."""
    cfg = replace(cfg, "logging", plots=False, tensorboard=False)
    return replace(cfg, "output", save_dir=str(folder / "out"), checkpoint_dir=str(folder / "ckpt"),
                   log_dir=str(folder / "logs"))


def head_only_seconds(cfg: Config, device: torch.device, epochs: int) -> list[float]:
    """Training-pass seconds per epoch with every batch already in memory as float32 on the device."""
    train_split, val_split = prepare_splits(cfg)
    seed_everything(cfg.training.seed)
    model = build_model(cfg).to(device)
    precision = amp_precision(device, cfg.training.use_amp)
    sources = FeatureSources(cfg, device, train_split, val_split, precision)
    targets = Targets.of(train_split)
    optimizer, scheduler, scaler = build_optimization(cfg, model, len(sources.train), precision)
    seconds = []
    for epoch in range(epochs):
        sources.train_sampler.set_epoch(epoch)
        batches = PreparedBatches([dataclasses.replace(b, features=b.features.float().clone()) for b in sources.train],
                                  train_split, cfg.training.batch_size)
        record, _ = train_one_epoch(model, batches, targets, optimizer, scheduler, scaler, cfg, precision, epoch)
        assert record is not None  # no stop request here
        seconds.append(record["epoch_seconds"])
    return seconds


def measure(cfg: Config, device: torch.device, epochs: int = 3, cache_off_epochs: int = 1) -> dict:
    """The three numbers behind the cache's claim, measured in one process on the same data and seed."""
    with tempfile.TemporaryDirectory(prefix="boxrefiner-bench-") as tmp:
        folder = Path(tmp)
        cached = with_cache(replace(isolated_outputs(cfg, folder / "warm"), "training", epochs=epochs), True)
        start = time.perf_counter()
        train(cached, device)  # fills the cache if needed; its epochs are timed below on a warm cache
        cold_total = time.perf_counter() - start
        warm = train(isolated_outputs(cached, folder / "warm2"), device)
        head = head_only_seconds(cached, device, epochs)
        off = train(with_cache(replace(isolated_outputs(cfg, folder / "off"), "training", epochs=cache_off_epochs), False),
                    device)
    result = {
        "first_run_seconds": cold_total,
        "warm_epoch_seconds": statistics.median(r["epoch_seconds"] for r in warm),
        "warm_data_seconds": statistics.median(r["data_seconds"] for r in warm),
        "head_only_epoch_seconds": statistics.median(head),
        "cache_off_epoch_seconds": statistics.median(r["epoch_seconds"] for r in off),
        "train_objects": warm[0]["samples_per_second"] * warm[0]["epoch_seconds"],
    }
    result["cache_speedup"] = result["cache_off_epoch_seconds"] / result["warm_epoch_seconds"]
    result["warm_over_head_only"] = result["warm_epoch_seconds"] / result["head_only_epoch_seconds"]
    return result


def _cache_setting(cfg: Config, **changes) -> Config:
    return replace(cfg, "optimization", feature_cache=dataclasses.replace(cfg.optimization.feature_cache, **changes))


def widened_copy(cfg: Config, folder: Path) -> Config:
    """The config reading a private float32 copy of its float16 cache (the same values, twice the bytes):
    what float32 storage costs to stream, without extracting again. For timing only."""
    from boxrefiner.features.cache import FeatureCache
    from boxrefiner.features.encoder import encoder_identity
    from boxrefiner.features.sources import entry_record
    identity = encoder_identity(cfg.hqsam, memo_dir=cfg.optimization.feature_cache.cache_dir)
    for split in prepare_splits(cfg):
        source = FeatureCache(cfg.optimization.feature_cache.cache_dir, split.split, identity, "float16")
        target = FeatureCache(folder, split.split, identity, "float32")
        for image in split.images:
            assert image.digest is not None  # indexed with the cache on
            stored = source.load(source.key_for(image.digest))
            if stored is not None:
                target.save(target.key_for(image.digest), stored.astype(np.float32), entry_record(image))
        target.manifest.close()
    return _cache_setting(cfg, cache_dir=str(folder), storage_dtype="float32")


def measure_streamed(cfg: Config, device: torch.device, rounds: int = 3) -> dict:
    """Warm epochs held in memory and streamed from disk (float16 and float32 storage, the OS page
    cache warm), against head-only compute on the same batches, in one process. The modes take turns,
    one epoch each per round, and each mode's median counts: a machine whose speed drifts (a shared
    VM) then slows every mode alike instead of one of them."""
    with tempfile.TemporaryDirectory(prefix="boxrefiner-bench-") as tmp:
        folder = Path(tmp)
        base = with_cache(replace(isolated_outputs(cfg, folder / "fill"), "training", epochs=1), True)
        base = _cache_setting(base, storage_dtype="float16")
        train(base, device)  # extracts what is missing; warms the page cache and the first-step imports
        runs = {"in_memory": _cache_setting(base, in_memory=True),
                "streamed_float16": _cache_setting(base, in_memory=False),
                "streamed_float32": _cache_setting(widened_copy(base, folder / "cache32"), in_memory=False)}
        seconds: dict[str, list[float]] = {"head_only": [], **{name: [] for name in runs}}
        waiting: dict[str, list[float]] = {name: [] for name in runs}
        for turn in range(rounds):
            seconds["head_only"] += head_only_seconds(base, device, 1)
            for name, run_cfg in runs.items():
                record = train(isolated_outputs(run_cfg, folder / f"{name}{turn}"), device)[0]
                seconds[name].append(record["epoch_seconds"])
                waiting[name].append(record["data_seconds"])
    head = statistics.median(seconds["head_only"])
    result: dict = {"rounds": rounds, "head_only_epoch_seconds": head}
    for name in runs:
        result[f"{name}_epoch_seconds"] = statistics.median(seconds[name])
        result[f"{name}_waiting_seconds"] = statistics.median(waiting[name])
        result[f"{name}_over_head_only"] = result[f"{name}_epoch_seconds"] / head
    result["epoch_seconds_by_round"] = seconds
    return result
