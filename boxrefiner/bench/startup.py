"""How long a training run takes to start at scale: N synthetic images, cache warm.

    boxrefiner bench startup --images 100000

Builds N small images in the FungiTastic layout (one masked object each; a fifth of them the val
split), with their feature-cache entries (64 px encoder input: 4 x 4 maps, so that the entries are
small: start-up never reads an entry's values), then times the trainer's real `setup` twice: the
first start reads every image once (the start-up memo is empty), the second is the warm start a user
meets on every later run. Writing the N entries times the manifest journal too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from boxrefiner.config import Config, config_from_dict
from boxrefiner.data.rle import encode_cvat_rle
from boxrefiner.data.splits import load_split
from boxrefiner.features.cache import FeatureCache
from boxrefiner.features.encoder import encoder_identity
from boxrefiner.features.sources import entry_record
from boxrefiner.training.trainer import setup
from boxrefiner.utils.files import sha256_file
from boxrefiner.utils.memo import FileMemo
from boxrefiner.utils.progress import progress

log = logging.getLogger(__name__)

SUBSET = "FungiTastic-Mini"
_SIZE = (40, 30)


def startup_config(root: Path) -> Config:
    return config_from_dict({
        "data": {"data_root": str(root / "data"), "image_size": 300, "num_workers": 0},
        "hqsam": {"model_type": "vit_tiny", "allow_random_init": True, "input_size": 64},
        "training": {"epochs": 1, "batch_size": 16},
        "optimization": {"feature_cache": {"cache_dir": str(root / "features"), "in_memory": False}},
        "output": {"save_dir": str(root / "out"), "checkpoint_dir": str(root / "ckpt"), "log_dir": str(root / "logs")},
    })


def build(root: Path, images: int, seed: int = 0) -> dict[str, float]:
    """The dataset and its cache entries; returns the seconds spent writing the entries."""
    rng = np.random.default_rng(seed)
    counts = {"val": max(1, images // 5)}
    counts["train"] = max(1, images - counts["val"])
    data = root / "data"
    (data / "metadata" / SUBSET).mkdir(parents=True, exist_ok=True)
    (data / "masks").mkdir(parents=True, exist_ok=True)
    files = {"train": ("Train", "TrainMasks"), "val": ("ClosedSet-Val", "ValidationMasks")}
    width, height = _SIZE
    for split, count in counts.items():
        folder = data / SUBSET / split / "300p"
        folder.mkdir(parents=True, exist_ok=True)
        names, rows = [], []
        for i in progress(range(count), desc=f"Writing {split} images", unit="img"):
            name = f"{split}_{i:07d}.JPG"
            colour = rng.integers(0, 255, 3, dtype=np.uint8)
            Image.new("RGB", _SIZE, tuple(int(c) for c in colour)).save(folder / name, quality=80)
            mask = np.zeros((height, width), dtype=bool)
            x0, y0 = rng.integers(2, 12), rng.integers(2, 10)
            mask[y0:y0 + rng.integers(8, 16), x0:x0 + rng.integers(8, 20)] = True
            names.append(name)
            rows.append({"file_name": name, "label": "cap", "width": width, "height": height,
                         "rle": encode_cvat_rle(mask)})
        pd.DataFrame({"filename": names}).to_csv(data / "metadata" / SUBSET / f"{SUBSET}-{files[split][0]}.csv",
                                                 index=False)
        pd.DataFrame(rows).to_parquet(data / "masks" / f"{SUBSET}-{files[split][1]}.parquet")
    return {"entries_seconds": _write_entries(root, counts)}


def _write_entries(root: Path, counts: dict[str, int]) -> float:
    """Every image's cache entry, written as extraction writes them (an atomic file + a journal line)."""
    cfg = startup_config(root)
    identity = encoder_identity(cfg.hqsam, memo_dir=cfg.optimization.feature_cache.cache_dir)
    spent = 0.0
    for split in counts:
        cache = FeatureCache(cfg.optimization.feature_cache.cache_dir, split, identity)
        value = np.zeros(cache.shape, dtype=np.float32)
        indexed = load_split(cfg.data, split, memo=FileMemo(None), digests=True)
        for image in progress(indexed.images, desc=f"Writing {split} entries", unit="entry"):
            key = cache.key_for(image.digest or sha256_file(image.image_path))
            start = time.perf_counter()
            cache.save(key, value, entry_record(image))
            spent += time.perf_counter() - start
        cache.manifest.close()
    return spent


def time_setup(cfg: Config) -> float:
    """Seconds of the trainer's setup: everything a run does before its first training step."""
    start = time.perf_counter()
    setup(cfg, torch.device("cpu"), None, None, False, None)
    return time.perf_counter() - start


def measure(root: Path, images: int) -> dict:
    """Build, then a first start (empty memo) and a warm start."""
    built = build(root, images)
    cfg = startup_config(root)
    first = time_setup(cfg)
    warm = time_setup(cfg)
    cache = Path(cfg.optimization.feature_cache.cache_dir)
    return {"images": images, **built, "entry_write_us": 1e6 * built["entries_seconds"] / images,
            "first_start_seconds": first, "warm_start_seconds": warm,
            "memo_bytes_per_image": _bytes(cache / ".memo") / images,
            "manifest_bytes_per_entry": _bytes(*(cache / split / "manifest" for split in ("train", "val"))) / images}


def _bytes(*folders: Path) -> int:
    return sum(p.stat().st_size for folder in folders for p in folder.glob("*.jsonl"))
