"""What refine writes besides its own JSON: COCO results (read back by pycocotools), YOLO label files
(parsed back to the boxes), one picture per image, and evaluate's IoU-gain plots."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_config
from PIL import Image
from pycocotools.coco import COCO

from boxrefiner.cli.evaluate import main as evaluate_main
from boxrefiner.cli.refine import main as refine_main
from boxrefiner.config import config_from_dict
from boxrefiner.data.detections import DetectionsError, to_xyxy
from boxrefiner.data.synthetic import simulated_detections
from boxrefiner.infer.export import output_path, write_yolo
from boxrefiner.plots.draw import REFINED
from boxrefiner.training.trainer import train


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("outputs")
    cfg = config_from_dict(small_config(synthetic_root, work, training={"epochs": 2},
                                        refinement={"max_iter": 2, "gate": False}))
    train(cfg, torch.device("cpu"))
    return work / "ckpt" / "last.pth"


@pytest.fixture(scope="module")
def val_images(synthetic_root):
    return synthetic_root / "FungiTastic-Mini" / "val" / "300p"


@pytest.fixture(scope="module")
def rows(synthetic_root):
    """The simulated detector's boxes (xywh, with scores and a class), a missing image and a row without a box."""
    found = simulated_detections(synthetic_root, "val", seed=5, per_image=2)
    for k, row in enumerate(found):
        x0, y0, x1, y1 = row["bbox"]
        row["bbox"], row["category_id"] = [x0, y0, x1 - x0, y1 - y0], 1 + k % 2
    return [*found, {"file_name": "gone.JPG", "bbox": [1, 2, 30, 40], "score": 0.5}, {"file_name": "x.JPG"}]


def refine(checkpoint, images, rows, folder, *extra):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "in.json").write_text(json.dumps(rows))
    return refine_main(["--checkpoint", str(checkpoint), "--images", str(images), "--detections",
                        str(folder / "in.json"), "--box-format", "xywh", "--num-workers", "0", *extra])


@pytest.fixture(scope="module")
def refined(trained, val_images, rows, tmp_path_factory):
    """The tool's own JSON output, which the other formats must agree with."""
    folder = tmp_path_factory.mktemp("json")
    assert refine(trained, val_images, rows, folder, "--output", str(folder / "out.json")) == 0
    return json.loads((folder / "out.json").read_text())


def annotations(val_images, path):
    names = sorted(p.name for p in val_images.iterdir())
    images = [{"id": 100 + 3 * k, "file_name": name, "width": Image.open(val_images / name).width,
               "height": Image.open(val_images / name).height} for k, name in enumerate(names)]
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "cap"},
                                                                                    {"id": 2, "name": "stem"}]}))
    return {i["file_name"]: i["id"] for i in images}


def test_coco_results_load_in_pycocotools_and_match_the_refined_boxes(trained, val_images, rows, refined, tmp_path,
                                                                      capsys):
    ids = annotations(val_images, tmp_path / "instances.json")
    out = tmp_path / "results.json"
    assert refine(trained, val_images, rows, tmp_path, "--output", str(out), "--output-format", "coco",
                  "--coco-annotations", str(tmp_path / "instances.json")) == 0
    results = json.loads(out.read_text())
    objects = [r for r in refined if "bbox" in r and r["file_name"] in ids]
    assert len(results) == len(objects) == len(rows) - 2  # the missing image's row and the boxless row are out
    truth = COCO(str(tmp_path / "instances.json"))
    loaded = truth.loadRes(str(out))
    for result, row in zip(loaded.loadAnns(loaded.getAnnIds()), objects):
        assert result["image_id"] == ids[row["file_name"]] and result["category_id"] == row["category_id"]
        assert result["bbox"] == pytest.approx(row["bbox"], abs=0.01) and result["score"] == row["score"]
        assert result["iou_pred"] == row["iou_pred"] and "bbox_input" not in result
        assert row["bbox"] != row["bbox_input"]  # refined boxes, not the detector's
    assert "not written: 1 image not in the COCO annotations, 1 malformed bbox" in capsys.readouterr().err


def test_coco_image_ids_default_to_the_sorted_file_names(trained, val_images, rows, refined, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert refine(trained, val_images, rows, tmp_path, "--output", str(out), "--output-format", "coco") == 0
    results = json.loads(out.read_text())
    names = sorted({r["file_name"] for r in rows})
    assert [r["image_id"] for r in results] == [names.index(r["file_name"]) + 1 for r in results]
    gone = [r for r in results if r["file_name"] == "gone.JPG"]
    assert len(gone) == 1 and gone[0]["bbox"] == [1, 2, 30, 40] and gone[0]["refine_error"] == "missing_image"
    assert "(1 of them with the input box: not refined)" in capsys.readouterr().err


def test_yolo_lines_parse_back_to_the_refined_boxes(trained, val_images, rows, refined, tmp_path):
    out = tmp_path / "labels"
    assert refine(trained, val_images, rows, tmp_path, "--output", str(out), "--output-format", "yolo") == 0
    files = sorted(out.glob("*.txt"))
    assert [f.name for f in files] == sorted({Path(r["file_name"]).stem + ".txt" for r in rows[:-2]})
    by_image: dict[str, list[dict]] = {}
    for row in refined[:-2]:
        by_image.setdefault(row["file_name"], []).append(row)
    for name, mine in by_image.items():
        width, height = Image.open(val_images / name).size
        lines = (out / (Path(name).stem + ".txt")).read_text().splitlines()
        assert len(lines) == len(mine)
        for line, row in zip(lines, mine):
            k, cx, cy, w, h, score = line.split()
            x0, y0, x1, y1 = to_xyxy(row["bbox"], "xywh")
            assert int(k) == row["category_id"] and float(score) == pytest.approx(row["score"])
            assert [float(cx) * width, float(cy) * height, float(w) * width, float(h) * height] == pytest.approx(
                [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], abs=1e-3)


def test_visualize_draws_each_image_with_its_refined_boxes_and_masks(trained, val_images, rows, refined, tmp_path):
    pictures, masks = tmp_path / "pictures", tmp_path / "masks"
    assert refine(trained, val_images, rows, tmp_path, "--output", str(tmp_path / "out.json"), "--visualize",
                  str(pictures), "--masks", str(masks)) == 0
    names = sorted({r["file_name"] for r in rows[:-2]})
    assert sorted(p.name for p in pictures.glob("*.jpg")) == [Path(n).stem + ".jpg" for n in names]
    row = refined[0]
    with Image.open(val_images / row["file_name"]) as image:
        scale = 640 / max(image.size)  # 300p images are drawn at 640 pixels
    with Image.open(pictures / (Path(row["file_name"]).stem + ".jpg")) as picture:
        _x0, y0, x1, y1 = (v * scale for v in to_xyxy(row["bbox"], "xywh"))
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    edge = pixels[round(y0) + 2:round(y1) - 2, round(x1) - 2:round(x1) + 2].reshape(-1, 3)
    near = np.abs(edge - np.array(REFINED)).max(1) < 60  # the refined box's right edge, in its colour (JPEG blurs it)
    assert near.mean() > 0.1
    plain = tmp_path / "plain"
    assert refine(trained, val_images, rows, tmp_path, "--output", str(tmp_path / "out2.json"), "--visualize",
                  str(plain)) == 0
    with Image.open(plain / (Path(row["file_name"]).stem + ".jpg")) as picture:
        untinted = np.asarray(picture.convert("RGB")).astype(int)
    drawn = np.zeros(untinted.shape[:2], bool)  # where HQ-SAM's masks of this image's rows are
    for r in refined[:2]:
        assert r["file_name"] == row["file_name"]
        out = json.loads((tmp_path / "out.json").read_text())
        with Image.open(next(o["mask"] for o in out if o["bbox"] == r["bbox"] and o["file_name"] == r["file_name"])) as m:
            drawn |= np.asarray(m.resize(untinted.shape[1::-1], Image.Resampling.NEAREST)) > 127
    difference = np.abs(pixels - untinted).max(2)
    assert drawn.any() and not drawn.all()
    assert difference[drawn].mean() > 20 and difference[~drawn].mean() < difference[drawn].mean() / 3


def test_evaluate_writes_the_gain_histogram_and_scatter(trained, tmp_path):
    assert evaluate_main(["--checkpoint", str(trained), "--num-workers", "0", "--output", str(tmp_path / "r.json")]) == 0
    for name in ("evaluate_val_iou_gain.png", "evaluate_val_iou_before_after.png"):
        with Image.open(tmp_path / name) as png:  # beside --output
            assert png.format == "PNG" and png.width == round(4.2 * 4 * 90)  # the main set and three levels
    assert evaluate_main(["--checkpoint", str(trained), "--num-workers", "0", "--plots", str(tmp_path / "p"),
                          "--no-plots"]) == 0
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("extra, message", [
    (["--output-format", "yolo", "--output", "{file}"], "is a file; --output-format yolo writes a folder"),
    (["--output", "{folder}"], "is a folder; --output-format json writes a JSON file"),
    (["--output", "o.json", "--coco-annotations", "{file}"], "--coco-annotations is for --output-format coco"),
    (["--output", "o.json", "--output-format", "coco", "--coco-annotations", "nope.json"], "does not exist"),
])
def test_outputs_that_do_not_fit_the_format_are_one_line(trained, val_images, rows, tmp_path, capsys, extra, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    extra = [e.format(file=tmp_path / "file", folder=tmp_path / "folder") for e in extra]
    assert refine(trained, val_images, rows, tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_label_and_picture_paths_keep_subfolders_and_never_climb(tmp_path):
    assert output_path(tmp_path, "train/300p/a.JPG", ".txt") == tmp_path / "train" / "300p" / "a.txt"
    assert output_path(tmp_path, "/abs/b.jpg", ".jpg") == tmp_path / "b.jpg"
    assert output_path(tmp_path, "../../c.png", ".txt") == tmp_path / "c.txt"
    with pytest.raises(DetectionsError, match="would both write"):
        write_yolo(tmp_path / "labels", {"x/a.jpg": ["0 0.5 0.5 0.1 0.1 1"], "x/a.png": ["0 0.5 0.5 0.1 0.1 1"]})
    assert not (tmp_path / "labels").exists()  # nothing written before the clash was found


def test_visualize_into_the_images_folder_or_clashing_names_is_refused_before_any_work(trained, val_images, rows,
                                                                                        tmp_path, capsys):
    before = sorted(p.stat().st_mtime_ns for p in val_images.iterdir())
    assert refine(trained, val_images, rows, tmp_path, "--output", str(tmp_path / "o.json"), "--visualize",
                  str(val_images)) == 2
    err = capsys.readouterr().err.strip()
    assert "holds files this tool did not write" in err and len(err.splitlines()) == 1
    assert sorted(p.stat().st_mtime_ns for p in val_images.iterdir()) == before and not (tmp_path / "o.json").exists()
    clash = [{"file_name": "a.jpg", "bbox": [1, 1, 5, 5]}, {"file_name": "a.png", "bbox": [1, 1, 5, 5]}]
    for extra in (["--visualize", str(tmp_path / "pictures")], ["--output-format", "yolo"]):
        assert refine(trained, val_images, clash, tmp_path, "--output", str(tmp_path / "labels"), *extra) == 2
        assert "images 'a.jpg' and 'a.png' would both write" in capsys.readouterr().err


def test_a_second_yolo_run_replaces_the_first_and_clips_to_the_image(trained, val_images, rows, tmp_path):
    out = tmp_path / "labels"
    assert refine(trained, val_images, rows, tmp_path, "--output", str(out), "--output-format", "yolo") == 0
    first = rows[0]["file_name"]
    width = Image.open(val_images / first).width
    again = [rows[0], {**rows[0], "bbox": [0, 0, 1e300, 1e300]}, {**rows[0], "bbox": [width + 5, 3, 10, 10]}]
    assert refine(trained, val_images, again, tmp_path, "--output", str(out), "--output-format", "yolo") == 0
    assert sorted(p.name for p in out.iterdir()) == [".boxrefiner-output", Path(first).stem + ".txt"]  # no stale files
    lines = (out / (Path(first).stem + ".txt")).read_text().splitlines()
    assert len(lines) == 2  # the box outside the image is not written
    assert lines[1].split()[1:5] == ["0.500000", "0.500000", "1.000000", "1.000000"]  # bad_box, clipped to the image


def test_a_picture_that_cannot_be_drawn_leaves_the_output_written(trained, val_images, rows, tmp_path, capsys,
                                                                  monkeypatch):
    from boxrefiner.infer import pictures

    def full_disk(image, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(pictures, "save_picture", full_disk)
    assert refine(trained, val_images, rows, tmp_path, "--output", str(tmp_path / "o.json"), "--visualize",
                  str(tmp_path / "pictures")) == 0
    assert len(json.loads((tmp_path / "o.json").read_text())) == len(rows)
    err = capsys.readouterr().err
    assert "wrote 0 pictures" in err and "(8 could not be drawn)" in err and "No space left on device" in err


def test_coco_image_ids_are_found_by_bare_name_when_the_detector_names_a_longer_path(tmp_path):
    from boxrefiner.infer.export import annotation_image_ids

    (tmp_path / "a.json").write_text(json.dumps({"images": [{"id": 7, "file_name": "a.jpg"},
                                                            {"id": 9, "file_name": "x/b.jpg"}]}))
    find = annotation_image_ids(tmp_path / "a.json")
    assert (find("a.jpg"), find("val/a.jpg"), find("b.jpg"), find("x/b.jpg"), find("c.jpg")) == (7, 7, 9, 9, None)
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"file_name": "a.jpg"}]}))
    with pytest.raises(DetectionsError, match="'images' must be a list of"):
        annotation_image_ids(tmp_path / "bad.json")
