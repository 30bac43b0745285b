"""Bad data never crashes a run: every reason is skipped, counted and listed in skipped.jsonl."""

import json

import pandas as pd
import pytest
import torch
from conftest import small_config
from test_fungitastic_layout import CAP, _image

from boxrefiner.config import config_from_dict
from boxrefiner.data.layout import DataError
from boxrefiner.training.trainer import train

GOOD = ["g1.JPG", "g2.JPG", "g3.JPG"]


@pytest.fixture
def messy_root(tmp_path):
    root = tmp_path / "FungiTastic"
    meta = root / "metadata" / "FungiTastic-Mini"
    meta.mkdir(parents=True)
    names = [*GOOD, "nomask.JPG", "missing.JPG", "badrle.JPG", "outside.JPG", "tiny.JPG", "garbage.JPG", "truncated.JPG"]
    pd.DataFrame({"filename": names}).to_csv(meta / "FungiTastic-Mini-Train.csv", index=False)
    pd.DataFrame({"filename": ["v1.JPG"]}).to_csv(meta / "FungiTastic-Mini-ClosedSet-Val.csv", index=False)
    folder = root / "FungiTastic-Mini" / "train" / "300p"
    for name in [*GOOD, "nomask.JPG", "badrle.JPG", "outside.JPG", "tiny.JPG", "truncated.JPG"]:
        _image(folder / name)
    _image(root / "FungiTastic-Mini" / "val" / "300p" / "v1.JPG")
    (folder / "garbage.JPG").write_bytes(b"this is not a JPEG")
    data = (folder / "truncated.JPG").read_bytes()
    (folder / "truncated.JPG").write_bytes(data[: len(data) // 2])  # header fine, pixels cut off
    def row(name, rle):
        return {"file_name": name, "label": "cap", "width": 80, "height": 60, "rle": str(rle)}
    rows = [row(n, CAP) for n in [*GOOD, "missing.JPG", "garbage.JPG", "truncated.JPG"]] + [
        row("badrle.JPG", [1, 2, 3, 10, 4, 13, 6]),           # runs cover 6 of 12 pixels
        row("outside.JPG", [0, 4, 78, 58, 79, 59 + 2]),      # box reaches row 61 of a 60-row image
        row("tiny.JPG", [0, 1, 5, 5, 5, 5]),                 # one pixel at 80x60 -> half a pixel at 40x30
    ]
    (root / "masks").mkdir()
    pd.DataFrame(rows).to_parquet(root / "masks" / "FungiTastic-Mini-TrainMasks.parquet")
    pd.DataFrame([row("v1.JPG", CAP)]).to_parquet(root / "masks" / "FungiTastic-Mini-ValidationMasks.parquet")
    return root


@pytest.mark.parametrize("cache", [True, False])
def test_every_bad_sample_is_skipped_and_listed(messy_root, tmp_path, cache, caplog):
    cfg = config_from_dict(small_config(messy_root, tmp_path, training={"epochs": 1, "batch_size": 2,
                                                                         "feature_cache": cache}))
    history = train(cfg, torch.device("cpu"))
    assert len(history) == 1
    listed = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    reasons = {r["file_name"]: r["reason"] for r in listed}
    assert reasons == {"nomask.JPG": "no_mask", "missing.JPG": "missing_image", "badrle.JPG": "bad_rle",
                       "outside.JPG": "outside_image", "tiny.JPG": "too_small", "garbage.JPG": "unreadable_image",
                       "truncated.JPG": "unreadable_image"}
    assert all(r["split"] == "train" for r in listed)
    assert ("train split: 4 objects on 4 images used; skipped: 1 bad_rle, 1 missing_image, 1 no_mask, 1 outside_image, "
            "1 too_small") in caplog.text


def test_a_split_left_empty_stops_before_any_model_with_the_layout(messy_root, tmp_path, monkeypatch):
    from boxrefiner.training import trainer as engine
    monkeypatch.setattr(engine, "build_model", lambda cfg: pytest.fail("a model was built"))
    masks = messy_root / "masks" / "FungiTastic-Mini-ValidationMasks.parquet"  # no training image has a mask here
    raw = small_config(messy_root, tmp_path, data={"masks_file": str(masks)})
    with pytest.raises(DataError, match=r"split 'train' has no usable objects \(skipped: 10 no_mask\); expected .*"
                                        r"metadata/FungiTastic-Mini/FungiTastic-Mini-Train.csv"):
        train(config_from_dict(raw), torch.device("cpu"))
