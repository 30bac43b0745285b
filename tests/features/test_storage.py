"""int8 entries: per-channel scale and zero point in the same file, half of float16's bytes, read back
within half a level, through every reader (checked load, streaming, in memory) alike."""

import numpy as np
import pytest
import torch

from boxrefiner.features.cache import FeatureCache
from boxrefiner.features.encoder import EncoderIdentity
from boxrefiner.features.reader import EntryReader
from boxrefiner.features.storage import STORAGE_DTYPES, Storage

CPU = torch.device("cpu")
IDENTITY = EncoderIdentity("vit_tiny", "random-init-test", 256, "fp32")


def maps(seed=0, shape=(256, 16, 16)):
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 1, shape).astype(np.float32)
    values[3] *= 40  # channels of very different ranges: each gets its own scale
    values[4] = 2.5  # a constant channel
    return values


def test_int8_round_trip_is_within_half_a_level_per_channel():
    storage = Storage("int8", (256, 16, 16))
    values = maps()
    encoded = storage.encode(values)
    assert encoded.dtype == np.int8 and encoded.shape == (256, 16 * 16 + 8)
    decoded = storage.decode(encoded)
    assert decoded.dtype == np.float16 and decoded.shape == values.shape  # float16's room in memory
    step = (values.max(axis=(1, 2)) - values.min(axis=(1, 2))) / 255
    error = np.abs(decoded.astype(np.float32) - values).max(axis=(1, 2))
    assert (error <= step / 2 + np.abs(values).max(axis=(1, 2)) / 1024).all()  # half a level, and float16's rounding
    assert (np.delete(error, 4) > np.delete(step, 4) / 4).all()  # it is quantised, not stored as float16
    assert error[3] > 10 * error[0]  # the wide channel has its own, coarser scale
    assert np.array_equal(decoded[4], values[4])  # a constant channel comes back exactly
    assert np.array_equal(storage.round_trip(values), decoded)


def test_int8_entries_read_back_the_same_through_every_reader(tmp_path):
    cache = FeatureCache(tmp_path, "train", IDENTITY, "int8")
    values = maps(1)
    stored = cache.save("a" * 40, values, {"file_name": "x.jpg"})
    assert stored is not None and stored.dtype == np.float16
    assert np.array_equal(stored, cache.storage.round_trip(values))
    path = cache.find("a" * 40)
    assert path.stat().st_size == cache.entry_bytes
    assert cache.entry_bytes == 256 * (16 * 16 + 8) + 128  # at 1024 input (64 x 64): 50.1% of float16's
    assert np.array_equal(cache.load("a" * 40), stored)
    reader = EntryReader(cache)
    for dtype in (torch.float32, torch.float16):
        row = torch.empty(cache.shape, dtype=dtype)
        assert reader.read_into("a" * 40, row, reader.scratch_for(dtype))
        assert np.array_equal(row.numpy(), stored)
    assert cache.key_for("img") != FeatureCache(tmp_path, "train", IDENTITY, "float32").key_for("img")


def test_a_float16_entry_under_an_int8_key_is_healed(tmp_path):
    cache = FeatureCache(tmp_path, "train", IDENTITY, "int8")
    cache.save("b" * 40, maps(2), {"file_name": "y.jpg"})
    np.save(cache.find("b" * 40), maps(2).astype(np.float16))  # another version's bytes under the key
    assert cache.load("b" * 40) is None and cache.find("b" * 40) is None and cache.stats.healed == 1


@pytest.mark.parametrize("storage", ["float16", "float32"])
def test_float_storage_is_unchanged(storage):
    values = maps(3)
    codec = Storage(storage, values.shape)
    assert codec.encode(values).dtype == np.dtype(storage) and codec.encode(values).shape == values.shape
    assert np.array_equal(codec.round_trip(values), values.astype(storage))


@pytest.mark.parametrize("storage", ["float16", "int8", "float32"])
def test_fits_refuses_what_a_read_could_not_hand_back(storage):
    codec = Storage(storage, (4, 2, 2))
    batch = torch.zeros(5, 4, 2, 2)
    batch[1, 0, 0, 0] = float("nan")
    batch[2, 3, 1, 1] = float("-inf")
    batch[3, 2, 0, 1] = 7e4  # beyond float16 (which int8 entries decode to), within float32
    batch[4, 1, 1, 0] = -65504.0  # float16's largest magnitude still fits
    assert codec.fits(batch).tolist() == [True, False, False, storage == "float32", True]


@pytest.mark.parametrize("storage", STORAGE_DTYPES)
def test_a_batch_is_encoded_map_by_map(storage):
    """Each map of a batch gets its own scales: encoding a batch is encoding its maps one at a time."""
    values = np.stack([maps(4), 30 * maps(5), maps(6) - 7])
    codec = Storage(storage, values.shape[1:])
    batch = codec.encode_batch(torch.from_numpy(values)).numpy()
    assert batch.shape == (3, *codec.disk_shape) and batch.dtype == codec.disk_dtype
    for row, one in zip(batch, values):
        assert np.array_equal(row, codec.encode(one))


def reference_int8(values: np.ndarray) -> np.ndarray:
    """The int8 entry as 0.8 first wrote it, in numpy: caches written then must read the same now."""
    flat = values.reshape(values.shape[0], -1).astype(np.float32)
    zero = flat.min(axis=1)
    scale = (flat.max(axis=1) - zero) / np.float32(255.0)
    scale[~(scale > 0)] = 1.0
    levels = np.clip(np.rint((flat - zero[:, None]) / scale[:, None]), 0, 255) - 128
    params = np.stack([scale, zero], axis=1).astype(np.float32).view(np.int8)
    return np.concatenate([levels.astype(np.int8), params], axis=1)


def test_int8_entries_are_the_bytes_of_the_numpy_quantiser():
    values = np.stack([maps(7), 13 * maps(8) + 2])
    codec = Storage("int8", values.shape[1:])
    batch = codec.encode_batch(torch.from_numpy(values)).numpy()
    for row, one in zip(batch, values):
        assert np.array_equal(row, reference_int8(one))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("storage", STORAGE_DTYPES)
def test_a_gpu_encodes_the_same_bytes_as_the_cpu(storage):
    """Entries extracted on a GPU equal what inference on a CPU computes for the same maps."""
    values = torch.from_numpy(np.stack([maps(9), 7 * maps(10) - 1]))
    codec = Storage(storage, tuple(values.shape[1:]))
    assert torch.equal(codec.encode_batch(values.cuda()).cpu(), codec.encode_batch(values))
    assert codec.fits(values.cuda()).tolist() == codec.fits(values).tolist()


def test_maps_of_another_shape_are_refused():
    with pytest.raises(ValueError, match="not the storage's"):
        Storage("int8", (256, 16, 16)).encode_batch(torch.zeros(2, 256, 32, 8))


def test_extraction_keeps_a_map_that_is_finite_when_encoded_again_and_leaves_out_one_beyond_float16(
        synthetic_root, tmp_path, monkeypatch, caplog):
    from boxrefiner.config import DataConfig, HQSAMConfig
    from boxrefiner.data.splits import load_split
    from boxrefiner.features.encoder import ImageEncoder, build_encoder, encoder_identity
    from boxrefiner.features.sources import warm_up

    images = load_split(DataConfig(data_root=str(synthetic_root)), "val").images[:6]
    cfg = HQSAMConfig(model_type="vit_tiny", allow_random_init=True, input_size=256)
    identity = encoder_identity(cfg)
    real_encode = ImageEncoder.encode
    clean = {}

    def poisoned(self, batch, precision=None):  # the first batch of each cache: images 0-2
        features = real_encode(self, batch, precision).clone()
        if len(batch) == 1:  # the retry
            clean["first"] = features[0].clone()
        elif "poisoned" not in clean:
            clean["poisoned"] = True
            features[0, 5, 1, 1] = float("nan")  # a glitch of the batched call: the retry alone is finite
            features[2] *= 1e5  # beyond float16's range, finite
        return features

    monkeypatch.setattr(ImageEncoder, "encode", poisoned)
    results = {}
    for storage in ("float16", "int8", "float32"):
        cache = FeatureCache(tmp_path / storage, "val", identity, storage)
        keys = [cache.key_for(f"img{k}") for k in range(len(images))]
        results[storage] = warm_up(cache, images, keys, lambda: build_encoder(cfg, CPU, identity), batch_size=3,
                                   num_workers=2)
        assert np.array_equal(cache.load(keys[0]), cache.storage.round_trip(clean["first"].numpy()))  # the retry's
        clean.clear()
    assert results["float16"][1:] == results["int8"][1:] == (5, {2: "nonfinite_features"})
    assert "do not fit float16 storage" in caplog.text and "do not fit int8 storage" in caplog.text
    assert results["float32"][1:] == (6, {})
