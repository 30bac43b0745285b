"""Streaming entries into reused buffers, and where an in-memory split is held."""

import numpy as np
import pytest
import torch

from boxrefiner.features.cache import FeatureCache
from boxrefiner.features.encoder import EncoderIdentity
from boxrefiner.features.reader import BatchStream, npy_header
from boxrefiner.features.sources import store_placement

IDENTITY = EncoderIdentity("vit_tiny", "a" * 64, 64, "fp32")  # 4 x 4 maps


def test_the_header_is_the_one_numpy_writes(tmp_path):
    for shape, dtype in (((256, 4, 4), np.float16), ((256, 64, 64), np.float32)):
        np.save(tmp_path / "x.npy", np.zeros(shape, dtype))
        data = (tmp_path / "x.npy").read_bytes()
        assert data[:len(npy_header(shape, dtype))] == npy_header(shape, dtype)
        assert len(data) - len(npy_header(shape, dtype)) == np.prod(shape) * np.dtype(dtype).itemsize


@pytest.mark.parametrize("storage", ["float16", "float32"])
def test_streamed_batches_hold_the_stored_values_in_reused_buffers(tmp_path, storage):
    cache = FeatureCache(tmp_path, "train", IDENTITY, storage)
    rng = np.random.default_rng(0)
    values = {}
    for i in range(12):
        stored = cache.save(f"{i:040x}", rng.normal(size=cache.shape).astype(np.float32), {"file": f"{i}.jpg"})
        values[i] = torch.from_numpy(stored.astype(np.float32))
    keys = [f"{i:040x}" for i in range(12)]
    bad = cache.path(keys[5])
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: read as bad, and deleted by the checked path
    plan = [(torch.arange(3), torch.tensor(images), torch.arange(3)) for images in
            ([0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [2, 1, 0], [11, 3, 7])]
    stream = BatchStream(cache, keys, threads=3, batch_images=3, ahead=2)
    seen_buffers = set()
    for (_, images, _), batch in zip(plan, stream.batches(plan)):
        assert batch.features.dtype == torch.float32 and torch.equal(batch.images, images)
        for row, image in enumerate(images.tolist()):
            if image == 5:
                assert batch.bad[row] and not batch.features[row].any()
            else:
                assert not batch.bad[row] and torch.equal(batch.features[row], values[image])
        seen_buffers.add(batch.features.data_ptr())
    assert len(seen_buffers) == 4  # the ring: ahead + 2 buffers, reused
    assert not bad.exists()


def test_a_split_is_held_where_it_fits_first():
    gib = 2**30
    fp16 = np.dtype(np.float16)
    values = gib // 4  # 1 GiB as float32, 0.5 GiB as float16
    assert store_placement(values, fp16, {"cuda": 2 * gib, "cpu": 8 * gib}, False) == ("cuda", np.float32)
    assert store_placement(values, fp16, {"cuda": gib // 2, "cpu": 8 * gib}, False) == ("cuda", fp16)  # GPU first
    assert store_placement(values, fp16, {"cuda": gib // 4, "cpu": 8 * gib}, False) == ("cpu", np.float32)  # host RAM
    assert store_placement(values, fp16, {"cuda": gib // 4, "cpu": gib // 4}, False) == (None, None)  # stream
    assert store_placement(values, fp16, {"cuda": gib // 4, "cpu": gib // 4}, True) == ("cuda", fp16)  # in_memory: true
    assert store_placement(values, fp16, {}, True) == (None, None)  # in_memory: false


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_ram_and_streamed_batches_reach_the_gpu_unchanged(tmp_path):
    from boxrefiner.data.splits import ImageRecord, ObjectRecord, SplitData
    from boxrefiner.features.sources import InMemoryFeatures, StreamedFeatures
    cache = FeatureCache(tmp_path, "train", IDENTITY, "float16")
    keys = [f"{i:040x}" for i in range(20)]
    rng = np.random.default_rng(0)
    store = torch.stack([torch.from_numpy(cache.save(k, rng.normal(size=cache.shape).astype(np.float32),
                                                     {"file": k}).astype(np.float32)) for k in keys])
    split = SplitData("train", [ImageRecord(k, tmp_path / k, 64, 64) for k in keys],
                      [ObjectRecord(i % 20, (1.0, 1.0, 30.0, 30.0)) for i in range(40)])
    cuda = torch.device("cuda")
    held = InMemoryFeatures(store, split, 8, cuda)  # the store stays in host RAM: pinned, asynchronous copies
    streamed = StreamedFeatures(cache, keys, split, lambda images: {}, 8, 2, cuda)
    for source in (held, streamed):
        for _ in range(2):  # the buffers come round more than once
            for batch in source:
                assert batch.features.device.type == "cuda"
                expected = store[torch.tensor([o.image for o in (split.objects[i] for i in batch.objects.tolist())])]
                torch.testing.assert_close(batch.features[batch.image_index.cuda()].cpu(), expected, rtol=0, atol=0)
