"""The multi-object synthetic set (COCO + YOLO over the same JPEGs, a biased detector's boxes) and the
simulated detections of the FungiTastic set, read back with json and plain Python only."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from boxrefiner.cli.synth import main
from boxrefiner.config import DataConfig
from boxrefiner.data.synthetic import (
    MULTI_CATEGORIES,
    biased_detections,
    generate,
    generate_multi_object,
    simulated_detections,
)

SIZE = 128


def digest_tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    return generate_multi_object(tmp_path_factory.mktemp("multi") / "ds", train=6, val=3, seed=0, size=SIZE)


def coco(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def truth_by_file(root, split):
    """file_name -> [(xyxy box, category_id)] in annotation order."""
    data = coco(root, split)
    names = {im["id"]: im["file_name"] for im in data["images"]}
    out = {name: [] for name in names.values()}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        out[names[a["image_id"]]].append(((x, y, x + w, y + h), a["category_id"]))
    return out


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_same_arguments_same_files_other_seed_other_objects(multi, tmp_path):
    again = generate_multi_object(tmp_path / "again", train=6, val=3, seed=0, size=SIZE)
    assert digest_tree(multi) == digest_tree(again)
    other = generate_multi_object(tmp_path / "other", train=6, val=3, seed=1, size=SIZE)
    assert coco(other, "train")["annotations"] != coco(multi, "train")["annotations"]
    files = set(digest_tree(multi))
    assert {"data.yaml", "annotations/instances_train.json", "annotations/instances_val.json",
            "detections/train.json", "detections/val.json"} <= files
    assert sum(f.startswith("images/train/") for f in files) == 6 and sum(f.startswith("labels/val/") for f in files) == 3


def test_coco_images_are_the_saved_jpegs(multi):
    for split, count in (("train", 6), ("val", 3)):
        images = coco(multi, split)["images"]
        assert [im["file_name"] for im in images] == [f"{split}-0-{i:05d}.jpg" for i in range(count)]
        for im in images:
            with Image.open(multi / "images" / split / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"]) and max(img.size) == SIZE


def read_data_yaml(path):
    """data.yaml's top-level keys and its names mapping, parsed by hand (it is a fixed, simple shape)."""
    top, names = {}, {}
    for line in path.read_text().splitlines():
        if line.startswith("  "):
            key, value = line.strip().split(": ")
            names[int(key)] = value
        else:
            key, _, value = line.partition(":")
            top[key] = value.strip()
    return top, names


def test_coco_and_yolo_describe_the_same_objects(multi):
    top, names = read_data_yaml(multi / "data.yaml")
    assert top == {"path": ".", "train": "images/train", "val": "images/val", "names": ""}
    assert names == {c - 1: n for c, n in MULTI_CATEGORIES.items()}
    assert {c["id"]: c["name"] for c in coco(multi, "train")["categories"]} == MULTI_CATEGORIES
    for split in ("train", "val"):
        sizes = {im["file_name"]: (im["width"], im["height"]) for im in coco(multi, split)["images"]}
        for name, objects in truth_by_file(multi, split).items():
            lines = (multi / "labels" / split / name.replace(".jpg", ".txt")).read_text().splitlines()
            assert len(lines) == len(objects)
            width, height = sizes[name]
            for line, (box, category_id) in zip(lines, objects):
                fields = line.split()
                assert len(fields) == 5 and all(len(f.split(".")[1]) == 10 for f in fields[1:])
                cls, cx, cy, w, h = int(fields[0]), *map(float, fields[1:])
                yolo = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
                assert cls == category_id - 1
                assert yolo == pytest.approx(box, rel=1e-3, abs=1e-3)


def test_several_objects_per_image_every_category_some_small(multi):
    for split in ("train", "val"):
        per_image = [len(v) for v in truth_by_file(multi, split).values()]
        assert min(per_image) >= 1 and max(per_image) <= 3
    per_image = [len(v) for v in truth_by_file(multi, "train").values()]
    assert sum(n >= 2 for n in per_image) >= 2
    annotations = coco(multi, "train")["annotations"]
    assert {a["category_id"] for a in annotations} == set(MULTI_CATEGORIES)
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in annotations)
    sides = [min(a["bbox"][2:]) for split in ("train", "val") for a in coco(multi, split)["annotations"]]
    assert min(sides) < 0.25 * SIZE < max(sides)  # small and large objects


def test_boxes_are_the_tight_boxes_of_both_kinds_of_masks(multi):
    from pycocotools import mask as mask_utils

    kinds = set()
    for split in ("train", "val"):
        data = coco(multi, split)
        sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
        for a in data["annotations"]:
            seg = a["segmentation"]
            kinds.add(type(seg).__name__)
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, *sizes[a["image_id"]])) if isinstance(seg, list) else seg
            x, y, w, h = mask_utils.toBbox(rle)
            # RLE: our own mask, exact; polygons: as pycocotools rasterises them, every edge within a pixel
            tolerance = 1.0 if isinstance(seg, list) else 0.0
            assert np.abs(np.array([x, y, x + w, y + h]) - np.array(
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]])).max() <= tolerance
            if isinstance(seg, dict):
                assert seg["size"] == list(sizes[a["image_id"]]) and mask_utils.area(seg) == a["area"]
    assert kinds == {"list", "dict"}


def matched(root, split):
    """(detection, truth box, truth category) of every detection over an object, and the false positives."""
    truth = truth_by_file(root, split)
    pairs, background = [], []
    for row in json.loads((root / "detections" / f"{split}.json").read_text()):
        best, box, category_id = max((iou(row["bbox"], b), b, c) for b, c in truth[row["file_name"]])
        (pairs.append((row, box, category_id)) if best > 0 else background.append(row))
    return pairs, background


def test_detections_are_biased_the_same_way_on_every_box(multi):
    pairs, _ = matched(multi, "train")
    pairs += matched(multi, "val")[0]
    assert len(pairs) >= 10
    ious, grow, shift_x, shift_y = [], [], [], []
    for row, (x0, y0, x1, y1), category_id in pairs:
        b = row["bbox"]
        assert set(row) == {"file_name", "bbox", "score", "category_id"} and row["category_id"] == category_id
        assert all(round(v, 2) == v for v in b) and 0.5 < row["score"] < 1
        ious.append(iou(b, (x0, y0, x1, y1)))
        grow.append((b[2] - b[0]) * (b[3] - b[1]) / ((x1 - x0) * (y1 - y0)))
        shift_x.append(((b[0] + b[2]) - (x0 + x1)) / 2 / (x1 - x0))
        shift_y.append(((b[1] + b[3]) - (y0 + y1)) / 2 / (y1 - y0))
    assert 0.45 < np.mean(ious) < 0.75 and max(ious) < 0.95
    assert np.mean(grow) > 1.3 and np.mean(np.array(grow) > 1) > 0.9  # too large
    for shift in (shift_x, shift_y):  # down and right, nearly always (clipping at an edge can undo it)
        assert 0.05 < np.mean(shift) < 0.15 and np.mean(np.array(shift) > 0) > 0.8


def test_detections_lie_inside_their_images(multi):
    for split in ("train", "val"):
        sizes = {im["file_name"]: (im["width"], im["height"]) for im in coco(multi, split)["images"]}
        for row in json.loads((multi / "detections" / f"{split}.json").read_text()):
            x0, y0, x1, y1 = row["bbox"]
            width, height = sizes[row["file_name"]]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def test_detector_misses_and_false_positives_at_their_rates():
    rng = np.random.default_rng(0)
    objects = [((20.0, 30.0, 60.0, 90.0), 2), ((150.0, 40.0, 190.0, 70.0), 1)]
    images = 3000
    rows = [r for i in range(images) for r in biased_detections(rng, f"{i}.jpg", objects, 300, 200)]
    background = [r for r in rows if all(iou(r["bbox"], b) == 0 for b, _ in objects)]
    assert 0.03 < 1 - (len(rows) - len(background)) / (images * len(objects)) < 0.07  # about 5% missed
    assert 0.29 < len(background) / images < 0.38  # about one false positive per 3 images
    assert max(r["score"] for r in background) < 0.4 < min(r["score"] for r in rows if r not in background)


def test_cli_writes_the_coco_yolo_layout(tmp_path, capsys):
    root = tmp_path / "cli"
    assert main(["--out", str(root), "--layout", "coco-yolo", "--train", "2", "--val", "1", "--sizes", "96",
                 "--max-objects", "2", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert "detections/train.json" in printed and "detections/val.json" in printed
    data = coco(root, "train")
    assert [im["file_name"] for im in data["images"]] == ["train-4-00000.jpg", "train-4-00001.jpg"]
    assert max(max(im["width"], im["height"]) for im in data["images"]) == 96
    assert all(len(v) <= 2 for v in truth_by_file(root, "train").values())
    with pytest.raises(SystemExit):
        main(["--out", str(root), "--layout", "coco-yolo", "--detections", str(tmp_path / "d.json")])


@pytest.fixture(scope="module")
def fungi(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("fungi") / "ds", train=2, val=4, seed=2)


def test_simulated_detections_are_one_noisy_box_per_object(fungi):
    from boxrefiner.data.splits import load_split

    split = load_split(DataConfig(data_root=str(fungi)), "val")
    rows = simulated_detections(fungi, "val", seed=1)
    assert rows == simulated_detections(fungi, "val", seed=1)
    assert rows == simulated_detections(None, "val", seed=1, data=DataConfig(data_root=str(fungi)))
    assert [r["file_name"] for r in rows] == [split.images[o.image].file_name for o in split.objects]
    assert all(set(r) == {"file_name", "bbox", "score", "label"} and r["label"] == "fungus" for r in rows)
    ious = [iou(r["bbox"], o.box) for r, o in zip(rows, split.objects)]
    assert 0.2 < np.mean(ious) < 0.98 and max(ious) < 1
    many = simulated_detections(fungi, "val", seed=1, per_image=3)
    assert [r["file_name"] for r in many] == [r["file_name"] for r in rows for _ in range(3)]  # grouped by object
    assert [r["bbox"] for r in many[::3]] == [r["bbox"] for r in rows]  # the first draw of each object as with one
    assert all(len({tuple(r["bbox"]) for r in many[i:i + 3]}) == 3 for i in range(0, len(many), 3))  # independent


def test_simulated_detections_read_a_multi_object_layout(multi):
    pytest.importorskip("boxrefiner.data.coco", reason="the COCO layout reader is not there yet")
    from boxrefiner.data.splits import load_split

    cfg = DataConfig(format="coco", train_images=str(multi / "images" / "train"),
                     train_annotations=str(multi / "annotations" / "instances_train.json"),
                     val_images=str(multi / "images" / "val"),
                     val_annotations=str(multi / "annotations" / "instances_val.json"))
    split = load_split(cfg, "train")
    rows = simulated_detections(None, "train", seed=3, per_image=2, data=cfg)
    assert len(split.objects) == len(coco(multi, "train")["annotations"]) and len(rows) == 2 * len(split.objects)
    assert [r["file_name"] for r in rows[::2]] == [split.images[o.image].file_name for o in split.objects]
    assert [r["label"] for r in rows[::2]] == [split.category_name(o.category_id) for o in split.objects]
