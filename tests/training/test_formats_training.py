"""Training, refining and evaluating on a multi-object dataset in COCO and YOLO layouts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import small_config

from boxrefiner.config import config_from_dict
from boxrefiner.data.matching import pairwise_iou
from boxrefiner.data.splits import load_split
from boxrefiner.data.synthetic import generate_multi_object
from boxrefiner.infer.evaluate import cases_from_rows, split_ap
from boxrefiner.training.trainer import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def multi_root(tmp_path_factory):
    return generate_multi_object(tmp_path_factory.mktemp("multi") / "ds", train=8, val=4, seed=5, size=160)


def layout_config(root, work, layout: str, **data):
    files = ({"format": "yolo", "yolo_data": str(root / "data.yaml")} if layout == "yolo" else
             {"format": "coco", **{f"{s}_{k}": str(root / p.format(s=s)) for s in ("train", "val")
                                   for k, p in (("images", "images/{s}"), ("annotations", "annotations/instances_{s}.json"))}})
    raw = small_config(root, work, data={**files, **data}, training={"epochs": 1, "batch_size": 6})
    raw["optimization"]["feature_cache"]["cache_dir"] = str(work.parent / "features")  # shared by both layouts
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def both_layouts(multi_root, tmp_path_factory):
    runs = {}
    for layout in ("coco", "yolo"):
        work = tmp_path_factory.mktemp(layout)
        cfg = layout_config(multi_root, work, layout)
        runs[layout] = (cfg, work, train(cfg, CPU))
    return runs


def test_coco_and_yolo_give_the_same_objects(multi_root, tmp_path):
    splits = [load_split(layout_config(multi_root, tmp_path, layout).data, "train") for layout in ("coco", "yolo")]
    coco, yolo = splits
    assert len(coco.objects) > len(coco.images)  # several objects on some images
    assert [i.file_name for i in coco.images] == [i.file_name.split("/")[-1] for i in yolo.images]
    for a, b in zip(coco.objects, yolo.objects):
        assert a.image == b.image and a.box == pytest.approx(b.box, abs=1e-3)
        assert coco.category_name(a.category_id) == yolo.category_name(b.category_id)


def test_both_layouts_train_the_same_first_epoch(both_layouts):
    """The generator writes YOLO labels with 10 decimals and the reader snaps normalised boxes to 1e-6
    pixels: both layouts then give the same float32 boxes, and the same run (with 6 decimals, Adam's
    first, sign-like steps turn the 1e-4-pixel rounding into loss differences of about 1e-3)."""
    (_, _, coco), (_, _, yolo) = both_layouts["coco"], both_layouts["yolo"]
    timing = ("epoch_seconds", "data_seconds", "samples_per_second", "val_seconds")
    compared = [k for k, v in coco[0].items() if isinstance(v, float) and k not in timing]
    assert {"train_loss", "val_loss", "val_iou_refined_large"} <= set(compared)
    for key in compared:
        assert coco[0][key] == pytest.approx(yolo[0][key], abs=1e-6), key


def test_the_second_layout_finds_the_first_ones_features(both_layouts):
    _, work, _ = both_layouts["yolo"]
    log = (work / "out" / "metrics.jsonl").read_text()
    assert json.loads(log.splitlines()[0])["cache_hit_rate"] == 1.0


def test_detections_train_and_validate_and_unmatched_ones_are_listed(multi_root, tmp_path):
    cfg = layout_config(multi_root, tmp_path, "coco", train_detections=str(multi_root / "detections/train.json"),
                        val_detections=str(multi_root / "detections/val.json"), detection_mix=1.0)
    [record] = train(cfg, CPU)
    assert record["val_iou_input_detections"] < 0.85  # the simulated detector is biased
    levels = [record[f"val_iou_refined_{n}"] for n in ("small", "medium", "large", "detections")]
    assert record["val_iou_refined_levels"] == pytest.approx(sum(levels) / 4)
    listed = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    unmatched = [r for r in listed if r["reason"] == "unmatched_detection"]
    assert unmatched and all(r["detail"].startswith("row ") for r in unmatched)  # false positives, by row


def test_refine_and_evaluate_read_the_runs_dataset(both_layouts, multi_root, tmp_path):
    cfg, work, _ = both_layouts["coco"]
    from boxrefiner.cli.evaluate import main as evaluate_main
    from boxrefiner.cli.refine import main as refine_main
    checkpoint = work / "ckpt" / "last.pth"
    detections = multi_root / "detections" / "val.json"
    out = tmp_path / "refined.json"
    assert refine_main(["--checkpoint", str(checkpoint), "--split", "val", "--detections", str(detections),
                        "--output", str(out), "--num-workers", "0"]) == 0
    rows, given = json.loads(out.read_text()), json.loads(detections.read_text())
    assert [r["file_name"] for r in rows] == [r["file_name"] for r in given]  # order kept
    assert all("bbox_input" in r for r in rows)
    report_path = tmp_path / "report.json"
    assert evaluate_main(["--checkpoint", str(checkpoint), "--refined", str(out), "--num-workers", "0",
                          "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["ap"]["class_aware"] and report["ap"]["detections"] == len(given)
    assert 0 <= report["ap"]["input"]["AP"] < 0.9 and report["ap"]["input"]["AP50"] >= report["ap"]["input"]["AP75"]
    assert set(report["categories"]) == {"red_cap", "yellow_cap", "violet_cap"}
    split = load_split(cfg.data, "val")
    truth = {}
    for o in split.objects:
        truth.setdefault(split.images[o.image].file_name, []).append(o.box)
    strays = sum(pairwise_iou([r["bbox"]], truth[r["file_name"]]).max() == 0 for r in given)
    assert report["skipped"].get("unmatched_detection", 0) == strays  # false positives: in the AP only
    assert sum(c["boxes"] for c in report["categories"].values()) == report["boxes"]


def test_ap_is_one_for_the_truth_and_zero_for_boxes_elsewhere(multi_root, tmp_path):
    split = load_split(layout_config(multi_root, tmp_path, "coco").data, "val")
    exact = [{"file_name": split.images[o.image].file_name, "bbox": list(o.box), "score": 0.9} for o in split.objects]
    far = [{"file_name": r["file_name"], "bbox": [0, 0, 2, 2], "score": 0.5} for r in exact]

    def ap(rows):
        cases, _ = cases_from_rows(rows, split, "xyxy", refined=False)
        return split_ap(split, cases, unread=set())

    report = ap(exact)
    assert report["input"]["AP"] == pytest.approx(1.0) and not report["class_aware"]
    assert report["refined"]["AP"] is None  # nothing refined
    assert ap(far)["input"]["AP"] == pytest.approx(0.0)
    labelled = [{**r, "category_id": o.category_id} for r, o in zip(exact, split.objects)]
    assert ap(labelled)["class_aware"] and ap(labelled)["input"]["AP"] == pytest.approx(1.0)
    wrong = [{**r, "category_id": 1 + o.category_id % 3} for r, o in zip(exact, split.objects)]
    assert ap(wrong)["input"]["AP"] == pytest.approx(0.0)  # class-aware: a right box of the wrong class misses


def test_a_coco_copy_of_fungitastic_trains_exactly_as_the_original(synthetic_root, tmp_path):
    """One object per image through the COCO reader and the object batches: the FungiTastic run's numbers."""
    fungi = config_from_dict(small_config(synthetic_root, tmp_path / "f", training={"epochs": 2}))
    files = {}
    for split in ("train", "val"):
        data = load_split(fungi.data, split)
        doc = {"images": [{"id": i, "file_name": r.file_name, "width": r.width, "height": r.height}
                          for i, r in enumerate(data.images)],
               "annotations": [{"id": k, "image_id": o.image, "category_id": 1, "iscrowd": 0,
                                "bbox": [o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]]}
                               for k, o in enumerate(data.objects)],
               "categories": [{"id": 1, "name": "fungus"}]}
        (tmp_path / f"{split}.json").write_text(json.dumps(doc))
        files.update({f"{split}_images": str(data.images[0].image_path.parent),
                      f"{split}_annotations": str(tmp_path / f"{split}.json")})
    raw = small_config(synthetic_root, tmp_path / "c", training={"epochs": 2}, data={"format": "coco", **files})
    raw["optimization"]["feature_cache"]["cache_dir"] = fungi.optimization.feature_cache.cache_dir
    original, copy = train(fungi, CPU), train(config_from_dict(raw), CPU)
    for a, b in zip(original, copy):
        for key in ("train_loss", "val_loss", "val_iou_refined", "val_iou_refined_large", "val_worse_rate"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_yolo_finds_detections_named_by_bare_file_name(multi_root, tmp_path):
    cfg = layout_config(multi_root, tmp_path, "yolo")
    split = load_split(cfg.data, "val", detections=str(multi_root / "detections/val.json"))
    assert split.images[0].file_name.startswith("images/val/")  # YOLO names images by their path
    assert len(split.detections) >= len(split.objects) // 2  # the detector's bare names found them
    bad = tmp_path / "nowhere.json"
    bad.write_text(json.dumps([{"file_name": "nowhere.jpg", "bbox": [0, 0, 5, 5]}]))
    from boxrefiner.data.layout import DataError
    with pytest.raises(DataError, match="none of its 1 boxes matched an object of split 'val'"):
        load_split(cfg.data, "val", detections=str(bad))


def test_refine_split_reaches_images_without_objects(both_layouts, multi_root, tmp_path):
    """A negative image (listed, no annotation) has no training object, but a detector may still fire on it."""
    import shutil

    from boxrefiner.infer.apply import layout_resolver
    cfg, _, _ = both_layouts["coco"]
    doc = json.loads((multi_root / "annotations/instances_val.json").read_text())
    images = tmp_path / "images"
    shutil.copytree(multi_root / "images/val", images)
    shutil.copy(images / doc["images"][0]["file_name"], images / "negative.jpg")
    doc["images"].append({**doc["images"][0], "id": 10_000, "file_name": "negative.jpg"})
    (tmp_path / "val.json").write_text(json.dumps(doc))
    data = dataclasses.replace(cfg.data, val_images=str(images), val_annotations=str(tmp_path / "val.json"))
    assert "negative.jpg" not in [i.file_name for i in load_split(data, "val").images]  # no objects: not a sample
    assert layout_resolver(data, "val")("negative.jpg") == images / "negative.jpg"
