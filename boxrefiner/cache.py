"""On-disk `.npy` feature cache: `<cache_dir>/<split>/<key>.npy`.

A key is the hash of the image file's bytes together with the encoder's identity (model type,
checkpoint content, input size, precision, preprocessing version) and the storage dtype, so a
changed image, checkpoint or preprocessing never gets an old entry. Entries are written atomically
(temp file + `os.replace`); an entry that does not read back with the right shape and dtype is
deleted and counted as healed, and the caller extracts it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .encoder import EMBED_DIM, PATCH, EncoderIdentity

log = logging.getLogger(__name__)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: the image half of a cache key."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    healed: int = 0
    bytes_read: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate, "healed": self.healed,
                "bytes_read": self.bytes_read}


class FeatureCache:
    """One split's entries for one encoder identity and storage dtype."""

    def __init__(self, cache_dir: str | Path, split: str, identity: EncoderIdentity, storage_dtype: str = "float16"):
        self.dir = Path(cache_dir) / split
        self.identity = identity
        self.dtype = np.dtype(storage_dtype)
        grid = identity.input_size // PATCH
        self.shape = (EMBED_DIM, grid, grid)
        self._salt = f"{identity.key}|{self.dtype.name}"
        self.stats = CacheStats()

    def key_for(self, image_digest: str) -> str:
        return hashlib.sha256(f"{image_digest}|{self._salt}".encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.npy"

    def _bad(self, key: str, reason: str) -> None:
        log.warning("feature cache: %s is %s; deleting it so that it is extracted again", self.path(key), reason)
        self.path(key).unlink(missing_ok=True)
        self.stats.healed += 1

    def is_valid(self, key: str) -> bool:
        """Cheap check through a memory map: the header and the file length must fit. Heals bad files."""
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            self._bad(key, f"unreadable ({exc})")
            return False
        if arr.shape != self.shape or arr.dtype != self.dtype:
            self._bad(key, f"of shape {arr.shape} {arr.dtype}, expected {self.shape} {self.dtype}")
            return False
        return True

    def load(self, key: str) -> np.ndarray | None:
        """The stored array, or None (a miss; a bad file is deleted and counted as healed)."""
        path = self.path(key)
        try:
            arr = np.load(path)
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except (ValueError, OSError, EOFError) as exc:
            self._bad(key, f"unreadable ({exc})")
            self.stats.misses += 1
            return None
        if arr.shape != self.shape or arr.dtype != self.dtype:
            self._bad(key, f"of shape {arr.shape} {arr.dtype}, expected {self.shape} {self.dtype}")
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.bytes_read += arr.nbytes
        return arr

    def save(self, key: str, features: np.ndarray) -> np.ndarray:
        """Store atomically in the storage dtype; returns exactly what was stored."""
        stored = np.ascontiguousarray(features, dtype=self.dtype)
        if stored.shape != self.shape:
            raise ValueError(f"feature shape {stored.shape} does not match the cache's {self.shape}")
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, stored)
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return stored

    def get_cache_stats(self) -> dict:
        return self.stats.as_dict()


def count_entries(cache_dir: str | Path, split: str) -> int:
    folder = Path(cache_dir) / split
    return sum(1 for _ in folder.glob("*.npy")) if folder.is_dir() else 0


def clear_cache(cache_dir: str | Path) -> tuple[int, int]:
    """Delete every `.npy` entry (and stray temp files) under cache_dir/<split>/; returns (files, bytes)."""
    files = size = 0
    root = Path(cache_dir)
    if not root.is_dir():
        return 0, 0
    for path in list(root.glob("*/*.npy")) + list(root.glob("*/.*.tmp")):
        size += path.stat().st_size
        path.unlink()
        files += 1
    return files, size
