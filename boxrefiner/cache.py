"""On-disk `.npy` feature cache: `<cache_dir>/<split>/<key>.npy` plus `<split>/manifest.json`.

A key hashes the image file's bytes together with the encoder's identity (model type, checkpoint
content, input size, precision, preprocessing version) and the storage dtype, so a changed image,
checkpoint or preprocessing never gets an old entry. Entries are written atomically (temp file +
`os.replace`), so concurrent writers and interrupted runs never leave a torn file under a real name;
an entry that does not read back with the right shape and dtype is deleted, counted as healed and
extracted again by the caller.

The manifest (plain JSON, for tools and people) records per encoder its identity, the storage dtype,
the entry shape and, per entry, the image it came from. It is an index, not the truth: entries are
found by key, so a lost manifest costs nothing but `--clear-cache`'s ability to tell encoders apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .encoder import EMBED_DIM, PATCH, EncoderIdentity
from .fileio import atomic_write, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_NPY_HEADER = 128  # bytes numpy writes before the data of a small-header .npy


class CacheError(ValueError):
    """The cache cannot be used as configured (e.g. no room on disk); one-line message."""


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: the image half of a cache key."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class CacheStats:
    """What this process read: bad entries deleted (healed) and bytes of good entries."""
    healed: int = 0
    bytes_read: int = 0


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the split folder's manifest (several processes may fill one cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest if isinstance(manifest.get("encoders"), dict) else {"encoders": {}}
    except (OSError, ValueError, AttributeError):
        return {"encoders": {}}


def cache_tag(identity: EncoderIdentity, storage_dtype: str) -> str:
    """Names one encoder identity + storage dtype in the manifests."""
    return hashlib.sha256(f"{identity.key}|{np.dtype(storage_dtype).name}".encode()).hexdigest()[:16]


class FeatureCache:
    """One split's entries for one encoder identity and storage dtype."""

    def __init__(self, cache_dir: str | Path, split: str, identity: EncoderIdentity, storage_dtype: str = "float16"):
        self.dir = Path(cache_dir) / split
        self.identity = identity
        self.dtype = np.dtype(storage_dtype)
        grid = identity.input_size // PATCH
        self.shape = (EMBED_DIM, grid, grid)
        self._salt = f"{identity.key}|{self.dtype.name}"
        self.tag = cache_tag(identity, storage_dtype)
        self.stats = CacheStats()

    @property
    def entry_bytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize + _NPY_HEADER

    def key_for(self, image_digest: str) -> str:
        return hashlib.sha256(f"{image_digest}|{self._salt}".encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.npy"

    def _bad(self, key: str, reason: str, count: bool = True) -> None:
        log.warning("feature cache: %s is %s; deleting it so that it is extracted again", self.path(key), reason)
        self.path(key).unlink(missing_ok=True)
        self.stats.healed += count

    def _check(self, key: str, arr: np.ndarray, count: bool = True) -> bool:
        if arr.shape != self.shape or arr.dtype != self.dtype:
            self._bad(key, f"of shape {arr.shape} {arr.dtype}, expected {self.shape} {self.dtype}", count)
            return False
        return True

    def is_valid(self, key: str) -> bool:
        """Cheap check through a memory map: header, shape, dtype and file length. Heals bad files."""
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            self._bad(key, f"unreadable ({exc})")
            return False
        return self._check(key, arr)

    def load(self, key: str, count: bool = True) -> np.ndarray | None:
        """The stored array, or None (a miss; a bad file is deleted and counted as healed).

        DataLoader workers pass count=False: their counters would die with them, so the loader counts."""
        try:
            arr = np.load(self.path(key))
        except FileNotFoundError:
            arr = None
        except (ValueError, OSError, EOFError) as exc:
            self._bad(key, f"unreadable ({exc})", count)
            arr = None
        if arr is not None and not self._check(key, arr, count):
            arr = None
        if count and arr is not None:
            self.stats.bytes_read += arr.nbytes
        return arr

    def save(self, key: str, features: np.ndarray) -> np.ndarray:
        """Store atomically in the storage dtype; returns exactly what was stored."""
        stored = np.ascontiguousarray(features, dtype=self.dtype)
        if stored.shape != self.shape:
            raise ValueError(f"feature shape {stored.shape} does not match the cache's {self.shape}")
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(key), lambda f: np.save(f, stored))
        return stored

    def ensure_room(self, missing: int) -> None:
        """Stop before extraction when the disk cannot hold the entries still to be written."""
        if missing <= 0:
            return
        folder = self.dir
        while not folder.exists():
            folder = folder.parent
        need = missing * self.entry_bytes
        free = shutil.disk_usage(folder).free
        if need > free * 0.95:
            raise CacheError(f"feature cache {self.dir}: {missing} entries need {need / 2**30:.2f} GiB but only "
                             f"{free / 2**30:.2f} GiB is free; free space, move "
                             "optimization.feature_cache.cache_dir, or lower data.sample_ratio")

    def record(self, entries: dict[str, dict]) -> None:
        """Add entries ({key: {"file": ..., "width": ..., "height": ...}}) to the split's manifest."""
        with _locked(self.dir):
            manifest = read_manifest(self.dir)
            encoder = manifest["encoders"].setdefault(self.tag, {})
            encoder.update({"identity": dataclasses.asdict(self.identity), "label": self.identity.short(),
                            "storage_dtype": self.dtype.name, "shape": list(self.shape)})
            encoder.setdefault("entries", {}).update(entries)
            manifest["version"] = 1
            write_json(self.dir / MANIFEST, manifest, sort_keys=True)

    def census(self) -> tuple[int, int, int]:
        """Entry files on disk: (this encoder's, other encoders', not in the manifest)."""
        if not self.dir.is_dir():
            return 0, 0, 0
        owners = {key: tag for tag, enc in read_manifest(self.dir)["encoders"].items() for key in enc.get("entries", {})}
        mine = other = unknown = 0
        for path in self.dir.glob("*.npy"):
            tag = owners.get(path.stem)
            if tag == self.tag:
                mine += 1
            elif tag is None:
                unknown += 1
            else:
                other += 1
        return mine, other, unknown


def clear_cache(cache_dir: str | Path, tag: str | None = None) -> tuple[int, int]:
    """Delete entries of one encoder (`tag`, found through the manifests) or, with tag None, every entry
    and stray temp file in every split. Returns (files, bytes)."""
    root = Path(cache_dir)
    files = size = 0
    if not root.is_dir():
        return 0, 0
    for folder in (p for p in root.iterdir() if p.is_dir()):
        with _locked(folder):
            manifest = read_manifest(folder)
            if tag is None:  # temp files younger than an hour may be another process's write in flight
                stale = [p for p in folder.glob(".*.tmp") if time.time() - p.stat().st_mtime > 3600]
                doomed = list(folder.glob("*.npy")) + stale
                manifest = {"encoders": {}}
            else:
                entries = manifest["encoders"].pop(tag, {}).get("entries", {})
                doomed = [folder / f"{key}.npy" for key in entries]
            for path in doomed:
                with contextlib.suppress(FileNotFoundError):
                    size += path.stat().st_size
                    path.unlink()
                    files += 1
            if (folder / MANIFEST).exists():
                write_json(folder / MANIFEST, manifest, sort_keys=True)
    return files, size
