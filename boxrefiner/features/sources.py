"""Where embeddings come from during training: the cache (in memory or streamed) or the encoder.

With the cache on, `warm_up` extracts every missing entry once, in batches, before training. Epochs
then read only cached values: from one in-memory tensor when the split fits the RAM (or GPU) budget,
else streamed from the `.npy` files by DataLoader workers. With the cache off, the encoder runs on
every batch: the original behaviour, kept as the baseline that the speed-ups are measured against.

Entries are per image, batches per object: a batch holds the maps of the images its objects lie on,
each once, and every object says which one it looks at (`FeatureBatch.image_index`).

An image that stops decoding, or whose features are not finite even when extracted again, is
excluded with its objects (listed in skipped.jsonl), but they keep their indices: batches are cut
from the same permutation whether that was found at warm-up or in the middle of a run, so resuming
stays exact.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    Sampler,
    SequentialSampler,
)

from boxrefiner.config import Config
from boxrefiner.data.images import readable
from boxrefiner.data.splits import ImageRecord, SplitData
from boxrefiner.features.cache import FeatureCache
from boxrefiner.features.decode import ImageDataset, image_batches
from boxrefiner.features.encoder import (
    EncoderIdentity,
    ImageEncoder,
    build_encoder,
    encoder_identity,
)
from boxrefiner.features.reader import BatchStream, EntryReader
from boxrefiner.features.storage import Storage
from boxrefiner.utils import distributed
from boxrefiner.utils.files import sha256_file
from boxrefiner.utils.progress import progress
from boxrefiner.utils.signals import (
    Interrupted,
    StopRequest,
    ignore_stop_signals,
    reap_workers_at_exit,
    stop_requested,
    stop_signals_blocked,
)

log = logging.getLogger(__name__)


def unique_in_order(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values in order of first appearance, and each value's position among them."""
    distinct, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((len(distinct),), len(values), dtype=torch.long).scatter_reduce_(
        0, inverse, torch.arange(len(values)), "amin")
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return distinct[order], rank[inverse]


def batch_images(object_image: torch.Tensor, objects: list[int] | torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's objects as a tensor, the images they lie on (each once, in order of first appearance)
    and each object's position among those images."""
    picked = torch.as_tensor(objects, dtype=torch.long)
    images, inverse = unique_in_order(object_image[picked])
    return picked, images, inverse


@dataclass
class FeatureBatch:
    """A batch of objects and their images' embeddings, each image's map once however many objects
    it holds: object k looks at `features[image_index[k]]`."""
    objects: torch.Tensor  # (B,) object indices into the split
    features: torch.Tensor  # (U, C, H, W) on the training device
    image_index: torch.Tensor  # (B,) row of `features` of each object

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def one_per_image(self) -> bool:
        """Whether object k looks at features[k] (then the head needs no index)."""
        return len(self.features) == len(self.objects)


def _keep(objects: torch.Tensor, inverse: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The objects where `keep` is set, their new image positions, and which of the batch's images
    (positions into its per-image tensors) they still look at."""
    used, inverse = unique_in_order(inverse[keep])
    return objects[keep], inverse, used


class ImageBatchDataset(Dataset):
    """One batch of objects per item: their images decoded and preprocessed (each once), and the
    images that do not decode."""

    def __init__(self, paths: Sequence[Path], input_size: int, object_image: torch.Tensor):
        self.images = ImageDataset(paths, input_size)
        self.object_image = object_image

    def __len__(self) -> int:
        return len(self.object_image)

    def __getitem__(self, objects: list[int]):
        picked, images, inverse = batch_images(self.object_image, objects)
        decoded = [self.images[i][1] for i in images.tolist()]
        bad = torch.tensor([not t.numel() for t in decoded], dtype=torch.bool)
        good = [t for t in decoded if t.numel()]
        pixels = torch.stack(good) if good else torch.empty(0)
        return picked, images, inverse, pixels, bad


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype)).dtype


class EpochShuffle(Sampler):
    """A permutation that depends only on (seed, epoch): the same order with any number of workers."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Also skip the first `skip` objects of this epoch's order (continuing an interrupted epoch)."""
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[self.skip:].tolist())

    def __len__(self) -> int:
        return self.size - self.skip


class RankShare(Sampler):
    """This rank's part of each global batch of an EpochShuffle order: global batch k's objects
    [k*B, (k+1)*B) split into `world` contiguous pieces, piece `rank` for this rank, so that the ranks
    together train on exactly the one-process batches. A last global batch with fewer objects than
    ranks is left out (a rank without objects would stall the others' gradient exchange)."""

    def __init__(self, order: EpochShuffle, global_batch: int, rank: int, world: int):
        self.order, self.global_batch, self.rank, self.world = order, global_batch, rank, world

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.order.set_epoch(epoch, skip)

    @property
    def objects_per_epoch(self) -> int:
        return sum(len(p) for p in self._pieces(self.order.size))

    def _pieces(self, size: int) -> list[range]:
        pieces = []
        for start in range(0, size, self.global_batch):
            count = min(self.global_batch, size - start)
            if count < self.world:
                break
            base, extra = divmod(count, self.world)
            first = start + self.rank * base + min(self.rank, extra)
            pieces.append(range(first, first + base + (self.rank < extra)))
        return pieces

    def __iter__(self) -> Iterator[int]:
        order = list(self.order)  # the epoch's order after any skipped global batches
        return iter([order[i] for piece in self._pieces(len(order)) for i in piece])

    def __len__(self) -> int:
        return sum(len(p) for p in self._pieces(len(self.order)))


class Strided(Sampler):
    """Every world-th object from this rank's: a disjoint validation shard (each object counted once)."""

    def __init__(self, size: int, rank: int, world: int):
        self.indices = list(range(rank, size, world))
        self.objects_per_epoch = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _StopSafeLoader(DataLoader):
    """A DataLoader whose workers start with SIGINT/SIGTERM held back (see `stop_signals_blocked`)."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        with stop_signals_blocked():
            return super()._get_iterator()


def make_loader(dataset: Dataset, batch_size: int | None, num_workers: int, device: torch.device,
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
    """What `extract` did: the stored arrays (with `keep`) and the images it could not store, with why."""
    stored: dict[int, np.ndarray] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # index -> unreadable_image | nonfinite_features


def entry_record(image: ImageRecord) -> dict:
    return {"file": image.file_name, "width": image.width, "height": image.height}


def extract(cache: FeatureCache, records: Sequence[ImageRecord], keys: Sequence[str], indices: Sequence[int],
            encoder: ImageEncoder, batch_size: int, num_workers: int, bar_desc: str | None = None,
            keep: bool = False, stop: StopRequest | None = None) -> Extraction:
    """Encode the given images and store them. Features that are not finite are encoded once more,
    alone; if they still are not, nothing is stored and the sample fails. With `stop`, a requested
    stop ends the work after the batch in hand (every entry written is complete and listed).

    Threads decode ahead of the encoder and one thread writes behind it, so the encoder waits for
    neither (on a GPU, writing a batch's entries costs as much as encoding it). The maps are encoded
    for storage where the encoder ran (`Storage.encode_batch`): from a GPU, float16 and int8 entries
    copy half and a quarter of float32's bytes, and the writing thread only writes them.
    (On the CPU, alternating the phases instead, so that the encoder never shares its cores, measured
    no faster: 0.91-0.94 of the bare encoder's images/s either way, vit_tiny on 2 cores.)"""
    subset = [records[i] for i in indices]
    batches = image_batches([s.image_path for s in subset], cache.identity.input_size, batch_size, num_workers,
                            pin=encoder.device.type == "cuda")
    result = Extraction()
    writes: deque[tuple[int, Future]] = deque()

    def write(key: str, encoded: np.ndarray, record: ImageRecord) -> np.ndarray | None:
        cache.write(key, encoded, entry_record(record))
        return cache.storage.decode(encoded) if keep else None

    def settle(behind: int) -> None:  # collect the writes older than the last `behind` (their errors raise here)
        while len(writes) > behind:
            index, done = writes.popleft()
            stored = done.result()
            if stored is not None:  # (keep)
                result.stored[index] = stored

    with progress(total=len(subset), desc=bar_desc, unit="img", disable=bar_desc is None) as bar, \
            ThreadPoolExecutor(1, thread_name_prefix="boxrefiner-write") as writer:
        for batch in batches:
            result.failed.update((indices[p], "unreadable_image") for p in batch.bad)
            if batch.positions:
                encoded, problems = encode_for_storage(encoder, cache.storage, batch.normalised(encoder.device))
                for position, entry, problem in zip(batch.positions, encoded, problems):
                    index = indices[position]
                    if problem is not None:
                        log.warning("%s: %s; leaving the image out", records[index].image_path, problem)
                        result.failed[index] = "nonfinite_features"
                    else:
                        writes.append((index, writer.submit(write, keys[index], entry, records[index])))
            settle(behind=2 * batch_size)
            bar.update(len(batch.positions) + len(batch.bad))
            if stop_requested(stop):  # every entry written so far is complete and listed
                break
        settle(behind=0)
    return result


def encode_for_storage(encoder: ImageEncoder, storage: Storage, images: torch.Tensor) -> tuple[np.ndarray, list[str | None]]:
    """The entries' arrays of a batch, encoded for storage on the encoder's device, and per image what
    keeps it out of the cache (None: nothing). Maps that are not finite are encoded once more, alone."""
    features = encoder.encode(images)
    fits = storage.fits(features).tolist()
    if all(fits):  # the usual case: one reduction, nothing else to tell
        return storage.encode_batch(features).cpu().numpy(), [None] * len(fits)
    finite = torch.isfinite(features).flatten(1).all(dim=1).tolist()
    if not all(finite):
        features = torch.cat([features[k:k + 1] if ok else encoder.encode(images[k:k + 1])
                              for k, ok in enumerate(finite)])
        fits = storage.fits(features).tolist()
        finite = torch.isfinite(features).flatten(1).all(dim=1).tolist()
    problems = [None if ok else
                "its features are not finite (NaN or inf), also when encoded again" if not finite[k] else
                f"its features do not fit {storage.name} storage" for k, ok in enumerate(fits)]
    return storage.encode_batch(features).cpu().numpy(), problems


def warm_up(cache: FeatureCache, records: Sequence[ImageRecord], keys: Sequence[str],
            get_encoder: Callable[[], ImageEncoder], batch_size: int, num_workers: int,
            stop: StopRequest | None = None, census: bool = False) -> tuple[int, int, dict[int, str]]:
    """Extract every entry the manifest does not list; returns (found, extracted, failed images).

    Listed entries are trusted here and verified when read; an entry on disk that no manifest lists
    (written by a version before journals) is listed now instead of extracted again. Under torchrun
    rank 0 decides what is missing and every rank encodes its own disjoint share of it (no image
    twice, no padding); the counts and failures returned are the whole world's."""
    missing: list[int] = distributed.broadcast(_plan(cache, records, keys, census) if distributed.is_main() else [])
    hits = len(keys) - len(missing)
    log.info("feature cache %s: %d of %d entries present (%.0f%%), %d to extract%s", cache.dir, hits, len(keys),
             100.0 * hits / max(1, len(keys)), len(missing),
             f" ({len(missing) * cache.entry_bytes / 2**20:.0f} MiB)" if missing else "")
    cache.ensure_room(len(missing))
    mine = distributed.shard(missing)
    if distributed.world() > 1 and missing:
        log.info("distributed extraction: %d ranks, %d images each at most", distributed.world(), len(missing[0::distributed.world()]))
    failed: dict[int, str] = {}
    try:
        if mine:
            failed = extract(cache, records, keys, mine, get_encoder(), batch_size, num_workers,
                             bar_desc=f"Extracting {cache.dir.name}" if distributed.is_main() else None, stop=stop).failed
    finally:
        cache.manifest.close()
    if distributed.any_rank(stop_requested(stop)):  # every rank stops here, also one that had finished its share
        raise Interrupted(distributed.first_set(stop.signum if stop is not None else None) or signal.SIGTERM,
                          where="feature extraction")
    for theirs in distributed.gather(failed):  # every rank leaves out the same images
        failed.update(theirs)
    failed_keys = {keys[i]: reason for i, reason in failed.items()}  # copies of a failed image fail with it
    extracted = sum(keys[i] not in failed_keys for i in missing)
    return hits, extracted, {i: failed_keys[k] for i, k in enumerate(keys) if k in failed_keys}


def _plan(cache: FeatureCache, records: Sequence[ImageRecord], keys: Sequence[str],
          census: bool = False) -> list[int]:
    """The images to extract. An entry on disk that no manifest lists is listed here instead; the
    manifest is read once (`census`: and what it holds for other encoders is said)."""
    encoders = cache.manifest.read()
    listed = encoders[cache.tag].entries if cache.tag in encoders else {}
    if census:
        log.info("auto-detect %s: %d entries for %s, %d for other encoders", cache.dir, len(listed),
                 cache.identity.short(), sum(len(e.entries) for t, e in encoders.items() if t != cache.tag))
    missing, unlisted, queued = [], {}, set()
    for i, key in enumerate(keys):
        if key in listed or key in queued:
            continue
        if cache.find(key) is not None:
            unlisted[key] = entry_record(records[i])
        else:
            missing.append(i)
            queued.add(key)
    if unlisted:
        try:
            cache.manifest.add(cache.tag, cache.info, unlisted)
        except OSError as exc:  # a read-only cache: they are found by key all the same
            log.debug("cannot list %d entries in %s: %s", len(unlisted), cache.dir, exc)
    if missing:
        cache.remove_stale_temps()
    return missing


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


def object_batches(size: int, batch_size: int, sampler: Sampler | None) -> BatchSampler:
    """Batches of object indices: the sampler's order (the split's order without one), cut in turn."""
    return BatchSampler(sampler if sampler is not None else SequentialSampler(range(size)), batch_size, drop_last=False)


class FeatureBatches:
    """Common interface: iterate FeatureBatch (objects, their images' embeddings on the device); count
    where the features came from."""

    from_cache = True

    def __init__(self, split: SplitData, batch_size: int, sampler: Sampler | None):
        self.split = split
        self.batch_size = batch_size
        self.size = len(split.objects)
        self.per_epoch = getattr(sampler, "objects_per_epoch", self.size)  # this rank's objects (a shard's)
        self.sampler = sampler
        self.object_image = split.object_image
        self.cache_reads = 0  # objects whose features were served from the cache, cumulative
        self.maps_read = 0  # image entries read from disk while training, cumulative
        self.encoded = 0  # objects whose features the encoder computed while training (cache off, or a broken entry)
        self.healed = 0  # entries found bad while reading and extracted again, cumulative

    def __len__(self) -> int:
        return (self.per_epoch + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[FeatureBatch]:
        raise NotImplementedError

    def _planned(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each batch's usable objects, the images they lie on and each object's image position."""
        for objects in object_batches(self.size, self.batch_size, self.sampler):
            picked = torch.tensor(objects, dtype=torch.long)
            yield batch_images(self.object_image, picked[self._usable(picked)])

    def _usable(self, objects: torch.Tensor) -> torch.Tensor:
        """Rows of a batch whose image is not excluded."""
        if not self.split.excluded:
            return torch.ones(len(objects), dtype=torch.bool)
        return torch.tensor([int(i) not in self.split.excluded for i in self.object_image[objects]], dtype=torch.bool)


class InMemoryFeatures(FeatureBatches):
    """The whole split's images in one tensor (float32 when it fits, else the storage dtype), gathered
    per batch into a reused float32 buffer: a fresh 64 MiB batch would cost more in page faults than
    the copy. A store in host RAM while training on CUDA gathers into pinned buffers, copied to the GPU
    asynchronously (two, so that one fills while the other's copy is in flight). A batch's features
    are valid until the next batch is asked for (the buffer is then refilled)."""

    def __init__(self, store: torch.Tensor, split: SplitData, batch_size: int, device: torch.device,
                 sampler: Sampler | None = None):
        super().__init__(split, batch_size, sampler)
        self.store = store
        self.device = device
        staged = store.device.type == "cpu" and device.type == "cuda"
        self.buffers = [torch.empty((batch_size, *store.shape[1:]), dtype=torch.float32, device=store.device,
                                    pin_memory=staged) for _ in range(2 if staged else 1)]
        self.copied: list[torch.cuda.Event | None] = [None] * len(self.buffers)

    def __iter__(self) -> Iterator[FeatureBatch]:
        for step, (picked, images, inverse) in enumerate(self._planned()):
            slot = step % len(self.buffers)
            copied = self.copied[slot]
            if copied is not None:
                copied.synchronize()  # the GPU has its copy of what this buffer held
            batch = self.buffers[slot][:len(images)]
            if self.store.dtype == batch.dtype:
                torch.index_select(self.store, 0, images.to(self.store.device), out=batch)
            else:
                for row, image in zip(batch, images.tolist()):
                    row.copy_(self.store[image])
            self.cache_reads += len(picked)
            features = batch.to(self.device, non_blocking=True)
            if features.data_ptr() != batch.data_ptr():  # staged: the buffer is free once the copy is done
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))  # the stream the copy was queued on
                self.copied[slot] = event
            yield FeatureBatch(picked, features, inverse)


Healer = Callable[[list[int]], dict[int, np.ndarray]]


class StreamedFeatures(FeatureBatches):
    """Entries read from disk a few batches ahead by reader threads into reused float32 buffers
    (`reader.BatchStream`); an entry that turns out bad is re-extracted here."""

    def __init__(self, cache: FeatureCache, keys: Sequence[str], split: SplitData, heal: Healer, batch_size: int,
                 num_workers: int, device: torch.device, sampler: Sampler | None = None):
        super().__init__(split, batch_size, sampler)
        self.stream = BatchStream(cache, keys, max(2, num_workers), batch_size, pin=device.type == "cuda")
        self.heal = heal
        self.device = device

    def __iter__(self) -> Iterator[FeatureBatch]:
        for read in self.stream.batches(self._planned()):
            # images excluded since this batch was planned (an entry that could not be healed) drop out
            objects, inverse, used = _keep(read.objects, read.inverse, self._usable(read.objects))
            images, features, bad = read.images[used], read.features, read.bad[used]
            if len(used) < len(read.images):
                features = features[used]
            lost = torch.zeros(len(images), dtype=torch.bool)
            broken = bad.nonzero().flatten().tolist()
            if broken:
                fresh = self.heal([int(images[p]) for p in broken])
                for p in broken:
                    if int(images[p]) in fresh:
                        features[p] = torch.from_numpy(fresh[int(images[p])])
                    else:
                        lost[p] = True
                self.healed += len(broken)
                self.encoded += int(bad[inverse].sum())
            self.cache_reads += int((~bad[inverse]).sum())
            self.maps_read += int((~bad).sum())
            if bool(lost.any()):
                objects, inverse, used = _keep(objects, inverse, ~lost[inverse])
                features = features[used]
            on_device = features.to(self.device, non_blocking=True)
            if self.device.type == "cuda" and on_device.data_ptr() != features.data_ptr():
                read.done = torch.cuda.Event()  # the ring buffer is refilled only once this copy is done
                read.done.record(torch.cuda.current_stream(self.device))
            yield FeatureBatch(objects, on_device, inverse)


class EncodedFeatures(FeatureBatches):
    """The encoder on every batch (cache off)."""

    from_cache = False

    def __init__(self, split: SplitData, encoder: ImageEncoder, precision: str | None, batch_size: int,
                 num_workers: int, sampler: Sampler | None = None):
        super().__init__(split, batch_size, sampler)
        dataset = ImageBatchDataset([s.image_path for s in split.images], encoder.identity.input_size, self.object_image)
        self.loader = make_loader(dataset, None, num_workers, encoder.device, object_batches(self.size, batch_size, sampler))
        self.encoder = encoder
        self.precision = precision

    def __iter__(self) -> Iterator[FeatureBatch]:
        for objects, images, inverse, pixels, bad in self.loader:
            for image in images[bad].tolist():  # images were checked before training; one that broke since cannot stop a run
                self.split.exclude(image, "unreadable_image")
            if not bool(self._usable(objects).any()):  # an empty batch: the schedule still counts its step
                empty = objects[:0]
                yield FeatureBatch(empty, torch.empty((0, *pixels.shape[1:])), empty)
                continue
            features = self.encoder.encode(pixels, self.precision)  # the decodable images, in order
            decoded = images[~bad]
            finite = torch.isfinite(features).flatten(1).all(dim=1).cpu()
            for image in decoded[~finite].tolist():
                log.warning("%s: its features are not finite (NaN or inf); leaving the image out",
                            self.split.images[image].image_path)
                self.split.exclude(image, "nonfinite_features")
            rows = torch.full((len(images),), -1, dtype=torch.long)
            rows[(~bad).nonzero().flatten()] = torch.arange(len(decoded))
            objects, inverse, used = _keep(objects, rows[inverse], self._usable(objects))
            self.encoded += len(objects)
            yield FeatureBatch(objects, features[used.to(features.device)], inverse)


class FeatureSources:
    """Train/val feature batches plus the encoder, which is built only if something needs it."""

    def __init__(self, cfg: Config, device: torch.device, train: SplitData, val: SplitData, amp: str,
                 stop: StopRequest | None = None, extract_only: bool = False):
        self.cfg = cfg
        self.device = device
        self.stop = stop
        cache_cfg = cfg.optimization.feature_cache
        self.identity: EncoderIdentity = encoder_identity(cfg.hqsam, memo_dir=cache_cfg.cache_dir)
        self._encoder: ImageEncoder | None = None
        self.caches: dict[str, FeatureCache] = {}
        self.found = 0  # entries present in the cache when the run started
        self.extracted = 0  # entries extracted before training
        world, rank = distributed.world(), distributed.rank()
        batch_sizes = (cfg.training.batch_size // world, cfg.evaluation.batch_size or cfg.training.batch_size)
        self.train_sampler: EpochShuffle | RankShare = EpochShuffle(len(train.objects), cfg.training.seed)
        if world > 1:  # the global batch, split across the ranks
            self.train_sampler = RankShare(self.train_sampler, cfg.training.batch_size, rank, world)
        val_sampler = Strided(len(val.objects), rank, world) if world > 1 else None
        self.train: FeatureBatches
        self.val: FeatureBatches
        if extract_only:  # fill the cache for a later run (a cluster step before training)
            for split in (train, val):
                self.warm(split)
            return
        if cfg.cache_enabled:
            self._budget = self._memory_budget()
            self.train = self._cached(train, batch_sizes[0], self.train_sampler)
            self.val = self._cached(val, batch_sizes[1], val_sampler)
            log.info("feature cache on: epochs read cached features only%s",
                     "" if self._encoder else "; the HQ-SAM encoder was never built (every feature was cached)")
        else:
            for split in (train, val):  # decode every image once, so that a corrupt one cannot stop an epoch
                for i, image in enumerate(split.images):
                    if not readable(image.image_path):
                        split.exclude(i, "unreadable_image")
            precision = amp if amp != "fp32" else None
            self.train, self.val = (EncodedFeatures(split, self.encoder, precision, b, cfg.data.num_workers, s)
                                    for split, b, s in zip((train, val), batch_sizes, (self.train_sampler, val_sampler)))
            log.info("feature cache off: the encoder runs on every batch of every epoch (baseline mode)%s",
                     f", under {amp} autocast" if precision else "")

    def get_cache_stats(self) -> dict:
        """Warm-up: entries found in the cache at the start and entries extracted then. Training reads:
        features served from the cache and features the encoder computed (cache off, or an entry that
        broke), their hit rate, entries healed, and bytes of entries read from disk."""
        batches = (self.train, self.val)
        streamed = [b for b in batches if isinstance(b, StreamedFeatures)]
        entry = max((c.storage.disk_bytes for c in self.caches.values()), default=0)
        served, encoded = sum(b.cache_reads for b in batches), sum(b.encoded for b in batches)
        healed = sum(b.healed for b in streamed) + sum(c.stats.healed for c in self.caches.values())
        read = sum(c.stats.bytes_read for c in self.caches.values()) + entry * sum(b.maps_read for b in streamed)
        served, encoded, healed, read = (int(v) for v in distributed.sum_all([served, encoded, healed, read]))  # every rank's
        return {"found": self.found, "extracted": self.extracted, "served": served, "encoded": encoded,
                "hit_rate": served / (served + encoded) if served + encoded else None, "healed": healed,
                "bytes_read": read}

    @property
    def encoder(self) -> ImageEncoder:
        if self._encoder is None:
            self._encoder = build_encoder(self.cfg.hqsam, self.device, self.identity)
        return self._encoder

    def _memory_budget(self) -> dict[str, int]:
        """Where in-memory splits may live and how many bytes each place may take, in order of
        preference: the training device; on CUDA also the host RAM (pinned batches copied over), so
        a GPU machine with much RAM does not stream from disk what its GPU cannot hold."""
        setting = self.cfg.optimization.feature_cache
        if setting.in_memory is False:
            return {}
        if setting.memory_budget_gb:
            return {self.device.type: int(setting.memory_budget_gb * 2**30)}
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed.launched() else 1
        host = available_memory() // 2 // sharing  # the ranks of one machine share its RAM
        if self.device.type == "cuda":
            return {"cuda": int(torch.cuda.mem_get_info(self.device)[0] * 0.5), "cpu": host}
        return {"cpu": host}

    def warm(self, split: SplitData) -> tuple[FeatureCache, list[str]]:
        """Extract the split's missing entries (shared across ranks under torchrun); returns its cache and
        the images' keys. Images that cannot be stored are excluded from the split."""
        cache_cfg = self.cfg.optimization.feature_cache
        cache = FeatureCache(cache_cfg.cache_dir, split.split, self.identity, cache_cfg.storage_dtype)
        self.caches[split.split] = cache
        keys = [cache.key_for(s.digest or sha256_file(s.image_path)) for s in split.images]
        found, extracted, failed = warm_up(cache, split.images, keys, lambda: self.encoder, self.cfg.hqsam.batch_size,
                                           self.cfg.data.num_workers, self.stop, census=cache_cfg.auto_detect)
        self.found += found
        self.extracted += extracted
        for index, reason in sorted(failed.items()):
            split.exclude(index, reason)
        return cache, keys

    def _cached(self, split: SplitData, batch_size: int, sampler: Sampler | None) -> FeatureBatches:
        cache, keys = self.warm(split)

        def heal(indices: list[int]) -> dict[int, np.ndarray]:
            result = extract(cache, split.images, keys, indices, self.encoder, self.cfg.hqsam.batch_size, 0,
                             keep=True)
            for index, reason in sorted(result.failed.items()):
                log.warning("%s: its cached features broke and cannot be extracted again (%s); leaving it out",
                            split.images[index].image_path, reason)
                split.exclude(index, reason)
            cache.manifest.close(compact=False)
            return result.stored

        store = self._load_store(cache, keys, split, heal)
        if store is None:
            return StreamedFeatures(cache, keys, split, heal, batch_size, self.cfg.data.num_workers, self.device, sampler)
        return InMemoryFeatures(store, split, batch_size, self.device, sampler)

    def _load_store(self, cache: FeatureCache, keys: Sequence[str], split: SplitData, heal: Healer) -> torch.Tensor | None:
        """Read every entry into one tensor, when a budget allows; None means stream from disk."""
        setting = self.cfg.optimization.feature_cache.in_memory
        place, dtype = store_placement(len(keys) * int(np.prod(cache.shape)), cache.dtype, self._budget, setting is True)
        if place is None or dtype is None:
            budgets = ", ".join(f"{p} {b / 2**20:.0f} MiB" for p, b in self._budget.items()) or "none"
            log.info("%s: %d entries (%.0f MiB) stream from disk (in_memory=%s, budget %s)", cache.dir, len(keys),
                     len(keys) * cache.entry_bytes / 2**20, setting, budgets)
            return None
        size = len(keys) * int(np.prod(cache.shape)) * dtype.itemsize
        self._budget[place] -= size
        device = self.device if place == self.device.type else torch.device(place)  # cuda:N, not cuda:0
        store = torch.zeros((len(keys), *cache.shape), dtype=torch_dtype(dtype), device=device)
        reader, broken = EntryReader(cache), []
        staging = None if device.type == "cpu" else torch.empty(cache.shape, dtype=torch_dtype(cache.dtype))
        scratch = reader.scratch_for(dtype if staging is None else cache.dtype)
        for i, key in enumerate(progress(keys, desc=f"Loading {cache.dir.name} into memory", unit="entry", leave=False)):
            if i in split.excluded:
                continue
            if not reader.read_into(key, store[i] if staging is None else staging, scratch, count=True):
                broken.append(i)
                continue
            if staging is not None:
                store[i].copy_(staging)  # fp16 -> fp32 once per run, not once per epoch
        for i, stored in heal(broken).items() if broken else ():
            store[i] = torch.from_numpy(stored)
        log.info("%s: %d entries held in %s memory as %s (%.0f MiB)", cache.dir, len(keys), place, dtype.name, size / 2**20)
        return store


def store_placement(values: int, storage: np.dtype, budgets: dict[str, int],
                    always: bool) -> tuple[str | None, np.dtype | None]:
    """Where a split of `values` numbers is held and as what: the first place (in the budgets' order)
    where it fits, as float32 there if it fits so, else in the storage dtype; `always` (in_memory:
    true) takes the first place in the storage dtype whatever its budget. (None, None): stream."""
    for place, budget in budgets.items():
        for dtype in (np.dtype(np.float32), np.dtype(storage)):
            if values * dtype.itemsize <= budget:
                return place, dtype
    if always and budgets:
        return next(iter(budgets)), np.dtype(storage)
    return None, None
