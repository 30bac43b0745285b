"""Where a training epoch's time goes: cache off (encoder in the loop), cache warm, and the head alone.

    python -m boxrefiner.benchmark --config configs/demo.yaml --epochs 3 --cache-off-epochs 1

Runs write to a temporary output folder, never over the config's checkpoints. The head-only time
runs the same training steps on batches already materialised on the device: the floor that a warm
epoch can reach.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import Config, load_config, replace
from .engine import Targets, amp_precision, build_model, build_optimization, prepare_splits, seed_everything, train, train_one_epoch
from .data import SplitData
from .features import FeatureBatch, FeatureBatches, FeatureSources
from .fileio import write_json

log = logging.getLogger(__name__)


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
    """The config with every output (metrics, checkpoints, logs) under `folder`."""
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
        seconds.append(record["epoch_seconds"])
    return seconds


def measure(cfg: Config, device: torch.device, epochs: int = 3, cache_off_epochs: int = 1) -> dict:
    """The three numbers behind the cache's claim, measured in one process on the same data and seed."""
    with tempfile.TemporaryDirectory(prefix="boxrefiner-bench-") as tmp:
        folder = Path(tmp)
        cached = replace(isolated_outputs(cfg, folder / "warm"), "training", epochs=epochs, feature_cache=True)
        cached = replace(cached, "optimization",
                         feature_cache=dataclasses.replace(cfg.optimization.feature_cache, enabled=True))
        start = time.perf_counter()
        train(cached, device)  # fills the cache if needed; its epochs are timed below on a warm cache
        cold_total = time.perf_counter() - start
        warm = train(isolated_outputs(cached, folder / "warm2"), device)
        head = head_only_seconds(cached, device, epochs)
        off = train(replace(isolated_outputs(cfg, folder / "off"), "training", epochs=cache_off_epochs, feature_cache=False), device)
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


def fp16_storage_error(cfg: Config, count: int = 8) -> dict:
    """How far float16 storage moves the embeddings of a few training images (float32 encoder output)."""
    from .data import load_rgb
    from .encoder import build_encoder, encoder_identity, preprocess
    train_split, _ = prepare_splits(cfg)
    encoder = build_encoder(cfg.hqsam, torch.device("cpu"), encoder_identity(cfg.hqsam))
    images = torch.stack([preprocess(load_rgb(s.image_path), cfg.hqsam.input_size) for s in train_split.images[:count]])
    features = encoder.encode(images).numpy()
    error = np.abs(features.astype(np.float16).astype(np.float32) - features)
    return {"images": len(images), "max_abs_error": float(error.max()), "mean_abs_error": float(error.mean()),
            "feature_abs_max": float(np.abs(features).max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure where a training epoch's time goes.")
    parser.add_argument("--config", required=True)
    from .console import positive_int, resolve_device, run_command, setup_logging
    parser.add_argument("--epochs", type=positive_int, default=3, help="epochs timed with the cache warm and head-only")
    parser.add_argument("--cache-off-epochs", type=positive_int, default=1,
                        help="epochs timed with the encoder in the loop")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    setup_logging()

    def run(_) -> int:
        cfg, _ = load_config(args.config)
        result = measure(cfg, resolve_device(args.device), args.epochs, args.cache_off_epochs)
        result["fp16_storage"] = fp16_storage_error(cfg)
        print(json.dumps(result, indent=1))
        if args.json:
            write_json(args.json, result)
        return 0

    return run_command(run)


if __name__ == "__main__":
    raise SystemExit(main())
