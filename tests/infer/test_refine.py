"""Applying a trained refiner: the API, refine_boxes.py, evaluation, and HQ-SAM masks from the boxes."""

import json

import numpy as np
import pytest
import torch
from conftest import small_config
from PIL import Image

from boxrefiner.cli.evaluate import main as evaluate_main
from boxrefiner.cli.refine import main as refine_main
from boxrefiner.config import config_from_dict
from boxrefiner.data.detections import (
    DetectionsError,
    from_xyxy,
    parse_detections,
    to_xyxy,
)
from boxrefiner.data.fungitastic import ground_truth_mask, read_masks, split_paths
from boxrefiner.data.splits import load_split
from boxrefiner.data.synthetic import simulated_detections
from boxrefiner.features.cache import read_manifest
from boxrefiner.features.encoder import (
    EncoderError,
    EncoderIdentity,
    ImageEncoder,
    preprocess,
)
from boxrefiner.features.sam import (
    BoxPrompter,
    MaskDecoderUnavailable,
    build_sam_hq,
    load_sam_hq,
)
from boxrefiner.infer.evaluate import evaluate_cases, jittered_cases
from boxrefiner.infer.refiner import BoxRefiner
from boxrefiner.modeling.checkpoint import load_checkpoint
from boxrefiner.training.trainer import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """A refiner trained for a few epochs on the synthetic set (features cached under work/features); its
    stop threshold is high enough that some boxes stop early, in the trainer's validation and here."""
    work = tmp_path_factory.mktemp("refine")
    cfg = config_from_dict(small_config(synthetic_root, work, training={"epochs": 4},
                                        refinement={"max_iter": 3, "stop_threshold": 0.02}))
    history = train(cfg, CPU)
    return work / "ckpt" / "last.pth", work, history


@pytest.fixture(scope="module")
def val_images(synthetic_root):
    return synthetic_root / "FungiTastic-Mini" / "val" / "300p"


@pytest.fixture(scope="module")
def detections(synthetic_root):
    return simulated_detections(synthetic_root, "val", seed=5)


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def refine_cli(checkpoint, images, rows, tmp_path, *extra):
    out = tmp_path / "out.json"
    code = refine_main(["--checkpoint", str(checkpoint), "--images", str(images), "--detections",
                        str(write_json(tmp_path / "in.json", rows)), "--output", str(out), "--num-workers", "0", *extra])
    return code, (json.loads(out.read_text()) if out.exists() else None)


def test_api_repeats_the_trainers_validation_numbers(trained, synthetic_root):
    checkpoint, _, history = trained
    refiner = BoxRefiner.from_checkpoint(checkpoint, device="cpu", num_workers=0)
    split = load_split(refiner.cfg.data, "val")
    report = evaluate_cases(refiner, split, jittered_cases(refiner, split))
    assert refiner.cache_hits == len(split.images) and refiner.encoded == 0  # every feature from the cache
    assert report["box"]["iou_input"] == pytest.approx(history[-1]["val_iou_input"], abs=1e-5)
    assert report["box"]["iou_refined"] == pytest.approx(history[-1]["val_iou_refined"], abs=1e-5)
    assert report["box"]["worse_rate"] == pytest.approx(history[-1]["val_worse_rate"], abs=1e-6)


def test_cached_and_freshly_encoded_features_give_the_same_boxes(trained, val_images, detections):
    checkpoint, _, _ = trained
    row = detections[0]
    cached = BoxRefiner.from_checkpoint(checkpoint, device="cpu", num_workers=0)
    fresh = BoxRefiner.from_checkpoint(checkpoint, device="cpu", num_workers=0, read_cache=False)
    a = cached.refine(val_images / row["file_name"], [row["bbox"]])
    b = fresh.refine(val_images / row["file_name"], [row["bbox"]])
    assert (cached.cache_hits, cached.encoded, fresh.cache_hits, fresh.encoded) == (1, 0, 0, 1)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.allclose(a.iterations[-1], row["bbox"])  # it did move the box (whether or not the gate kept it)


def test_iterations_and_per_box_early_stop(trained, val_images, detections):
    checkpoint, _, _ = trained
    refiner = BoxRefiner.from_checkpoint(checkpoint, device="cpu", num_workers=0, gate=False)
    image = val_images / detections[0]["file_name"]
    boxes = [detections[0]["bbox"], [10, 10, 60, 50]]
    assert refiner.stop_threshold == 0.02  # from the checkpoint
    steps = [refiner.refine(val_images / d["file_name"], [d["bbox"]]).steps[0] for d in detections]
    assert min(steps) < 3  # some boxes stop early on their own
    refiner.stop_threshold = 0.0
    full = refiner.refine(image, boxes)
    assert full.iterations.shape == (3, 2, 4)  # max_iter 3
    np.testing.assert_array_equal(full.boxes, full.iterations[-1])
    assert full.steps.tolist() == [3, 3]
    refiner.stop_threshold = 10.0  # every box stops after its first step
    early = refiner.refine(image, boxes)
    np.testing.assert_allclose(early.iterations[0], full.iterations[0], atol=1e-4)
    np.testing.assert_array_equal(early.iterations[1], early.iterations[0])
    assert early.steps.tolist() == [1, 1]
    assert full.applied_steps.tolist() == [3, 3] and early.applied_steps.tolist() == [1, 1]  # not the 3 it sat through
    with pytest.raises(ValueError, match="x1 > x0"):
        refiner.refine(image, [[50, 10, 20, 40]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refiner_on_cuda_gives_the_cpu_boxes(trained, val_images, detections):
    checkpoint, _, _ = trained
    boxes = {}
    for device in ("cpu", "cuda"):
        refiner = BoxRefiner.from_checkpoint(checkpoint, device=device, num_workers=0)
        boxes[device] = [refiner.refine(val_images / r["file_name"], [r["bbox"]]).boxes for r in detections]
    np.testing.assert_allclose(np.concatenate(boxes["cuda"]), np.concatenate(boxes["cpu"]), atol=0.05)


def test_cli_keeps_every_row_and_field_and_matches_the_api(trained, val_images, detections, tmp_path):
    checkpoint, _, _ = trained
    rows = [dict(r, extra={"track": i}, note="kept") for i, r in enumerate(detections[:3])]
    rows.insert(1, "not an object")
    rows.append({"file_name": detections[0]["file_name"], "bbox": [5, 5, 3]})
    code, out = refine_cli(checkpoint, val_images, rows, tmp_path, "--no-gate")
    assert code == 0 and len(out) == len(rows)
    assert out[1] == "not an object"
    assert "4 numbers" in out[-1]["refine_error"] and out[-1]["bbox"] == [5, 5, 3]
    refiner = BoxRefiner.from_checkpoint(checkpoint, device="cpu", num_workers=0, gate=False)
    for original, written in zip([rows[0], rows[2], rows[3]], [out[0], out[2], out[3]]):
        assert {k: v for k, v in written.items() if k not in ("bbox", "bbox_input", "refine_steps", "iou_pred")} == \
            {k: v for k, v in original.items() if k != "bbox"}
        assert written["bbox_input"] == original["bbox"]
        api = refiner.refine(val_images / original["file_name"], [original["bbox"]])
        np.testing.assert_allclose(written["bbox"], api.boxes[0], atol=0.006)  # the file rounds to 2 decimals
        assert written["iou_pred"] == pytest.approx(api.iou_pred[0], abs=1e-4) and 0 < written["iou_pred"] < 1
        assert written["bbox"] != original["bbox"] and written["refine_steps"] == api.steps[0]  # the last box's moves


def test_xywh_boxes_in_and_out(trained, val_images, detections, tmp_path):
    checkpoint, _, _ = trained
    xyxy_rows = detections[:2]
    xywh_rows = [dict(r, bbox=from_xyxy(r["bbox"], "xywh", decimals=6)) for r in xyxy_rows]
    _, as_xyxy = refine_cli(checkpoint, val_images, xyxy_rows, tmp_path)
    code, as_xywh = refine_cli(checkpoint, val_images, xywh_rows, tmp_path, "--box-format", "xywh")
    assert code == 0
    for a, b, original in zip(as_xyxy, as_xywh, xywh_rows):
        assert b["bbox_input"] == original["bbox"]
        np.testing.assert_allclose(to_xyxy(b["bbox"], "xywh"), a["bbox"], atol=0.02)


def test_missing_images_are_reported_not_fatal(trained, val_images, detections, tmp_path, capsys):
    checkpoint, _, _ = trained
    rows = [detections[0], {"file_name": "absent.JPG", "bbox": [1, 1, 30, 30], "score": 0.5}]
    code, out = refine_cli(checkpoint, val_images, rows, tmp_path)
    assert code == 0
    assert out[1] == dict(rows[1], refine_error="missing_image")
    assert "bbox_input" in out[0]
    code, out = refine_cli(checkpoint, tmp_path, rows, tmp_path)  # wrong --images folder: nothing refined
    assert code == 2 and "none of the 2 detections could be refined" in capsys.readouterr().err
    assert [r["refine_error"] for r in out] == ["missing_image", "missing_image"]  # still written


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"), ('{"a": 1}', "JSON list")])
def test_unusable_detections_file_is_one_line(trained, val_images, tmp_path, capsys, content, message):
    checkpoint, _, _ = trained
    path = tmp_path / "bad.json"
    path.write_text(content)
    code = refine_main(["--checkpoint", str(checkpoint), "--images", str(val_images), "--detections", str(path),
                        "--output", str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_masks_are_written_one_png_per_detection(trained, val_images, detections, tmp_path):
    checkpoint, _, _ = trained
    rows = [*detections[:2], dict(detections[0], bbox=[20, 20, 80, 90])]
    code, out = refine_cli(checkpoint, val_images, rows, tmp_path, "--masks", str(tmp_path / "masks"))
    assert code == 0
    assert len({r["mask"] for r in out}) == 3 and len(list((tmp_path / "masks").glob("*.png"))) == 3
    for row in out:
        with Image.open(val_images / row["file_name"]) as image, Image.open(row["mask"]) as mask:
            assert mask.size == image.size and mask.mode == "L"
            assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert isinstance(row["mask_score"], float)


def test_batched_prompting_equals_sam_predictor(synthetic_root):
    from segment_anything_hq import SamPredictor
    sam = load_sam_hq("vit_tiny", 256, None)
    image = np.asarray(Image.open(next((synthetic_root / "FungiTastic-Mini" / "val" / "300p").glob("*.JPG"))))
    encoder = ImageEncoder(sam.image_encoder, EncoderIdentity("vit_tiny", "x", 256, "fp32"), CPU)
    embedding, interm = encoder.encode_with_interm(preprocess(image, 256)[None])
    boxes = np.array([[30, 40, 200, 180], [10, 10, 120, 200]], dtype=float)
    height, width = image.shape[:2]
    masks, scores = BoxPrompter(sam, CPU).masks(embedding[0], interm[0], width, height, boxes)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    for k, box in enumerate(boxes):
        expected, expected_scores, _ = predictor.predict(box=box, multimask_output=False)
        np.testing.assert_array_equal(masks[k], expected[0])
        assert scores[k] == pytest.approx(expected_scores[0], abs=1e-5)


def test_hqsam_checkpoint_is_verified_and_needs_a_mask_decoder(trained, val_images, detections, tmp_path):
    checkpoint, _, _ = trained
    sam = build_sam_hq("vit_tiny", 256)
    real, other, encoder_only = tmp_path / "sam_hq.pth", tmp_path / "other.pth", tmp_path / "encoder_only.pth"
    torch.save(sam.state_dict(), real)
    torch.save({k: v + 1 for k, v in sam.state_dict().items()}, other)
    torch.save({k: v for k, v in sam.state_dict().items() if k.startswith("image_encoder.")}, encoder_only)
    from boxrefiner.features.encoder import file_sha256
    state = load_checkpoint(checkpoint)
    state["encoder"]["weights"] = file_sha256(real)  # as if trained on features of that checkpoint
    refiner_file = tmp_path / "refiner.pth"
    torch.save(state, refiner_file)
    image, box = val_images / detections[0]["file_name"], [detections[0]["bbox"]]

    def refiner(hqsam, masks=False):
        return BoxRefiner.from_checkpoint(refiner_file, device="cpu", hqsam_checkpoint=str(hqsam), read_cache=False,
                                          with_masks=masks, num_workers=0)

    with pytest.raises(EncoderError, match="is not the one the refiner was trained with"):
        refiner(other).refine(image, box)
    with pytest.raises(EncoderError, match="give the HQ-SAM checkpoint"):
        BoxRefiner.from_checkpoint(refiner_file, device="cpu", read_cache=False, num_workers=0).refine(image, box)
    assert refiner(real).refine(image, box).boxes.shape == (1, 4)
    item = next(refiner(real, masks=True).image_features([image], for_masks=True))
    assert item.sam_features is not None
    with pytest.raises(MaskDecoderUnavailable, match="no HQ-SAM mask decoder"):
        load_sam_hq("vit_tiny", 256, str(encoder_only))


def test_evaluation_scores_refine_boxes_output_with_masks(trained, synthetic_root, val_images, detections, tmp_path,
                                                          capsys):
    checkpoint, _, _ = trained
    rows = [*detections, {"file_name": "elsewhere.JPG", "bbox": [1, 1, 9, 9]},  # not a split image
            {"file_name": detections[0]["file_name"], "bbox": [5000, 5000, 5100, 5100]}]  # outside it
    code, out = refine_cli(checkpoint, val_images, rows, tmp_path)
    assert code == 0
    report_path = tmp_path / "report.json"
    code = evaluate_main(["--checkpoint", str(checkpoint), "--refined", str(tmp_path / "out.json"), "--mask-iou",
                          "--num-workers", "0", "--output", str(report_path)])
    assert code == 0 and "mask mean IoU" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    split = load_split(config_from_dict(load_checkpoint(checkpoint)["config"]).data, "val")
    truth = {split.images[o.image].file_name: o.box for o in split.objects}
    from boxrefiner.boxes import box_iou
    refined = out[:len(detections)]
    before = box_iou(torch.tensor([r["bbox_input"] for r in refined]), torch.tensor([truth[r["file_name"]] for r in refined]))
    assert "outside" in out[-1]["refine_error"]
    assert report["boxes"] == len(detections) and report["skipped"] == {"not_in_split": 1, "not_refined": 1}
    assert report["box"]["iou_input"] == pytest.approx(before.mean().item(), abs=1e-4)
    assert report["mask"] is not None and 0 <= report["mask"]["iou_refined"] <= 1
    assert report["mask_decoder"] == "random weights"


def test_ground_truth_mask_is_the_union_of_parts_at_the_loaded_size(synthetic_root):
    cfg = config_from_dict({"data": {"data_root": str(synthetic_root)}}).data
    split = load_split(cfg, "val")
    sample, box = split.images[0], split.objects[0].box
    rows = read_masks(split_paths(cfg, "val")[2], {sample.file_name})[sample.file_name]
    mask = ground_truth_mask(rows, sample.width, sample.height)
    assert mask.shape == (sample.height, sample.width)
    ys, xs = np.nonzero(mask)
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], box, atol=1.5)
    assert len(rows) == 2  # cap and stem: the union is larger than either
    assert mask.sum() > max(ground_truth_mask([r], sample.width, sample.height).sum() for r in rows)


def test_detection_rows_are_checked_one_by_one():
    rows = [{"file_name": "a.jpg", "bbox": [0, 0, 10, 10]}, {"bbox": [0, 0, 1, 1]}, {"file_name": "b.jpg"},
            {"file_name": "c.jpg", "bbox": [10, 10, 5, 5]}, {"file_name": "d.jpg", "bbox": [0, 0, True, 3]},
            {"file_name": "e.jpg", "bbox": [0, 0, float("nan"), 3]}, []]
    found, problems = parse_detections(rows, "xyxy")
    assert [d.row for d in found] == [0]
    reasons = dict(problems)
    assert "file_name" in reasons[1] and "no 'bbox'" in reasons[2] and "x1 > x0" in reasons[3]
    assert "finite numbers" in reasons[4] and "finite numbers" in reasons[5] and "not an object" in reasons[6]
    assert "xywh" in reasons[3]  # the likely mix-up is named
    assert to_xyxy([10, 20, 5, 6], "xywh") == (10, 20, 15, 26)
    assert from_xyxy((10, 20, 15, 26), "xywh") == [10, 20, 5, 6]
    with pytest.raises(DetectionsError):
        parse_detections(rows, "cxcywh")


def test_simulated_detections_are_noisy_ground_truth(synthetic_root):
    rows = simulated_detections(synthetic_root, "val", seed=1)
    again = simulated_detections(synthetic_root, "val", seed=1)
    assert rows == again and all({"file_name", "bbox", "score"} <= set(r) for r in rows)
    cfg = config_from_dict({"data": {"data_root": str(synthetic_root)}}).data
    split = load_split(cfg, "val")
    truth = {split.images[o.image].file_name: o.box for o in split.objects}
    from boxrefiner.boxes import box_iou
    iou = box_iou(torch.tensor([r["bbox"] for r in rows]), torch.tensor([truth[r["file_name"]] for r in rows]))
    assert 0.3 < iou.mean() < 0.95
    many = simulated_detections(synthetic_root, "val", seed=1, per_image=3)
    assert len(many) == 3 * len(rows) and many[::3][0] == rows[0]  # the first draw of each image as with one
    assert [r["file_name"] for r in many] == [r["file_name"] for r in rows for _ in range(3)]
    assert len({tuple(r["bbox"]) for r in many[:3]}) == 3  # independent draws


def test_evaluating_detections_equals_scoring_their_refine_boxes_output(trained, val_images, detections, tmp_path):
    checkpoint, _, _ = trained
    refine_cli(checkpoint, val_images, detections, tmp_path, "--no-gate")
    reports = []
    for flag, path in (("--detections", tmp_path / "in.json"), ("--refined", tmp_path / "out.json")):
        out = tmp_path / f"report{flag}.json"
        assert evaluate_main(["--checkpoint", str(checkpoint), flag, str(path), "--num-workers", "0",
                              "--output", str(out), "--no-gate"]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["mask"] is None and reports[0]["mask_decoder"] == "not used"  # random weights: off by default
    for key, value in reports[0]["box"].items():  # the file rounds boxes to 2 decimals, iou_pred to 4
        assert reports[1]["box"][key] == pytest.approx(value, abs=0.02 if "spearman" in key else 1e-3), key
    assert reports[0]["box"]["iou_refined"] != pytest.approx(reports[0]["box"]["iou_input"], abs=1e-3)


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_stored_features_are_found_by_the_next_run(trained, val_images, detections, tmp_path, storage):
    """The next run reads back exactly the features this one refined with (int8: decoded once, never
    quantised twice)."""
    checkpoint, _, _ = trained
    image, box = val_images / detections[0]["file_name"], [detections[0]["bbox"]]
    first = BoxRefiner.from_checkpoint(checkpoint, device="cpu", cache_dir=tmp_path / "c", store_features=True)
    second = BoxRefiner.from_checkpoint(checkpoint, device="cpu", cache_dir=tmp_path / "c")
    first.storage_dtype = second.storage_dtype = storage
    a, b = first.refine(image, box), second.refine(image, box)
    assert (first.encoded, second.encoded, second.cache_hits) == (1, 0, 1)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    [encoder] = read_manifest(tmp_path / "c" / "inference").values()
    assert [e["file"] for e in encoder.entries.values()] == [str(image)]
    alone = BoxRefiner.from_checkpoint(checkpoint, device="cpu", read_cache=False)  # encodes, stores nothing
    alone.storage_dtype = storage
    [fresh], [cached] = alone.image_features([image]), second.image_features([image])
    assert fresh.embedding is not None and cached.embedding is not None
    assert torch.equal(fresh.embedding, cached.embedding)


def test_several_boxes_per_image_subfolders_and_a_box_outside(trained, val_images, detections, tmp_path):
    checkpoint, _, _ = trained
    images = tmp_path / "images"
    (images / "site").mkdir(parents=True)
    first, second = detections[0]["file_name"], detections[1]["file_name"]
    (images / first).write_bytes((val_images / first).read_bytes())
    (images / "site" / first).write_bytes((val_images / second).read_bytes())  # same stem, other image
    rows = [dict(detections[0], id=0), {"file_name": first, "bbox": [900, 900, 990, 990], "id": 1},
            {"file_name": first, "bbox": [20, 30, 120, 140], "id": 2},
            {"file_name": f"site/{first}", "bbox": detections[1]["bbox"], "id": 3}]
    code, out = refine_cli(checkpoint, images, rows, tmp_path, "--masks", str(tmp_path / "masks"))
    assert code == 0 and [r["id"] for r in out] == [0, 1, 2, 3]
    assert out[1]["refine_error"].startswith("outside_image") and "mask" not in out[1]
    refiner = BoxRefiner.from_checkpoint(checkpoint, device="cpu", num_workers=0)
    for row in (out[0], out[2], out[3]):
        api = refiner.refine(images / row["file_name"], [row["bbox_input"]]).boxes[0]
        np.testing.assert_allclose(row["bbox"], api, atol=0.006)
    assert len({out[0]["mask"], out[2]["mask"], out[3]["mask"]}) == 3


def test_an_exif_rotated_image_gets_boxes_and_masks_in_its_upright_frame(trained, val_images, detections, tmp_path):
    checkpoint, _, _ = trained
    source = Image.open(val_images / detections[0]["file_name"])
    upright = source.transpose(Image.Transpose.ROTATE_270)  # what a viewer shows for EXIF orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "img").mkdir()
    source.save(tmp_path / "img" / "rotated.jpg", exif=exif.tobytes(), quality=95)
    rows = [{"file_name": "rotated.jpg", "bbox": [10, 20, upright.width - 30, upright.height - 40]}]
    code, out = refine_cli(checkpoint, tmp_path / "img", rows, tmp_path, "--masks", str(tmp_path / "masks"))
    assert code == 0 and "refine_error" not in out[0]
    with Image.open(out[0]["mask"]) as mask:
        assert mask.size == upright.size != source.size
    x0, y0, x1, y1 = out[0]["bbox"]
    assert 0 <= x0 < x1 <= upright.width and 0 <= y0 < y1 <= upright.height


def test_a_rerun_on_earlier_output_does_not_keep_stale_results(trained, val_images, detections, tmp_path):
    checkpoint, _, _ = trained
    code, first = refine_cli(checkpoint, val_images, detections[:1], tmp_path)
    assert code == 0 and "bbox_input" in first[0]
    stale = [dict(first[0], file_name="gone.JPG")]
    code, out = refine_cli(checkpoint, val_images, stale + detections[1:2], tmp_path)
    assert code == 0 and out[0]["refine_error"] == "missing_image"
    assert not {"bbox_input", "refine_steps"} & set(out[0]) and out[0]["bbox"] == first[0]["bbox"]
    code, out = refine_cli(checkpoint, val_images, [], tmp_path)
    assert code == 0 and out == []
