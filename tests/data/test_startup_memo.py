"""A warm start reads no image and decodes no mask it has seen; what changed is read again."""

import logging
import os

import numpy as np
import pandas as pd
import pytest

from boxrefiner.bench.startup import build, startup_config
from boxrefiner.data import fungitastic
from boxrefiner.data.layout import DataError
from boxrefiner.data.rle import encode_cvat_rle
from boxrefiner.training.trainer import prepare_splits
from boxrefiner.utils.files import sha256_file


def _index(splits):
    return [(s.split, [(i.file_name, i.width, i.height, i.digest) for i in s.images], [o.box for o in s.objects],
             dict(s.skipped)) for s in splits]


def _garble_keeping_stat(path):
    """New bytes of the same length, with the old modification time: only a read can tell."""
    before = path.stat()
    path.write_bytes(b"\0" * before.st_size)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.fixture
def scaled(tmp_path):
    build(tmp_path, 30)
    for path in (tmp_path / "data").rglob("*.JPG"):  # written a moment ago: make them plainly older than any read
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 10**10))
    return tmp_path, startup_config(tmp_path)


def test_a_warm_start_reads_no_image_and_decodes_no_mask(scaled, monkeypatch):
    root, cfg = scaled
    first = prepare_splits(cfg)
    assert all(i.digest == sha256_file(i.image_path) for s in first for i in s.images)
    for path in (root / "data").rglob("*.JPG"):
        _garble_keeping_stat(path)

    def no_masks(*args):
        raise AssertionError("the masks parquet was read on a warm start")
    monkeypatch.setattr(fungitastic, "read_masks", no_masks)
    assert _index(prepare_splits(cfg)) == _index(first)  # a read would have found zeros: unreadable, other hashes


def test_an_edited_image_or_annotation_file_is_read_again(scaled):
    root, cfg = scaled
    first = prepare_splits(cfg)
    images = sorted((root / "data").rglob("train_*.JPG"))
    images[0].write_bytes(b"\0" * 100)  # edited: another size and time
    masks = root / "data" / "masks" / "FungiTastic-Mini-TrainMasks.parquet"
    frame = pd.read_parquet(masks)
    changed = frame["file_name"] == images[1].name
    full = np.zeros((30, 40), dtype=bool)  # a 6 x 4 part at (3, 2) of the 40 x 30 image
    full[2:6, 3:9] = True
    frame["rle"] = [encode_cvat_rle(full) if c else r for c, r in zip(changed, frame["rle"])]
    frame.to_parquet(masks)
    again = {s.split: s for s in prepare_splits(cfg)}
    assert again["train"].skipped["unreadable_image"] == 1
    train = again["train"]
    boxes = {train.images[o.image].file_name: o.box for o in train.objects}
    assert boxes[images[1].name] == (3.0, 2.0, 9.0, 6.0)
    assert len(train.images) == len(first[0].images) - 1


def test_a_memo_that_cannot_be_written_is_skipped_with_one_line(scaled, caplog):
    root, cfg = scaled
    (root / "features" / ".memo").write_text("not a folder")
    with caplog.at_level(logging.INFO):
        first = prepare_splits(cfg)
        again = prepare_splits(cfg)
    assert _index(again) == _index(first)
    lines = [r.getMessage() for r in caplog.records if "start-up memo not written" in r.getMessage()]
    assert len(lines) == 2 and all(str(root / "features" / ".memo") in line for line in lines)  # one per start


def test_an_image_the_system_refused_to_read_is_not_remembered_as_unreadable(scaled, monkeypatch):
    from boxrefiner.data import reading
    _, cfg = scaled
    real = reading.oriented_size

    def refuse_first(path):
        if path.name == "train_0000000.JPG":
            raise PermissionError(13, "Permission denied", str(path))  # e.g. a mount or a mode fixed later
        return real(path)
    monkeypatch.setattr(reading, "oriented_size", refuse_first)
    first = {s.split: s for s in prepare_splits(cfg)}
    assert first["train"].skipped["unreadable_image"] == 1
    monkeypatch.setattr(reading, "oriented_size", real)
    again = {s.split: s for s in prepare_splits(cfg)}
    assert again["train"].skipped["unreadable_image"] == 0  # read again, not taken from the memo
    assert len(again["train"].images) == len(first["train"].images) + 1


def test_yolo_label_files_are_remembered_until_they_or_the_class_names_change(tmp_path):
    from boxrefiner.config import config_from_dict
    from boxrefiner.data.synthetic import generate_multi_object
    root = generate_multi_object(tmp_path / "ds", train=6, val=2, seed=5, size=160)  # several objects per image
    labels = sorted((root / "labels").rglob("*.txt"))
    for path in [*labels, *(root / "images").rglob("*.jpg")]:
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 10**10))
    cfg = config_from_dict({"data": {"format": "yolo", "yolo_data": str(root / "data.yaml")},
                            "hqsam": {"model_type": "vit_tiny", "allow_random_init": True},
                            "optimization": {"feature_cache": {"cache_dir": str(tmp_path / "features")}}})
    first = prepare_splits(cfg)
    assert max(len(s.objects) - len(s.images) for s in first) > 0  # several objects on some image
    for path in labels:
        _garble_keeping_stat(path)  # unreadable as labels: only the memo can still give the objects
    assert _index(prepare_splits(cfg)) == _index(first)
    data_yaml = root / "data.yaml"
    data_yaml.write_text(data_yaml.read_text().replace("names:", "names_old:") + "names: [only]\n")  # one class now
    with pytest.raises(DataError, match="bad_label_line"):  # class names changed: the garbled files are read again
        prepare_splits(cfg)
