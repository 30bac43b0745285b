"""The feature cache: keys that never serve stale features, healing, concurrency, equivalence."""

import multiprocessing
import os
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch
from conftest import small_config

from boxrefiner.config import ConfigError, config_from_dict
from boxrefiner.features.cache import (
    CacheError,
    FeatureCache,
    cache_tag,
    clear_cache,
    read_manifest,
)
from boxrefiner.features.encoder import EncoderIdentity
from boxrefiner.features.sources import FeatureSources
from boxrefiner.training.trainer import prepare_splits, train

CPU = torch.device("cpu")
TIMING = ("epoch_seconds", "data_seconds", "val_seconds", "samples_per_second")
IDENTITY = EncoderIdentity("vit_tiny", "a" * 64, 256, "fp32")


def comparable(history, drop=()):
    return [{k: v for k, v in r.items() if k not in TIMING + tuple(drop)} for r in history]


def test_keys_change_with_checkpoint_input_size_precision_and_dtype():
    key = FeatureCache("c", "train", IDENTITY).key_for("img")
    others = [
        FeatureCache("c", "train", EncoderIdentity("vit_tiny", "b" * 64, 256, "fp32")).key_for("img"),
        FeatureCache("c", "train", EncoderIdentity("vit_tiny", "a" * 64, 512, "fp32")).key_for("img"),
        FeatureCache("c", "train", EncoderIdentity("vit_tiny", "a" * 64, 256, "bf16")).key_for("img"),
        FeatureCache("c", "train", EncoderIdentity("vit_b", "a" * 64, 256, "fp32")).key_for("img"),
        FeatureCache("c", "train", IDENTITY, "float32").key_for("img"),
        FeatureCache("c", "train", IDENTITY).key_for("other image"),
    ]
    assert key not in others and len(set(others)) == len(others)


def test_another_checkpoint_or_input_size_is_a_cold_cache(synthetic_root, tmp_path, caplog):
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 1})
    train(config_from_dict(raw), CPU)
    raw["hqsam"]["input_size"] = 320
    caplog.clear()
    train(config_from_dict(raw), CPU)
    assert "0 of 24 entries present" in caplog.text and "24 to extract" in caplog.text
    assert "for other encoders" in caplog.text and "24 for other encoders" in caplog.text


def test_truncated_and_foreign_entries_are_healed(synthetic_root, tmp_path, caplog):
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 2})
    first = train(config_from_dict(raw), CPU)
    entries = sorted((tmp_path / "features" / "train").glob("*/*.npy"))
    data = entries[0].read_bytes()
    entries[0].write_bytes(data[: len(data) // 2])  # an interrupted copy
    np.save(entries[1], np.zeros((3, 3), np.float16))  # wrong shape under a right name
    nan = np.load(entries[2])
    nan[0, 0, 0] = np.nan
    np.save(entries[2], nan)  # NaN: never served
    caplog.clear()
    second = train(config_from_dict(raw), CPU)
    assert caplog.text.count("deleting it so that it is extracted again") == 3
    assert second.cache_stats["healed"] == 3 and second.cache_stats["found"] == 32
    assert comparable(second) == comparable(first)
    assert all(np.isfinite(np.load(p)).all() and np.load(p).shape == (256, 16, 16) for p in entries[:3])


def test_entry_broken_during_training_is_reextracted(synthetic_root, tmp_path):
    cfg = config_from_dict(small_config(synthetic_root, tmp_path, optimization={
        "feature_cache": {"cache_dir": str(tmp_path / "features"), "in_memory": False}}))
    train_split, val_split = prepare_splits(cfg)
    sources = FeatureSources(cfg, CPU, train_split, val_split, "fp32")
    before = {int(i): f.clone() for b in sources.train for i, f in zip(b.objects, b.features[b.image_index])}
    victim = sorted((tmp_path / "features" / "train").glob("*/*.npy"))[3]
    victim.write_bytes(b"garbage")
    sources.train.healed = 0
    after = {int(i): f for b in sources.train for i, f in zip(b.objects, b.features[b.image_index])}
    assert sources.train.healed == 1
    assert all(torch.equal(before[i], after[i]) for i in before)
    assert np.load(victim).shape == (256, 16, 16)


def _writer(args):
    folder, _seed = args
    cache = FeatureCache(folder, "train", IDENTITY)
    rng = np.random.default_rng(0)  # every writer writes the same values, as two runs of one encoder would
    for i in range(6):
        cache.save(f"{i:02d}" + "k" * 38, rng.standard_normal(cache.shape).astype(np.float32), {"file": f"img{i}.jpg"})
    cache.manifest.close()
    return True


def test_concurrent_writers_leave_valid_entries_and_manifest(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        assert all(pool.map(_writer, [(str(tmp_path), s) for s in range(8)]))
    cache = FeatureCache(tmp_path, "train", IDENTITY)
    keys = {f"{i:02d}" + "k" * 38 for i in range(6)}
    assert all(cache.load(key) is not None for key in keys)
    assert not list((tmp_path / "train").rglob(".*.tmp"))
    assert set(read_manifest(tmp_path / "train")[cache.tag].entries) == keys


def test_cache_on_equals_cache_off(synthetic_root, tmp_path):
    def run(name, **feature_cache):
        raw = small_config(synthetic_root, tmp_path / name, training={"epochs": 2, "feature_cache": bool(feature_cache)})
        raw["optimization"]["feature_cache"].update(feature_cache)
        return train(config_from_dict(raw), CPU)

    off = run("off")
    fp32 = run("fp32", storage_dtype="float32")
    fp16 = run("fp16", storage_dtype="float16")
    assert comparable(fp32, drop=("cache_hit_rate",)) == comparable(off, drop=("cache_hit_rate",))
    for a, b in zip(fp16, off):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-2)
        assert a["val_iou_refined"] == pytest.approx(b["val_iou_refined"], abs=5e-3)


@pytest.mark.parametrize("context_layers", [0, 2])
def test_streamed_and_in_memory_reads_give_the_same_run(synthetic_root, tmp_path, context_layers):
    # In memory the fp16 entries are widened to float32 once; streamed, the reader threads widen each
    # batch's rows as they read them: the same float32 maps, so the same run, number for number.
    def run(name, in_memory):
        raw = small_config(synthetic_root, tmp_path / name, training={"epochs": 2})
        raw["model"]["context_layers"] = context_layers
        raw["optimization"]["feature_cache"].update(cache_dir=str(tmp_path / "features"), in_memory=in_memory)
        return train(config_from_dict(raw), CPU)

    assert comparable(run("memory", True)) == comparable(run("stream", False))


def test_disk_room_is_checked_before_extraction(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "features", "train", IDENTITY)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 10**5, 10**5))
    with pytest.raises(CacheError, match="1000 entries need .* GiB but only .* GiB is free"):
        cache.ensure_room(1000)
    cache.ensure_room(0)


def test_clear_one_encoder_or_all(tmp_path):
    mine = FeatureCache(tmp_path, "train", IDENTITY)
    other = FeatureCache(tmp_path, "val", EncoderIdentity("vit_h", "c" * 64, 1024, "fp32"))
    key = "ab" * 20
    for cache in (mine, other):
        cache.save(key, np.zeros(cache.shape, np.float32), {"file": "x.jpg"})
    files, size = clear_cache(tmp_path, cache_tag(IDENTITY, "float16"))
    assert files == 1 and size > 0 and not mine.path(key).exists() and other.path(key).exists()
    assert mine.listed() == {} and set(other.listed()) == {key}
    assert clear_cache(tmp_path) == (1, other.entry_bytes)  # 'all'
    assert not other.path(key).exists() and other.listed() == {}


def test_image_augmentation_is_refused():
    with pytest.raises(ConfigError, match="'data.augmentation' is not supported: image-space augmentation"):
        config_from_dict({"data": {"data_root": "x", "augmentation": {"color_jitter": 0.2}}})


def test_in_memory_setting_accepts_booleans_and_auto():
    base = {"data": {"data_root": "x"}}
    for value in (True, False, "auto"):
        cfg = config_from_dict({**base, "optimization": {"feature_cache": {"in_memory": value}}})
        assert cfg.optimization.feature_cache.in_memory == value
    with pytest.raises(ConfigError, match="in_memory"):
        config_from_dict({**base, "optimization": {"feature_cache": {"in_memory": "sometimes"}}})


def test_cache_stats_count_hits_misses_and_bytes(synthetic_root, tmp_path):
    cfg = config_from_dict(small_config(synthetic_root, tmp_path))
    train_split, val_split = prepare_splits(cfg)
    cold = FeatureSources(cfg, CPU, train_split, val_split, "fp32").get_cache_stats()
    assert (cold["found"], cold["extracted"], cold["served"], cold["encoded"], cold["healed"]) == (0, 32, 0, 0, 0)
    assert cold["bytes_read"] == 32 * 256 * 16 * 16 * 2  # read into memory once
    next(iter((tmp_path / "features" / "val").glob("*/*.npy"))).write_bytes(b"broken")
    warm_sources = FeatureSources(cfg, CPU, train_split, val_split, "fp32")
    for _ in range(2):
        for _ in warm_sources.train:
            pass
    warm = warm_sources.get_cache_stats()
    assert (warm["found"], warm["extracted"], warm["healed"]) == (32, 0, 1)  # the manifest lists it; healed on read
    assert (warm["served"], warm["encoded"], warm["hit_rate"]) == (48, 0, 1.0)  # two epochs of training reads
    streamed_cfg = config_from_dict(small_config(synthetic_root, tmp_path, optimization={
        "feature_cache": {"cache_dir": str(tmp_path / "features"), "in_memory": False}}))
    streamed = FeatureSources(streamed_cfg, CPU, train_split, val_split, "fp32")
    next(iter((tmp_path / "features" / "train").glob("*/*.npy"))).write_bytes(b"broken")
    for _ in streamed.train:
        pass
    stats = streamed.get_cache_stats()
    assert (stats["served"], stats["encoded"], stats["healed"]) == (23, 1, 1)
    assert stats["hit_rate"] == 23 / 24 and stats["bytes_read"] == 23 * 256 * 16 * 16 * 2


def test_clear_cache_flag_removes_only_this_encoders_entries(synthetic_root, tmp_path, caplog):
    from boxrefiner.features.cache import clear_features
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 1})
    train(config_from_dict(raw), CPU)
    other = small_config(synthetic_root, tmp_path, training={"epochs": 1}, hqsam={"input_size": 320})
    train(config_from_dict(other), CPU)
    clear_features(config_from_dict(raw), every_encoder=False)
    assert "removed 32 feature files" in caplog.text
    assert len(list((tmp_path / "features").glob("*/*/*.npy"))) == 32  # the 320-input encoder's remain
    clear_features(config_from_dict(raw), every_encoder=True)
    assert not list((tmp_path / "features").rglob("*.npy"))


def test_writing_n_manifest_entries_costs_o_n(tmp_path, monkeypatch):
    """100k entries listed one at a time, as extraction lists them: each one line appended to one
    journal, nothing ever rewritten, all read back."""
    from boxrefiner.features import cache as cache_module
    from boxrefiner.utils import journal as journal_module
    rewrites = []
    monkeypatch.setattr(journal_module, "write_bytes", lambda *a, **k: rewrites.append(a[0]))
    monkeypatch.setattr(cache_module, "atomic_write", lambda *a, **k: rewrites.append(a[0]))
    cache = FeatureCache(tmp_path, "train", IDENTITY)
    sizes = {}
    for i in range(100_000):
        cache.manifest.add(cache.tag, cache.info, {f"{i:040x}": {"file": f"img_{i:06d}.jpg", "width": 640, "height": 480}})
        if i + 1 in (10_000, 100_000):
            sizes[i + 1] = sum(p.stat().st_size for p in (tmp_path / "train" / "manifest").glob("*.jsonl"))
    cache.manifest.close()
    assert rewrites == []  # one writer: no compaction either
    assert len(list((tmp_path / "train" / "manifest").glob("*.jsonl"))) == 1
    assert 9.9 < sizes[100_000] / sizes[10_000] < 10.1 and sizes[100_000] / 100_000 < 200  # bytes per entry
    assert len(read_manifest(tmp_path / "train")[cache.tag].entries) == 100_000


def test_clearing_orphans_removes_unlisted_and_obsolete_entries_only(tmp_path):
    from boxrefiner.features.cache import clear_orphans
    from boxrefiner.features.encoder import ENCODER_REVISIONS
    current = EncoderIdentity("vit_tiny", "a" * 64, 256, "fp32", revision=ENCODER_REVISIONS["vit_tiny"])
    old = EncoderIdentity("vit_tiny", "a" * 64, 256, "fp32")  # before the TinyViT fix: never served again
    values = np.zeros((256, 16, 16), np.float32)
    kept = FeatureCache(tmp_path, "train", current)
    gone = FeatureCache(tmp_path, "train", old)
    kept.save(kept.key_for("x"), values, {"file": "x.jpg"})
    gone.save(gone.key_for("x"), values, {"file": "x.jpg"})
    kept.manifest.close()
    gone.manifest.close()
    orphan = kept.path("ab" + "0" * 38)  # an entry no manifest lists (e.g. its writer was killed before listing)
    orphan.parent.mkdir()
    shutil.copy(kept.path(kept.key_for("x")), orphan)
    day_old = orphan.stat().st_mtime - 2 * 86400
    os.utime(orphan, (day_old, day_old))  # unlisted for two days: not a write another host is still listing
    young = kept.path("ab" + "1" * 38)
    shutil.copy(orphan, young)  # unlisted, but new: it may be listed in a journal this host does not see yet
    newer = FeatureCache(tmp_path, "train", EncoderIdentity("vit_tiny", "a" * 64, 256, "fp32", revision="from-a-newer-version"))
    newer.save(newer.key_for("x"), values, {"file": "x.jpg"})
    newer.manifest.close()
    foreign = tmp_path / "train" / "notes.npy"
    foreign.write_bytes(b"someone else's")
    removed = clear_orphans(tmp_path)
    assert (removed.unlisted, removed.obsolete) == (1, 1)
    assert removed.bytes == 2 * kept.path(kept.key_for("x")).stat().st_size
    assert kept.path(kept.key_for("x")).exists() and not gone.path(gone.key_for("x")).exists()
    assert not orphan.exists() and foreign.exists() and young.exists()
    assert newer.path(newer.key_for("x")).exists()  # a newer version's entries, in a shared cache, stay
    assert gone.listed() == {} and set(kept.listed()) == {kept.key_for("x")}
    assert clear_orphans(tmp_path).bytes == 0  # nothing left to do


def test_orphans_in_a_folder_the_tool_did_not_create_are_left(tmp_path):
    from boxrefiner.features.cache import clear_orphans
    (tmp_path / "theirs.txt").write_text("a user's file")  # the root is not ours: it is never marked
    cache = FeatureCache(tmp_path, "train", IDENTITY)
    cache.save(cache.key_for("x"), np.zeros((256, 16, 16), np.float32), {"file": "x.jpg"})
    cache.manifest.close()
    unlisted = cache.path("cd" + "1" * 38)
    unlisted.parent.mkdir()
    unlisted.write_bytes(b"not listed")
    clear_orphans(tmp_path)
    assert unlisted.exists()  # not known to be the tool's
    assert not cache.path(cache.key_for("x")).exists()  # listed under an identity no longer produced
