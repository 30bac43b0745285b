"""COCO and YOLO layouts written by hand: boxes, categories, masks, and every reason an input is left out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from boxrefiner.config import config_from_dict
from boxrefiner.data.layout import DataError
from boxrefiner.data.masks import ground_truth_masks
from boxrefiner.data.rle import encode_cvat_rle
from boxrefiner.data.splits import ImageRecord, ObjectRecord, SplitData, load_split
from boxrefiner.data.yolo import label_path

W, H = 40, 30  # every image on disk


def _image(path: Path, size: tuple[int, int] = (W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)


def _shape(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[rows, cols] = True
    return mask


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major runs, background first, as COCO writes them by hand."""
    flat = mask.T.ravel().astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"size": [mask.shape[0], mask.shape[1]], "counts": ([0] if flat[0] else []) + runs}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


L_SHAPE = _shape(slice(12, 22), slice(10, 14)) | _shape(slice(18, 22), slice(10, 30))  # x 10..30, y 12..22
BLOB = _shape(slice(2, 8), slice(1, 9))  # x 1..9, y 2..8


def _coco_cfg(images: Path, annotations: Path, **data):
    return config_from_dict({"data": {"format": "coco", "train_images": str(images), "train_annotations": str(annotations),
                                      "val_images": str(images), "val_annotations": str(annotations), **data}}).data


def _write_coco(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def _coco_doc(images: list[dict], annotations: list[dict]) -> dict:
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "cap"}, {"id": 2, "name": "stem"}]}


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "images"
    for name in ("a.jpg", "b.png", "sub/c.jpg"):
        _image(images / name)
    doc = _coco_doc(
        [{"id": 1, "file_name": "b.png", "width": W, "height": H},
         {"id": 2, "file_name": "a.jpg", "width": W, "height": H},
         {"id": 3, "file_name": "sub/c.jpg", "width": 2 * W, "height": 2 * H}],  # annotated at twice the size
        [{"id": 7, "image_id": 2, "category_id": 1, "bbox": [3, 5, 17, 5], "segmentation": [[3, 5, 20, 5, 20, 10, 3, 10]]},
         {"id": 2, "image_id": 2, "category_id": 2, "bbox": [10, 12, 20, 10], "segmentation": _compressed_rle(L_SHAPE)},
         {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 2, 8, 6], "segmentation": _uncompressed_rle(BLOB)},
         {"id": 5, "image_id": 2, "category_id": 1, "bbox": [0.5, 0.25, 4, 3], "iscrowd": 0},
         {"id": 6, "image_id": 3, "category_id": 2, "bbox": [20, 10, 40, 30],
          "segmentation": [[20, 10, 60, 10, 60, 40, 20, 40]]}])
    return _coco_cfg(images, _write_coco(tmp_path, doc))


def test_coco_boxes_categories_and_annotation_order(coco):
    split = load_split(coco, "train")
    assert [i.file_name for i in split.images] == ["a.jpg", "b.png", "sub/c.jpg"]
    assert split.categories == {1: "cap", 2: "stem"}
    got = [(split.images[o.image].file_name, o.ref, o.category_id, o.box) for o in split.objects]
    assert got == [("a.jpg", "annotation 7", 1, (3.0, 5.0, 20.0, 10.0)),  # file order within an image, not id order
                   ("a.jpg", "annotation 2", 2, (10.0, 12.0, 30.0, 22.0)),
                   ("a.jpg", "annotation 5", 1, (0.5, 0.25, 4.5, 3.25)),
                   ("b.png", "annotation 4", 1, (1.0, 2.0, 9.0, 8.0)),
                   ("sub/c.jpg", "annotation 6", 2, (10.0, 5.0, 30.0, 20.0))]  # 80x60 frame scaled to 40x30
    assert split.skipped == {} and split.skipped_files == []


def test_coco_masks_from_polygon_and_both_rle_forms(coco):
    split = load_split(coco, "train")
    masks = ground_truth_masks(split, range(len(split.objects)))
    assert sorted(masks) == [0, 1, 3, 4]  # annotation 5 has no segmentation
    assert all(m.dtype == bool and m.shape == (H, W) for m in masks.values())
    assert np.array_equal(masks[0], _shape(slice(5, 10), slice(3, 20)))  # polygon
    assert np.array_equal(masks[1], L_SHAPE)  # compressed RLE
    assert np.array_equal(masks[3], BLOB)  # uncompressed RLE
    assert np.array_equal(masks[4], _shape(slice(5, 20), slice(10, 30)))  # drawn at 80x60, resized
    assert ground_truth_masks(split, [1]).keys() == {1}


def _yolo_root(tmp_path: Path) -> Path:
    """A dataset whose own root lies under an `images` folder: only the last /images/ becomes /labels/."""
    root = tmp_path / "images" / "ds"
    _image(root / "images" / "train" / "a.jpg")
    _image(root / "images" / "train" / "deep" / "b.PNG")
    _image(root / "images" / "extra" / "e.jpeg")
    (root / "images" / "train" / "notes.md").write_text("not an image")
    _image(root / "lists" / "images" / "c.jpg")
    _image(root / "images" / "val" / "d.jpg")
    labels = {
        "labels/train/a.txt": "0 0.25 0.5 0.1 0.2\n\n1 0.5 0.5 0.75 0.5 0.75 0.8 0.5 0.8\n",
        "labels/train/deep/b.txt": "1 0.5 0.5 0.5 0.5\n",
        "labels/extra/e.txt": "0 0.1 0.1 0.1 0.1\n",
        "lists/labels/c.txt": "0 0.5 0.5 0.2 0.2\n",
        "labels/val/d.txt": "1 0.3 0.3 0.2 0.2\n",
    }
    for name, text in labels.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "lists" / "val.txt").write_text("./images/c.jpg\n\nimages/val/d.jpg\n")
    return root


def _yolo_cfg(path: Path, doc: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return config_from_dict({"data": {"format": "yolo", "yolo_data": str(path)}}).data


def _boxes(split: SplitData) -> list[tuple[str, str, int, tuple]]:
    return [(split.images[o.image].file_name, o.ref, o.category_id, pytest.approx(o.box)) for o in split.objects]


def test_yolo_folder_with_box_and_segment_lines(tmp_path):
    root = _yolo_root(tmp_path)
    cfg = _yolo_cfg(root / "data.yaml", {"train": "images/train", "val": "lists/val.txt", "names": ["cap", "stem"]})
    split = load_split(cfg, "train")
    assert split.categories == {0: "cap", 1: "stem"}
    assert [(split.images[o.image].file_name, o.ref, o.category_id, o.box) for o in split.objects] == [
        ("images/train/a.jpg", "labels/train/a.txt line 1", 0, pytest.approx((8.0, 12.0, 12.0, 18.0))),
        ("images/train/a.jpg", "labels/train/a.txt line 3", 1, pytest.approx((20.0, 15.0, 30.0, 24.0))),
        ("images/train/deep/b.PNG", "labels/train/deep/b.txt line 1", 1, pytest.approx((10.0, 7.5, 30.0, 22.5)))]
    assert split.objects[0].mask is None
    masks = ground_truth_masks(split, [0, 1])
    assert list(masks) == [1] and np.array_equal(masks[1], _shape(slice(15, 24), slice(20, 30)))


def test_yolo_txt_list_and_list_of_folders_with_names_as_mapping(tmp_path):
    _yolo_root(tmp_path)
    cfg = _yolo_cfg(tmp_path / "cfg" / "data.yaml", {"path": "../images/ds", "train": ["images/train", "images/extra"],
                                                      "val": "lists/val.txt", "names": {0: "cap", 1: "stem"}})
    val = load_split(cfg, "val")
    assert [i.file_name for i in val.images] == ["images/val/d.jpg", "lists/images/c.jpg"]
    assert [o.ref for o in val.objects] == ["labels/val/d.txt line 1", "lists/labels/c.txt line 1"]
    assert val.objects[0].box == pytest.approx((8.0, 6.0, 16.0, 12.0))
    train = load_split(cfg, "train")
    assert [i.file_name for i in train.images] == ["images/extra/e.jpeg", "images/train/a.jpg", "images/train/deep/b.PNG"]
    assert train.categories == {0: "cap", 1: "stem"}


def test_label_path_replaces_only_the_last_images_segment():
    assert label_path(Path("/d/images/set/images/train/x.y.JPG")) == Path("/d/images/set/labels/train/x.y.txt")
    assert label_path(Path("/d/pics/a.png")) == Path("/d/pics/a.txt")


def test_the_same_objects_in_coco_and_yolo_give_the_same_boxes(tmp_path):
    boxes = [(0, [3.0, 5.0, 17.0, 5.0]), (1, [10.5, 12.25, 20.0, 10.5]), (0, [0.0, 0.0, 40.0, 30.0])]
    _image(tmp_path / "coco" / "a.jpg")
    anns = [{"id": i + 1, "image_id": 1, "category_id": c + 1, "bbox": b} for i, (c, b) in enumerate(boxes)]
    doc = _coco_doc([{"id": 1, "file_name": "a.jpg", "width": W, "height": H}], anns)
    from_coco = load_split(_coco_cfg(tmp_path / "coco", _write_coco(tmp_path, doc)), "train")
    root = tmp_path / "yolo"
    _image(root / "images" / "a.jpg")
    (root / "labels").mkdir()
    lines = [f"{c} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f}" for c, (x, y, w, h) in boxes]
    (root / "labels" / "a.txt").write_text("\n".join(lines))
    from_yolo = load_split(_yolo_cfg(root / "data.yaml", {"train": "images", "val": "images", "names": ["cap", "stem"]}),
                           "train")
    assert len(from_coco.objects) == len(from_yolo.objects) == 3
    for c, y in zip(from_coco.objects, from_yolo.objects):
        assert y.box == pytest.approx(c.box, abs=1e-4) and y.category_id + 1 == c.category_id


def _entries(split: SplitData) -> list[tuple[str, str, str]]:
    return [(s["file_name"], s["reason"], s.get("detail", "")) for s in split.skipped_files]


def test_coco_bad_inputs_are_skipped_by_reason(tmp_path):
    images = tmp_path / "images"
    for name in ("a.jpg", "b.jpg", "empty.jpg"):
        _image(images / name)
    good = {"category_id": 1, "bbox": [1, 1, 10, 10]}
    doc = _coco_doc(
        [{"id": 1, "file_name": "a.jpg", "width": W, "height": H}, {"id": 2, "file_name": "gone.jpg"},
         {"id": 3, "file_name": "a.jpg"}, {"id": 4, "file_name": "empty.jpg"}, {"id": 5, "file_name": "b.jpg"}],
        [{"id": 10, "image_id": 1, **good},
         {"id": 11, "image_id": 99, **good},
         {"id": 12, "image_id": 1, "category_id": 1, "bbox": [50, 40, 5, 5]},
         {"id": 13, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 4]},
         {"id": 14, "image_id": 1, "category_id": 1, "bbox": [5, 5, 1.5, 10]},
         {"id": 15, "image_id": 1, "category_id": 9, "bbox": [1, 1, 10, 10]},
         {"id": 16, "image_id": 1, "iscrowd": 1, **good},
         {"id": 17, "image_id": 1, "category_id": 1, "bbox": [1, 2, "x", 4]},
         {"id": 18, "image_id": 1, "segmentation": [[1, 2, 3]], **good},
         {"id": 19, "image_id": 1, "segmentation": {"size": [H, W], "counts": [5, 10]}, **good},
         {"id": 20, "image_id": 2, **good},
         {"id": 21, "image_id": 3, **good},
         {"id": 22, "image_id": 5, "category_id": 1, "bbox": [5, 5, 0, 4]}])
    annotations = _write_coco(tmp_path, doc)
    split = load_split(_coco_cfg(images, annotations, min_box_size=2.0), "train")
    assert [o.ref for o in split.objects] == ["annotation 10"]
    assert split.skipped == {"unknown_image": 1, "duplicate_image": 1, "missing_image": 1, "no_objects": 1,
                             "outside_image": 1, "invalid_box": 3, "too_small": 1, "unknown_category": 1, "crowd": 1,
                             "bad_segmentation": 2}
    entries = _entries(split)
    assert (str(annotations), "unknown_image", "annotation 11: image_id 99 is not in 'images'") in entries
    assert ("gone.jpg", "missing_image", str(images / "gone.jpg")) in entries
    assert ("empty.jpg", "no_objects", "") in entries
    by_ref = {d.split(":")[0]: r for _, r, d in entries if d.startswith("annotation")}
    assert by_ref == {"annotation 11": "unknown_image", "annotation 12": "outside_image", "annotation 13": "invalid_box",
                      "annotation 14": "too_small", "annotation 15": "unknown_category", "annotation 16": "crowd",
                      "annotation 17": "invalid_box", "annotation 18": "bad_segmentation",
                      "annotation 19": "bad_segmentation", "annotation 22": "invalid_box"}
    assert [f for f, r, _ in entries if r == "duplicate_image"] == ["a.jpg"]


def test_yolo_bad_lines_name_the_label_file_and_line(tmp_path):
    root = tmp_path / "ds"
    _image(root / "images" / "a.jpg")
    _image(root / "images" / "nolabel.jpg")
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n0 0.5 0.5\n0 a b c d\n7 0.5 0.5 0.2 0.2\n"
                                           "0 1.5 1.5 0.2 0.2\n0 nan 0.5 0.2 0.2\n0 0.5 0.5 0 0.2\n0 0.5 0.5 0.02 0.5\n"
                                           "0.5 0.5 0.5 0.2 0.2\n")
    (root / "list.txt").write_text("images/a.jpg\nimages/nolabel.jpg\nimages/missing.jpg\nimages/readme.md\n")
    cfg = _yolo_cfg(root / "data.yaml", {"train": "list.txt", "val": "list.txt", "names": ["cap"]})
    split = load_split(cfg, "train")
    assert [o.ref for o in split.objects] == ["labels/a.txt line 1"]
    entries = _entries(split)
    problems = {d.split(":")[0]: r for _, r, d in entries if d.startswith("labels/")}
    assert problems == {"labels/a.txt line 2": "bad_label_line", "labels/a.txt line 3": "bad_label_line",
                        "labels/a.txt line 4": "unknown_category", "labels/a.txt line 5": "outside_image",
                        "labels/a.txt line 6": "bad_label_line", "labels/a.txt line 7": "invalid_box",
                        "labels/a.txt line 8": "too_small", "labels/a.txt line 9": "bad_label_line"}
    assert all(f == "images/a.jpg" for f, _, d in entries if d.startswith("labels/"))
    assert ("images/nolabel.jpg", "no_objects", "") in entries
    assert ("images/missing.jpg", "missing_image", str(root / "images" / "missing.jpg")) in entries
    assert [(f, r) for f, r, _ in entries if r == "not_an_image"] == [("images/readme.md", "not_an_image")]


def _whole_file_cases(tmp_path: Path) -> list[tuple[object, str]]:
    """(config, text the one-line message must hold) for files that cannot be read as a whole."""
    images = tmp_path / "images"
    images.mkdir()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"images": [\n')
    no_key = _write_coco(tmp_path, {"images": [], "annotations": []})
    wrong_type = tmp_path / "wrong.json"
    wrong_type.write_text(json.dumps({"images": {}, "annotations": [], "categories": []}))
    bad_category = tmp_path / "cat.json"
    bad_category.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": "x"}]}))
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "bad.yaml").write_text("train: [images\n")
    return [
        (_coco_cfg(images, tmp_path / "none.json"), "none.json"),
        (_coco_cfg(tmp_path / "nofolder", no_key), "nofolder"),
        (_coco_cfg(images, bad_json), "bad.json' line 2"),
        (_coco_cfg(images, no_key), "key 'categories' is missing"),
        (_coco_cfg(images, wrong_type), "key 'images' is a dict"),
        (_coco_cfg(images, bad_category), "categories[0]"),
        (_yolo_cfg(tmp_path / "y1" / "data.yaml", {"val": "images", "names": ["a"]}), "no key 'train'"),
        (_yolo_cfg(ds / "d2.yaml", {"train": "nowhere", "val": "images", "names": ["a"]}), "key 'train' names"),
        (_yolo_cfg(ds / "d3.yaml", {"train": "images", "val": "images"}), "key 'names'"),
        (_yolo_cfg(ds / "d4.yaml", {"path": "absent", "train": "images", "names": ["a"]}), "key 'path'"),
        (config_from_dict({"data": {"format": "yolo", "yolo_data": str(ds / "bad.yaml")}}).data, "bad.yaml' line"),
        (config_from_dict({"data": {"format": "yolo", "yolo_data": str(ds / "none.yaml")}}).data, "none.yaml"),
    ]


def test_whole_file_problems_are_one_line_data_errors(tmp_path):
    for cfg, expected in _whole_file_cases(tmp_path):
        with pytest.raises(DataError) as caught:
            load_split(cfg, "train")
        message = str(caught.value)
        assert expected in message and "\n" not in message, message


def test_fungitastic_parts_masks_are_read_once_for_all_objects(tmp_path):
    part = _shape(slice(3, 9), slice(4, 12))
    masks_file = tmp_path / "masks.parquet"
    pd.DataFrame([{"file_name": "a.jpg", "label": "cap", "width": W, "height": H, "rle": str(encode_cvat_rle(part))}]
                 ).to_parquet(masks_file)
    images = [ImageRecord("a.jpg", tmp_path / "a.jpg", W, H), ImageRecord("b.jpg", tmp_path / "b.jpg", W, H)]
    objects = [ObjectRecord(0, (4, 3, 12, 9), 1, "parts"), ObjectRecord(1, (0, 0, 5, 5), 1, "parts")]
    masks = ground_truth_masks(SplitData("train", images, objects, masks_file=masks_file), [0, 1])
    assert list(masks) == [0] and np.array_equal(masks[0], part)  # b.jpg has no rows
