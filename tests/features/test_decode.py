"""Extraction's decoding threads hand out the same batches, in the same order, as decoding in turn
(uint8, normalised where the encoder runs into exactly what `preprocess` gives):
undecodable images reported by position, and a consumer that stops early leaves no thread behind."""

import threading

import numpy as np
import torch
from PIL import Image

from boxrefiner.features.decode import ImageDataset, image_batches


def images(tmp_path, count=7, broken=(2, 5)):
    paths = []
    rng = np.random.default_rng(0)
    for k in range(count):
        path = tmp_path / f"{k}.jpg"
        if k in broken:
            path.write_bytes(b"\xff\xd8 not a jpeg")
        else:
            Image.fromarray(rng.integers(0, 255, (30 + k, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_threads_decode_the_same_batches_in_order(tmp_path):
    paths = images(tmp_path)
    for threads in (0, 1, 3):
        batches = list(image_batches(paths, 64, batch_size=3, threads=threads))
        assert [b.positions for b in batches] == [[0, 1], [3, 4], [6]]
        assert [b.bad for b in batches] == [[2], [5], []]
        assert all(b.pixels.dtype == torch.uint8 for b in batches)  # a quarter of float32's bytes to move
        expected = [ImageDataset(paths, 64)[i][1] for i in (0, 1, 3, 4, 6)]  # what preprocess gives, bit for bit
        assert torch.equal(torch.cat([b.normalised(torch.device("cpu")) for b in batches]), torch.stack(expected))


def test_stopping_early_leaves_no_decoding_thread(tmp_path):
    paths = images(tmp_path, count=12, broken=())
    batches = image_batches(paths, 64, batch_size=2, threads=2, ahead=2)
    next(batches)
    batches.close()  # what a stop request after the batch in hand does
    assert not [t for t in threading.enumerate() if t.name.startswith("boxrefiner-decode")]
