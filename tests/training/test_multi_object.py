"""Several objects per image: batches hold each image's map once, every object finds its own, matching
detections to objects, and detector boxes as training inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import small_config

from boxrefiner.config import config_from_dict
from boxrefiner.data.matching import best_overlap, match_one_to_one, pairwise_iou
from boxrefiner.data.splits import ObjectRecord, SplitData, load_split
from boxrefiner.data.targets import (
    InputSet,
    Targets,
    detection_inputs,
    validation_inputs,
)
from boxrefiner.features.sources import FeatureSources, unique_in_order
from boxrefiner.modeling.head import BoxRefinementModule

CPU = torch.device("cpu")


def crowded(split: SplitData, per_image: int = 3) -> SplitData:
    """The split's images with `per_image` objects each (the first is the real one), in image order."""
    objects = []
    for obj in split.objects:
        image = split.images[obj.image]
        x0, y0, x1, y1 = obj.box
        objects.append(obj)
        for k in range(1, per_image):  # smaller boxes elsewhere in the image
            w, h = (x1 - x0) / 2, (y1 - y0) / 2
            ox, oy = (image.width - w) * k / per_image, (image.height - h) * (per_image - k) / per_image
            objects.append(ObjectRecord(obj.image, (ox, oy, ox + w, oy + h), category_id=1 + k, ref=f"extra {k}"))
    return dataclasses.replace(split, objects=objects, skipped_files=list(split.skipped_files))


def test_unique_in_order_keeps_first_appearance():
    values, inverse = unique_in_order(torch.tensor([5, 2, 5, 9, 2, 2]))
    assert values.tolist() == [5, 2, 9] and inverse.tolist() == [0, 1, 0, 2, 1, 1]


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "cache_off"])
def test_a_batch_holds_each_image_once_and_every_object_finds_its_own(synthetic_root, tmp_path, cache, monkeypatch):
    cfg = config_from_dict(small_config(synthetic_root, tmp_path, training={"batch_size": 7, "feature_cache": cache}))
    train, val = (crowded(load_split(cfg.data, s, max_samples=4)) for s in ("train", "val"))
    encoded: list[int] = []
    sources = FeatureSources(cfg, CPU, train, val, "fp32")
    if not cache:
        real_encode = sources.encoder.encode
        monkeypatch.setattr(sources.encoder, "encode", lambda x, p=None: encoded.append(len(x)) or real_encode(x, p))
    reference = {}
    for image in range(len(train.images)):  # each image's map, alone
        alone = dataclasses.replace(train, objects=[o for o in train.objects if o.image == image][:1])
        reference[image] = next(iter(FeatureSources(cfg, CPU, alone, val, "fp32").train)).features[0]
    sources.train_sampler.set_epoch(0)
    seen = []
    for batch in sources.train:
        images = train.object_image[batch.objects]
        assert len(batch.features) == len(set(images.tolist()))  # one map per image, however many objects
        for k, obj in enumerate(batch.objects.tolist()):
            torch.testing.assert_close(batch.features[batch.image_index[k]], reference[train.objects[obj].image])
        seen += batch.objects.tolist()
    assert sorted(seen) == list(range(len(train.objects)))  # every object once per epoch
    if not cache:
        assert sum(encoded) < len(train.objects)  # images encoded, not objects


def test_the_head_reads_shared_maps_as_it_reads_copies():
    torch.manual_seed(0)
    model = BoxRefinementModule(hidden_dim=32, num_heads=4, roi_size=6, context_layers=1, context_dim=16).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)  # no zeroed output layer: the boxes move
    maps = torch.randn(3, 256, 16, 16)
    index = torch.tensor([2, 0, 0, 1, 2, 2])
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.2, 0.3, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8],
                          [0.0, 0.2, 0.3, 0.9], [0.4, 0.1, 0.6, 0.3], [0.3, 0.3, 0.7, 0.7]])
    extent = torch.ones(6, 2)
    shared = model(maps, boxes, extent, image_index=index)
    copied = model(maps[index], boxes, extent)
    torch.testing.assert_close(torch.stack(shared.boxes), torch.stack(copied.boxes), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.quality, copied.quality, atol=1e-5, rtol=1e-5)
    assert not torch.equal(shared.boxes[-1], boxes)


def test_input_set_rows_follow_their_objects():
    boxes = torch.arange(20, dtype=torch.float32).view(5, 4)
    sets = InputSet.of_some(boxes, torch.tensor([0, 0, 2, 3, 3]), objects=5)
    rows, position = sets.rows(torch.tensor([3, 1, 0]))
    assert rows.tolist() == [3, 4, 0, 1] and position.tolist() == [0, 0, 2, 2]
    per = InputSet.per_object(torch.zeros(4, 3, 4))
    rows, position = per.rows(torch.tensor([2, 0]))
    assert rows.tolist() == [6, 7, 8, 0, 1, 2] and position.tolist() == [0, 0, 0, 1, 1, 1]


def test_one_to_one_matching_takes_the_best_pair_first():
    truth = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30]], dtype=float)
    found = np.array([[1, 1, 11, 11], [0, 0, 9, 10], [21, 0, 35, 12], [50, 50, 60, 60]], dtype=float)
    pairs = match_one_to_one(found, truth, 0.3)
    assert [(d, t) for d, t, _ in pairs] == [(1, 0), (2, 1)]  # detection 0 lost object 0 to a better pair
    assert all(iou >= 0.3 for _, _, iou in pairs)
    assert match_one_to_one(found, truth, 0.99) == []
    best, iou = best_overlap(found, truth)
    assert best.tolist() == [0, 0, 1, -1] and iou[3] == 0
    assert pairwise_iou(truth, truth).diagonal().tolist() == [1.0, 1.0, 1.0]


def write_detections(path, rows):
    import json
    path.write_text(json.dumps(rows))
    return str(path)


def test_detections_are_matched_to_objects_and_the_rest_listed(synthetic_root, tmp_path):
    cfg = config_from_dict({"data": {"data_root": str(synthetic_root)}}).data
    split = load_split(cfg, "val")
    first, second = split.images[0], split.images[1]
    x0, y0, x1, y1 = split.objects[0].box
    rows = [{"file_name": first.file_name, "bbox": [x0 + 1, y0 + 1, x1 + 2, y1 + 2], "score": 0.9},  # matched
            {"file_name": first.file_name, "bbox": [x0, y0, x1, y1]},  # a better box takes the object
            {"file_name": second.file_name, "bbox": [0, 0, 2, 2]},  # overlaps nothing
            {"file_name": "elsewhere.jpg", "bbox": [0, 0, 5, 5]},  # another split's image
            {"file_name": first.file_name, "bbox": [5, 5, 1, 1]}]  # malformed
    split = load_split(cfg, "val", detections=write_detections(tmp_path / "det.json", rows))
    assert split.detections == {0: (x0, y0, x1, y1)}
    assert split.skipped["unmatched_detection"] == 2 and split.skipped["bad_detection"] == 1
    details = [r["detail"] for r in split.skipped_files if r["reason"] == "unmatched_detection"]
    assert details[0].startswith("row 0:") and details[1].startswith("row 2:")


def test_detector_boxes_replace_the_share_of_inputs_that_detection_mix_asks(synthetic_root, tmp_path):
    raw = small_config(synthetic_root, tmp_path)
    split = load_split(config_from_dict(raw).data, "val")
    rows = [{"file_name": split.images[o.image].file_name, "bbox": [o.box[0] + 3, o.box[1] + 3, o.box[2] + 6,
                                                                   o.box[3] + 6]} for o in split.objects[::2]][::-1]
    split = load_split(config_from_dict(raw).data, "val", detections=write_detections(tmp_path / "d.json", rows))
    targets = Targets.of(split)
    assert targets.has_detection.tolist() == [k % 2 == 0 for k in range(len(split.objects))]
    for k, o in enumerate(split.objects[::2]):  # each object its own detection, whatever the file's order
        longest = max(split.images[o.image].width, split.images[o.image].height)
        expected = torch.tensor([o.box[0] + 3, o.box[1] + 3, o.box[2] + 6, o.box[3] + 6], dtype=torch.float64) / longest
        torch.testing.assert_close(targets.detections[2 * k].double(), expected.clamp(max=1.0), atol=1e-6, rtol=0)
    extent = targets.extent.repeat_interleave(4, 0)
    for mix, share in ((0.0, 0.0), (1.0, 0.5), (0.5, 0.25)):
        cfg = config_from_dict({**raw, "data": {**raw["data"], "detection_mix": mix}})
        boxes, use = detection_inputs(targets.detections, targets.has_detection, 4, extent, cfg,
                                      torch.Generator().manual_seed(0))
        assert not use.view(-1, 4)[1::2].any()  # objects without a detection keep their jittered truth
        assert use.double().mean().item() == pytest.approx(share, abs=0.2)
        torch.testing.assert_close(boxes[use], targets.detections.repeat_interleave(4, 0)[use])
    noisy = config_from_dict({**raw, "data": {**raw["data"], "detection_mix": 1.0,
                                              "detection_noise": {"center_std": 0.1, "scale_std": 0.1}}})
    boxes, use = detection_inputs(targets.detections, targets.has_detection, 4, extent, noisy,
                                  torch.Generator().manual_seed(0))
    assert not torch.allclose(boxes[use], targets.detections.repeat_interleave(4, 0)[use])
    sets = validation_inputs(config_from_dict(raw), targets)
    assert sets["detections"].owner.tolist() == list(range(0, len(split.objects), 2))


def test_a_checkpoint_from_before_these_keys_resumes_and_a_changed_format_does_not(synthetic_root, tmp_path):
    from boxrefiner.training.resume import config_changes
    current = config_from_dict(small_config(synthetic_root, tmp_path)).to_dict()
    saved = {**current, "data": {k: v for k, v in current["data"].items()
                                 if k not in ("format", "min_box_size", "detection_mix", "train_detections")}}
    assert config_changes(saved, current)[1] == []  # absent in 0.3 = the default now
    other = {**current, "data": {**current["data"], "format": "coco", "min_box_size": 4.0}}
    refused = config_changes(other, current)[1]
    assert any(r.startswith("data.format:") for r in refused) and any(r.startswith("data.min_box_size:") for r in refused)


def test_a_mirrored_image_mirrors_its_objects_detections(synthetic_root, tmp_path, monkeypatch):
    from boxrefiner.boxes import hflip_boxes
    from boxrefiner.modeling.build import build_model
    from boxrefiner.training import loop
    from boxrefiner.training.schedule import build_optimization
    raw = small_config(synthetic_root, tmp_path, training={"hflip": True, "epochs": 1, "batch_size": 8},
                       data={"num_workers": 0})
    cfg = config_from_dict(raw)
    split = load_split(cfg.data, "train", max_samples=8)
    rows = [{"file_name": split.images[o.image].file_name, "bbox": [o.box[0] + 2, o.box[1] + 1, o.box[2] + 4,
                                                                   o.box[3] + 3]} for o in split.objects]
    split = load_split(cfg.data, "train", max_samples=8, detections=write_detections(tmp_path / "d.json", rows))
    targets = Targets.of(split)
    seen = []
    real = loop.detection_inputs
    monkeypatch.setattr(loop, "detection_inputs", lambda found, *a: seen.append((found, a[2])) or real(found, *a))
    sources = FeatureSources(cfg, CPU, split, split, "fp32")
    model = build_model(cfg)
    optimizer, scheduler, scaler = build_optimization(cfg, model, len(sources.train), "fp32")
    sources.train_sampler.set_epoch(0)
    loop.train_one_epoch(model, sources.train, targets, optimizer, scheduler, scaler, cfg, "fp32", 0)
    [(found, extent)] = seen
    order = list(sources.train_sampler)  # the objects of the one batch, in batch order
    original = targets.detections[order]
    mirrored = hflip_boxes(original, torch.ones(len(order), dtype=torch.bool))
    is_mirrored = (found - mirrored).abs().amax(dim=1) < 1e-6
    assert (((found - original).abs().amax(dim=1) < 1e-6) | is_mirrored).all()
    assert is_mirrored.any() and not is_mirrored.all()
    # where the image is narrower than the padded square, its extent tells whether it was mirrored too
    narrow = targets.extent[order, 0] < 1
    moved = extent[::cfg.training.boxes_per_object, 0] != targets.extent[order, 0]
    assert narrow.any() and torch.equal(moved[narrow], is_mirrored[narrow])
