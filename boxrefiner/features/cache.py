"""On-disk `.npy` feature cache: one file per entry, an append-only manifest per split.

    <cache_dir>/.boxrefiner-cache                 marks a cache root this tool created
    <cache_dir>/<split>/<key[:2]>/<key>.npy       entries (older versions wrote <split>/<key>.npy: still read)
    <cache_dir>/<split>/manifest/*.jsonl          manifest journals, one per writing process, merged when read

A key hashes the image file's bytes together with the encoder's identity (model type, checkpoint
content, input size, precision, preprocessing and encoder revision) and the storage dtype, so a
changed image, checkpoint or preprocessing never gets an old entry. Entries are written atomically
(temp file + `os.replace`), so concurrent writers and interrupted runs never leave a torn file
under a real name. An entry that does not read back with the right shape and dtype, or holds
NaN/inf, is deleted, counted as healed and extracted again by the caller; one this process may not
read is a miss, never deleted.

The manifest records, per encoder, its identity, storage dtype, entry shape and, per entry, the
image it came from. Each process appends lines to its own journal (the line before the entry is
renamed into place, so no entry goes unlisted), which costs O(1) per entry and needs no lock;
readers merge every journal. Compaction folds finished journals into one file now and then; it only
ever creates new files and deletes files whose lines it has copied and whose writer is gone, so two
compactions at once, or a file system that ignores locks, lose nothing. Every journal starts with
the tool's name: files without it are never read, rewritten or deleted.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boxrefiner.config import Config
from boxrefiner.errors import UserError
from boxrefiner.features.encoder import (
    EMBED_DIM,
    PATCH,
    EncoderIdentity,
    encoder_identity,
)
from boxrefiner.features.storage import Storage
from boxrefiner.utils.allocator import gc_paused
from boxrefiner.utils.files import (
    STALE_TEMP_SECONDS,
    atomic_write,
    remove_stale_temps,
    write_json,
)
from boxrefiner.utils.journal import FORMAT, TOOL, Journal

log = logging.getLogger(__name__)

MARKER = ".boxrefiner-cache"
JOURNALS = "manifest"
LEGACY_MANIFEST = "manifest.json"  # written whole by versions before 0.3; read, never written
KEY_LENGTH = 40
_KEY_FILE = re.compile(rf"^[0-9a-f]{{{KEY_LENGTH}}}\.npy$")
_NPY_HEADER = 128  # bytes numpy writes before the data of a small-header .npy


class CacheError(UserError):
    """The cache cannot be used as configured (e.g. no room on disk); one-line message."""


def cache_tag(identity: EncoderIdentity, storage_dtype: str) -> str:
    """Names one encoder identity + storage dtype in the manifests."""
    import hashlib
    return hashlib.sha256(f"{identity.key}|{np.dtype(storage_dtype).name}".encode()).hexdigest()[:16]


def is_marked(root: Path) -> bool:
    return (root / MARKER).is_file()


def mark_root(root: Path) -> None:
    """Mark a cache root as this tool's when the tool creates it (or finds it empty but for dotfiles
    such as .gitkeep, or holding only an older version's cache); a folder with other content stays
    unmarked, and `--clear-cache` then deletes only the entries the manifests list."""
    if is_marked(root):
        return
    if root.is_dir():
        content = [p for p in root.iterdir() if not p.name.startswith(".")]
        ours = all(p.is_dir() and ((p / JOURNALS).is_dir() or (p / LEGACY_MANIFEST).is_file()) for p in content)
        if not ours:
            log.info("feature cache %s was not created by this tool: clearing it deletes only the entries "
                     "its manifests list", root)
            return
    write_json(root / MARKER, {"tool": TOOL, "format": FORMAT, "created": time.time()})


# --- manifest ------------------------------------------------------------------------------------


@dataclass
class EncoderEntries:
    """One encoder's part of a split's manifest."""
    info: dict = field(default_factory=dict)  # identity, label, storage_dtype, shape
    entries: dict[str, dict] = field(default_factory=dict)  # key -> {file, width, height}


def _legacy_events(folder: Path) -> list[dict]:
    """The manifest.json of versions before 0.3, as events older than any journal's."""
    try:
        manifest = json.loads((folder / LEGACY_MANIFEST).read_text())
        encoders = manifest["encoders"]
        events: list[dict] = []
        for tag, enc in encoders.items():
            info = {k: enc[k] for k in ("identity", "label", "storage_dtype", "shape") if k in enc}
            events.append({"op": "encoder", "tag": str(tag), **info})
            events += [{"op": "add", "t": 0.0, "tag": str(tag), "key": str(key), **(rec if isinstance(rec, dict) else {})}
                       for key, rec in dict(enc.get("entries", {})).items()]
        return events
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, or not the old format
        return []


def merge(events: Iterable[dict]) -> dict[str, EncoderEntries]:
    """Apply events in time order: `add` lists an entry, `forget` drops a tag's (or, with tag null,
    every) entry listed before it."""
    encoders: dict[str, EncoderEntries] = {}
    forgotten: dict[str | None, float] = {}
    adds = []
    for event in events:
        op, tag = event.get("op"), event.get("tag")
        if op == "encoder" and isinstance(tag, str):
            encoders.setdefault(tag, EncoderEntries()).info = {k: v for k, v in event.items() if k not in ("op", "tag")}
        elif op == "forget" and (tag is None or isinstance(tag, str)):
            forgotten[tag] = max(forgotten.get(tag, 0.0), float(event.get("t", 0.0)))
        elif op == "add" and isinstance(tag, str) and isinstance(event.get("key"), str):
            adds.append(event)
    for event in adds:
        tag = event["tag"]
        if float(event.get("t", 0.0)) < max(forgotten.get(tag, -1.0), forgotten.get(None, -1.0)):
            continue
        record = {k: v for k, v in event.items() if k in ("t", "file", "width", "height")}
        encoders.setdefault(tag, EncoderEntries()).entries[event["key"]] = record
    return encoders


class Manifest:
    """A split folder's manifest: every journal merged on read; this process appends to its own."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.journal = Journal(self.folder / JOURNALS)
        self._declared: set[str] = set()

    @property
    def written(self) -> int:
        """Events this process appended."""
        return self.journal.written

    def _legacy(self) -> list[dict]:
        return _legacy_events(self.folder)

    def read(self) -> dict[str, EncoderEntries]:
        with gc_paused():  # a line per entry: linear in the entries
            return merge(self.journal.events(self._legacy)[0])

    def add(self, tag: str, info: dict, entries: dict[str, dict]) -> None:
        now = time.time()
        events = [] if tag in self._declared else [{"op": "encoder", "tag": tag, **info}]
        self._declared.add(tag)
        self.journal.append(events + [{"op": "add", "t": now, "tag": tag, "key": key, **rec}
                                      for key, rec in entries.items()])

    def forget(self, tag: str | None) -> None:
        """Every entry of `tag` (None: of every encoder) listed so far is gone."""
        self.journal.append([{"op": "forget", "t": time.time(), "tag": tag}])

    def close(self, compact: bool = True) -> None:
        """Close this process's journal; then fold finished journals together when there are enough."""
        if not self.journal.close() or not compact:
            return
        try:
            self.compact()
        except OSError as exc:  # a read-only or vanished folder: the journals stay as they are
            log.debug("manifest %s not compacted: %s", self.journal.folder, exc)

    def compact(self, force: bool = False) -> bool:
        """Fold the journals of finished writers (and older compactions) into one new file."""
        return self.journal.compact(_folded, force, self._legacy)


def _folded(events: list[dict]) -> list[dict]:
    """The merged state as events: each encoder, its entries (with their times), and the latest
    forget per tag, which stays: a journal still being written may hold older lines it must hide."""
    lines: list[dict] = []
    for tag, enc in sorted(merge(events).items()):
        lines.append({"op": "encoder", "tag": tag, **enc.info})
        lines += [{"op": "add", "tag": tag, "key": k, **r} for k, r in enc.entries.items()]  # r keeps its t
    forgets: dict[Any, dict] = {}
    for event in (e for e in events if e.get("op") == "forget"):
        if float(event.get("t", 0.0)) >= float(forgets.get(event.get("tag"), {}).get("t", -1.0)):
            forgets[event.get("tag")] = event
    return list(forgets.values()) + lines


# --- entries ------------------------------------------------------------------------------------


@dataclass
class CacheStats:
    """What this process read: bad entries deleted (healed) and bytes of good entries."""
    healed: int = 0
    bytes_read: int = 0


class FeatureCache:
    """One split's entries for one encoder identity and storage dtype."""

    def __init__(self, cache_dir: str | Path, split: str, identity: EncoderIdentity, storage_dtype: str = "float16"):
        self.root = Path(cache_dir)
        self.dir = self.root / split
        self.identity = identity
        grid = identity.input_size // PATCH
        self.shape = (EMBED_DIM, grid, grid)
        self.storage = Storage(storage_dtype, self.shape)
        self.dtype = self.storage.value_dtype  # what a read hands out (float16 for int8 entries)
        self._salt = f"{identity.key}|{np.dtype(storage_dtype).name}"
        self.tag = cache_tag(identity, storage_dtype)
        self.stats = CacheStats()
        self.manifest = Manifest(self.dir)
        self.info = {"identity": asdict(identity), "label": identity.short(), "storage_dtype": self.storage.name,
                     "shape": list(self.shape)}
        self._root_ready = False

    @property
    def entry_bytes(self) -> int:
        return self.storage.disk_bytes + _NPY_HEADER

    def key_for(self, image_digest: str) -> str:
        import hashlib
        return hashlib.sha256(f"{image_digest}|{self._salt}".encode()).hexdigest()[:KEY_LENGTH]

    def path(self, key: str) -> Path:
        return entry_paths(self.dir, key)[0]

    def find(self, key: str) -> Path | None:
        """Where the entry lies: its key-prefix subfolder, or the flat folder of older versions."""
        for path in entry_paths(self.dir, key):
            if path.is_file():
                return path
        return None

    def _bad(self, path: Path, reason: str, count: bool = True) -> None:
        log.warning("feature cache: %s is %s; deleting it so that it is extracted again", path, reason)
        path.unlink(missing_ok=True)
        self.stats.healed += count

    def load(self, key: str, count: bool = True) -> np.ndarray | None:
        """The stored array, or None: a miss. A bad entry (unreadable, wrong shape or dtype, NaN/inf) is
        deleted and counted as healed; one this process may not read is left alone, with a warning.

        DataLoader workers pass count=False: their counters would die with them, so the loader counts."""
        path = self.find(key)
        if path is None:
            return None
        try:
            arr = np.load(path)
        except PermissionError:
            log.warning("feature cache: %s cannot be read by this user; treating it as missing (not deleting it)", path)
            return None
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError) as exc:
            self._bad(path, f"unreadable ({exc})", count)
            return None
        disk = self.storage
        if arr.shape != disk.disk_shape or arr.dtype != disk.disk_dtype:
            self._bad(path, f"of shape {arr.shape} {arr.dtype}, expected {disk.disk_shape} {disk.disk_dtype}", count)
            return None
        arr = disk.decode(arr)
        if not np.isfinite(arr).all():
            self._bad(path, "not finite (NaN or inf values)", count)
            return None
        if count:
            self.stats.bytes_read += disk.disk_bytes
        return arr

    def save(self, key: str, features: np.ndarray, record: dict) -> np.ndarray | None:
        """Store one map atomically in the storage dtype and list it in the manifest (`record`: the
        image's file, width, height); returns exactly what a read will return, or None (nothing
        written) when the features or their stored values would not be finite."""
        if features.shape != self.shape:
            raise ValueError(f"feature shape {features.shape} does not match the cache's {self.shape}")
        batch = torch.from_numpy(np.asarray(features))[None]
        if not bool(self.storage.fits(batch)[0]):
            return None
        encoded = self.storage.encode_batch(batch)[0].numpy()
        self.write(key, encoded, record)
        return self.storage.decode(encoded)

    def write(self, key: str, encoded: np.ndarray, record: dict) -> None:
        """Write an entry's array as `storage.encode_batch` made it (from maps that `storage.fits`),
        atomically, listed in the manifest first: a kill cannot orphan it."""
        if encoded.shape != self.storage.disk_shape or encoded.dtype != self.storage.disk_dtype:
            raise ValueError(f"entry array {encoded.shape} {encoded.dtype} is not the cache's "
                             f"{self.storage.disk_shape} {self.storage.disk_dtype}")
        if not self._root_ready:
            if not self.root.is_dir():
                self.root.mkdir(parents=True, exist_ok=True)
            mark_root(self.root)
            self._root_ready = True
        self.manifest.add(self.tag, self.info, {key: record})
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.save(f, encoded))

    def listed(self) -> dict[str, dict]:
        """This encoder's entries according to the manifest (verified only when read)."""
        encoder = self.manifest.read().get(self.tag)
        return encoder.entries if encoder else {}

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

    def remove_stale_temps(self) -> None:
        files, size = remove_stale_temps(self.dir, recursive=True)
        if files:
            log.info("feature cache %s: removed %d temp files (%.1f MiB) left by killed writers", self.dir, files,
                     size / 2**20)


def entry_paths(folder: Path, key: str) -> tuple[Path, Path]:
    """Where a split folder's entry may lie: its key-prefix subfolder (written), or flat (older versions)."""
    return folder / key[:2] / f"{key}.npy", folder / f"{key}.npy"


def _remove(path: Path) -> int | None:
    """Delete one file; its size, or None when it was already gone (other OSErrors propagate)."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return None
    return size


def _entry_files(folder: Path) -> Iterable[Path]:
    """Files named like this tool's entries in a split folder (flat and key-prefix subfolders)."""
    for path in folder.glob("*.npy"):
        if _KEY_FILE.match(path.name):
            yield path
    for sub in folder.iterdir():
        if sub.is_dir() and re.fullmatch(r"[0-9a-f]{2}", sub.name):
            yield from (p for p in sub.glob("*.npy") if _KEY_FILE.match(p.name) and p.name.startswith(sub.name))


def clear_cache(cache_dir: str | Path, tag: str | None = None) -> tuple[int, int]:
    """Delete entries of one encoder (`tag`, found through the manifests) or, with tag None, of every
    encoder, in every split; returns (files, bytes). Only this tool's files go: in a cache root it did
    not create, only the entries its manifests list."""
    root = Path(cache_dir)
    files = size = 0
    if not root.is_dir():
        return 0, 0
    marked = is_marked(root)
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        manifest = Manifest(folder)
        encoders = manifest.read()
        if not encoders and not marked:
            continue  # nothing of ours here
        listed = {key for t, enc in encoders.items() if tag is None or t == tag for key in enc.entries}
        doomed = {p for key in listed for p in entry_paths(folder, key)}
        if tag is None and marked:  # also entries no manifest lists (e.g. from versions without journals)
            doomed |= set(_entry_files(folder))
            stale, stale_bytes = remove_stale_temps(folder, recursive=True)
            files, size = files + stale, size + stale_bytes
        for path in doomed:
            freed = _remove(path)
            if freed is not None:
                files, size = files + 1, size + freed
        if encoders or listed:
            manifest.forget(tag)
            manifest.close()
    return files, size


def read_manifest(folder: Path) -> dict[str, EncoderEntries]:
    """A split folder's merged manifest (for tools and tests)."""
    return Manifest(folder).read()


def clear_features(cfg: Config, every_encoder: bool) -> None:
    """Clear the cache: this run's encoder's entries in every split, or (`every_encoder`) every entry."""
    cache_cfg = cfg.optimization.feature_cache
    if every_encoder:
        files, size = clear_cache(cache_cfg.cache_dir)
        whose = "every encoder"
    else:
        identity = encoder_identity(cfg.hqsam, memo_dir=cache_cfg.cache_dir)
        files, size = clear_cache(cache_cfg.cache_dir, cache_tag(identity, cache_cfg.storage_dtype))
        whose = identity.short()
    log.info("cleared the cache: removed %d feature files (%.1f MiB) of %s from %s", files, size / 2**20, whose,
             cache_cfg.cache_dir)


@dataclass
class Orphans:
    """What `clear_orphans` removed."""
    unlisted: int = 0  # entry files no manifest lists
    obsolete: int = 0  # entries of encoder identities this version no longer produces
    bytes: int = 0
    failed: int = 0  # files that could not be deleted (e.g. a read-only cache)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("inf")


def _obsolete(info: dict) -> bool:
    """Whether a manifest's encoder is one an older version produced and this one never serves (a
    newer version's identity, or an unknown form, is kept)."""
    try:
        return EncoderIdentity(**info["identity"]).retired
    except (KeyError, TypeError):
        return False


def clear_orphans(cache_dir: str | Path) -> Orphans:
    """Delete the entries no manifest lists (in a cache root this tool created: elsewhere only listed
    files are known to be its own) and every entry of an encoder identity this version no longer
    produces, in every split. Files are listed before the manifests are read: a writer lists an entry
    before renaming it into place, so an entry written meanwhile is never taken for an orphan."""
    root = Path(cache_dir)
    removed = Orphans()
    if not root.is_dir():
        return removed
    marked = is_marked(root)
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        on_disk = {p.stem: p for p in _entry_files(folder)} if marked else {}
        manifest = Manifest(folder)
        encoders = manifest.read()
        old = {tag for tag, enc in encoders.items() if _obsolete(enc.info)}
        kept = {key for tag, enc in encoders.items() if tag not in old for key in enc.entries}
        retired = {key for tag in old for key in encoders[tag].entries} - kept
        recent = time.time() - STALE_TEMP_SECONDS  # an unlisted entry this young may be another host's, listed
        doomed = [(p, "unlisted") for key, p in on_disk.items()  # in a journal a shared file system still lags on
                  if key not in kept and key not in retired and _mtime(p) < recent]
        doomed += [(p, "obsolete") for key in retired for p in entry_paths(folder, key)]
        for path, why in doomed:
            try:
                freed = _remove(path)
            except OSError as exc:
                removed.failed += 1
                log.warning("cannot delete %s: %s", path, exc.strerror or exc)
                continue
            if freed is not None:
                removed.bytes += freed
                setattr(removed, why, getattr(removed, why) + 1)
        for tag in sorted(old):
            manifest.forget(tag)
        manifest.close()
    return removed


def clear_orphaned_features(cfg: Config) -> Orphans:
    """`clear_orphans` on the configured cache, said in the log."""
    cache_dir = cfg.optimization.feature_cache.cache_dir
    removed = clear_orphans(cache_dir)
    log.info("cleared orphaned cache entries in %s: %d that no manifest lists (older than a day), %d of encoders "
             "this version no longer produces; %.1f MiB freed%s", cache_dir, removed.unlisted, removed.obsolete,
             removed.bytes / 2**20, f"; {removed.failed} could not be deleted" if removed.failed else "")
    return removed
