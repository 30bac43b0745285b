"""A FungiTastic-layout dataset written by hand (not by our generator): hand-computed CVAT runs."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_config
from PIL import Image

from boxrefiner.config import DataConfig, config_from_dict
from boxrefiner.data.images import load_rgb, oriented_size
from boxrefiner.data.layout import DataError
from boxrefiner.data.splits import load_split

# Masks drawn on an 80x60 image; the loaded 300p-style copy is 40x30 (scale 0.5).
CAP = [1, 2, 1, 4, 1, 2, 1, 10, 4, 13, 6]  # box x 10..13, y 4..6; rows 0110 / 1111 / 0110
STEM = "[0, 28, 11, 7, 12, 20]"  # box x 11..12, y 7..20, all foreground, stored as a string
OTHER = [0, 6, 30, 40, 32, 41]  # x 30..32, y 40..41: all six pixels foreground


def _image(path: Path, size=(40, 30), exif_orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    img.save(path, "JPEG", exif=exif.tobytes())


@pytest.fixture
def hand_root(tmp_path) -> Path:
    root = tmp_path / "FungiTastic"
    meta = root / "metadata" / "FungiTastic-Mini"
    meta.mkdir(parents=True)
    pd.DataFrame({"filename": ["a.JPG", "b.JPG", "nomask.JPG", "a.JPG"], "species": ["x", "y", "z", "x"]}).to_csv(
        meta / "FungiTastic-Mini-Train.csv", index=False)
    pd.DataFrame({"filename": ["c.JPG"]}).to_csv(meta / "FungiTastic-Mini-ClosedSet-Val.csv", index=False)
    for split, name in (("train", "a.JPG"), ("train", "b.JPG"), ("train", "nomask.JPG"), ("val", "c.JPG")):
        _image(root / "FungiTastic-Mini" / split / "300p" / name)
    (root / "masks").mkdir()
    rows = [
        {"file_name": "a.JPG", "label": "cap", "width": 80, "height": 60, "rle": str(CAP)},
        {"file_name": "a.JPG", "label": "stem", "width": 80, "height": 60, "rle": STEM},
        {"file_name": "b.JPG", "label": "fruiting_body", "width": 80, "height": 60, "rle": str(OTHER)},
    ]
    pd.DataFrame(rows).to_parquet(root / "masks" / "FungiTastic-Mini-TrainMasks.parquet")
    pd.DataFrame([{"file_name": "c.JPG", "label": "cap", "width": 80, "height": 60, "rle": str(CAP)}]).to_parquet(
        root / "masks" / "FungiTastic-Mini-ValidationMasks.parquet")
    return root


def test_boxes_are_the_union_of_parts_scaled_to_the_loaded_image(hand_root):
    split = load_split(DataConfig(data_root=str(hand_root)), "train")
    boxes = {split.images[o.image].file_name: o.box for o in split.objects}
    # a: parts span x 10..13 and y 4..20 (inclusive) -> edges [10, 4, 14, 21] at 80x60 -> x0.5
    assert boxes["a.JPG"] == pytest.approx((5.0, 2.0, 7.0, 10.5))
    assert boxes["b.JPG"] == pytest.approx((15.0, 20.0, 16.5, 21.0))
    assert len(split.images) == len(split.objects) == 2  # the duplicate CSV row counts once
    assert split.skipped == {"no_mask": 1} and split.skipped_files == [{"file_name": "nomask.JPG", "reason": "no_mask"}]
    assert (split.images[0].width, split.images[0].height) == (40, 30)


def test_masks_file_override_and_val_split(hand_root, tmp_path):
    moved = tmp_path / "elsewhere.parquet"
    (hand_root / "masks" / "FungiTastic-Mini-ValidationMasks.parquet").rename(moved)
    with pytest.raises(DataError, match="masks file for split 'val' not found"):
        load_split(DataConfig(data_root=str(hand_root)), "val")
    split = load_split(DataConfig(data_root=str(hand_root), masks_file=str(moved)), "val")
    assert [s.file_name for s in split.images] == ["c.JPG"]


def test_missing_image_folder_names_the_path(hand_root):
    with pytest.raises(DataError, match=r"500p.*data.image_size=500"):
        load_split(DataConfig(data_root=str(hand_root), image_size=500), "train")


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    _image(path, size=(40, 30), exif_orientation=6)  # stored landscape, displayed portrait
    assert oriented_size(path) == (30, 40)
    assert load_rgb(path).shape == (40, 30, 3)


def test_hand_written_dataset_trains(hand_root, tmp_path):
    from boxrefiner.training.trainer import train
    cfg = config_from_dict(small_config(hand_root, tmp_path, training={"epochs": 1, "batch_size": 2}))
    history = train(cfg, torch.device("cpu"))
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])


def test_wide_images_are_scaled_to_8_bits_not_clipped_white(tmp_path, caplog):
    from boxrefiner.features.decode import ImageDataset
    from boxrefiner.features.encoder import preprocess
    ramp = np.linspace(0, 1, 48 * 64).reshape(48, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray((ramp * 4_000_000 - 1_000_000).astype(np.int32)).save(tmp_path / "i32.tif")
    Image.fromarray((ramp * 7.5 + 2).astype(np.float32)).save(tmp_path / "f32.tif")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    for name in ("g16.png", "i32.tif", "f32.tif"):
        rgb = load_rgb(tmp_path / name)
        assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
        assert rgb.min() == 0 and rgb.max() == 255 and 120 < rgb.mean() < 135, name  # the ramp, not all white
        np.testing.assert_allclose(rgb[..., 0] / 255.0, ramp, atol=1 / 255)
        _, tensor = ImageDataset([tmp_path / name], 64)[0]  # what training, refinement and masks are fed
        assert torch.equal(tensor, preprocess(rgb, 64))
    assert "32-bit integer image: scaled to 8 bits by its own min-max range" in caplog.text
    assert "floating-point image" in caplog.text
