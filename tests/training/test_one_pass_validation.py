"""Validation in one pass gives the numbers of the two-pass validation it replaced (kept here as the
reference: the loss from a pass over the run's own boxes, inference from a second pass over every set)."""

import time

import torch
from conftest import small_config

from boxrefiner.boxes import box_iou
from boxrefiner.config import config_from_dict
from boxrefiner.metrics import iou_summary
from boxrefiner.training import validate
from boxrefiner.training.loop import training_loss
from boxrefiner.training.trainer import setup

CPU = torch.device("cpu")


@torch.no_grad()
def two_pass_evaluate(model, loader, targets, inputs, cfg, precision):
    names = list(inputs)
    found = {name: [[], [], []] for name in names}
    losses = {"loss": 0.0, "l1": 0.0, "giou": 0.0, "quality": 0.0}
    n = 0
    for batch in loader:
        objects = batch.objects
        gt, extent, image_index = targets.boxes[objects], targets.extent[objects], batch.image_index
        rows = [inputs[name].rows(objects) for name in names]
        position = torch.cat([p for _, p in rows])
        order = torch.argsort(position, stable=True)
        boxes = torch.cat([inputs[name].boxes[r] for name, (r, _) in zip(names, rows)])[order]
        which = torch.cat([torch.full((len(r),), k) for k, (r, _) in enumerate(rows)])[order]
        position = position[order]
        maps = model.context_maps(batch.features)
        own = inputs[""].boxes[objects]
        loss = training_loss(model(maps, own, extent, widened=True,
                                   image_index=None if batch.one_per_image else image_index), gt, cfg)
        result = model(maps, boxes, extent[position], stop_threshold=cfg.refinement.stop_threshold,
                       image_index=image_index[position], widened=True)
        chosen, predicted, _ = result.select(cfg.refinement.gate, cfg.refinement.keep_margin)
        before, after = box_iou(boxes, gt[position]), box_iou(chosen, gt[position])
        for k, name in enumerate(names):
            found[name][0].append(before[which == k])
            found[name][1].append(after[which == k])
            found[name][2].append(predicted[which == k])
        for name, value in loss.named():
            losses[name] += value.item() * len(objects)
        n += len(objects)
    record = {"val_loss": losses["loss"] / n, "val_l1": losses["l1"] / n, "val_giou_loss": losses["giou"] / n,
              "val_quality_error": losses["quality"] / n}
    for name, (b, a, p) in found.items():
        record.update({validate.metric_name(k, name): v
                       for k, v in iou_summary(torch.cat(b), torch.cat(a), torch.cat(p)).items()})
    return record


def test_one_pass_validation_equals_the_two_pass_reference(synthetic_root, tmp_path):
    cfg = config_from_dict(small_config(synthetic_root, tmp_path, model={"context_layers": 1},
                                        refinement={"max_iter": 3, "stop_threshold": 0.05, "gate": False}))
    run = setup(cfg, CPU, None, None, False, None)
    torch.manual_seed(0)
    torch.nn.init.normal_(run.model.head[-1].weight, std=0.3)  # a head that moves boxes, some by little
    run.model.eval()
    start = time.perf_counter()
    got = validate.evaluate(run.model, run.sources.val, run.val_targets, run.val_inputs, cfg, "fp32")
    assert got.pop("val_seconds") <= time.perf_counter() - start
    expected = two_pass_evaluate(run.model, run.sources.val, run.val_targets, run.val_inputs, cfg, "fp32")
    assert got.pop("val_iou_refined_levels") is not None
    assert got == expected
    assert got["val_iou_refined"] != got["val_iou_input"]  # the head really moves boxes
