"""A run folder one can look at: results.csv, results.png and val_boxes.jpg after every epoch, the
boxes pictured being what inference returns, TensorBoard events read back, and pictures that never
stop a run."""

import csv
import json
import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import small_config
from PIL import Image

from boxrefiner.boxes import pixel_boxes
from boxrefiner.config import config_from_dict, replace
from boxrefiner.data.splits import load_split
from boxrefiner.data.targets import Targets, validation_inputs
from boxrefiner.features.sources import FeatureSources
from boxrefiner.infer.refiner import BoxRefiner
from boxrefiner.modeling.build import build_model
from boxrefiner.modeling.checkpoint import load_checkpoint
from boxrefiner.training import visuals
from boxrefiner.training.trainer import train
from boxrefiner.training.validate import evaluate

CPU = torch.device("cpu")


def tensorboard_scalars(folder):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def run(synthetic_root, tmp_path_factory):
    """Two epochs, then resumed to three, then epoch 2 once more (resumed from epoch 1 with the
    rollback allowed), with the pictures and TensorBoard on."""
    work = tmp_path_factory.mktemp("visuals")
    raw = small_config(synthetic_root, work, training={"epochs": 2}, refinement={"max_iter": 2, "gate": False},
                       logging={"plots": True, "tensorboard": True, "val_images": 4})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(visuals, "DUTY", 1e9)  # results.png and the grid every epoch, however short
        train(config_from_dict(raw), CPU)
        shutil.copy(work / "ckpt" / "last.pth", work / "epoch1.pth")
        raw["training"]["epochs"] = 3
        cfg = config_from_dict(raw)
        train(cfg, CPU, resume=str(work / "ckpt" / "last.pth"))
        train(cfg, CPU, resume=str(work / "epoch1.pth"), allow_rollback=True)
    return cfg, work


def test_results_csv_and_png_cover_every_epoch_of_a_resumed_run(run):
    _cfg, work = run
    metrics = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    rows = list(csv.DictReader((work / "out" / "results.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for row, record in zip(rows, metrics):
        for key in ("train_loss", "val_loss", "val_iou_refined", "val_iou_input_small", "lr"):
            assert float(row[key]) == pytest.approx(record[key], rel=1e-5)
    with Image.open(work / "out" / "results.png") as png:
        assert png.format == "PNG" and png.size == (1350, 765)


def test_val_boxes_pictures_the_same_images_every_epoch(run, synthetic_root):
    cfg, work = run
    split = load_split(cfg.data, "val")
    chosen = visuals.pictured_images(split, 4)
    assert chosen == visuals.pictured_images(split, 4) and len(set(chosen)) == 4
    assert chosen[0] == 0 and chosen[-1] == len(split.images) - 1  # spread over the split
    split.exclude(0, "unreadable")
    assert 0 not in visuals.pictured_images(split, 4)
    assert visuals.pictured_images(split, 100) == list(range(1, len(split.images)))
    with Image.open(work / "out" / "val_boxes.jpg") as jpg:
        assert jpg.format == "JPEG" and jpg.size[0] == 4 * 384


def test_pictured_boxes_are_what_inference_returns(run):
    """The refined boxes val_boxes.jpg draws are the boxes the refiner returns for the same input boxes."""
    cfg, work = run
    cfg = replace(cfg, "logging", tensorboard=False)  # a writer here would hide the run's events
    split = load_split(cfg.data, "val")
    targets = Targets.of(split)
    own = validation_inputs(cfg, targets)[""]
    shown = visuals.RunVisuals(cfg, split, own, 0)
    objects = shown.pictured.objects
    assert len(objects) == 4  # one object per synthetic image
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(work / "ckpt" / "last.pth")["model_state_dict"])
    train_split = load_split(cfg.data, "train")
    sources = FeatureSources(cfg, CPU, train_split, split, "fp32", None)
    evaluate(model, sources.val, targets, validation_inputs(cfg, targets), cfg, "fp32", shown.pictured)
    shown.close()
    width, height = (t[objects] for t in split.image_sizes())
    pictured = pixel_boxes(shown.pictured.refined.double(), width, height).numpy()
    inputs = pixel_boxes(own.boxes[objects].double(), width, height).numpy()
    refiner = BoxRefiner.from_checkpoint(work / "ckpt" / "last.pth", device="cpu", num_workers=0)
    paths = [split.images[split.objects[k].image].image_path for k in objects.tolist()]
    for item in refiner.image_features(paths):
        got = refiner.refine_features(item.map, item.width, item.height, inputs[item.index:item.index + 1]).boxes
        np.testing.assert_allclose(got[0], pictured[item.index], atol=1e-3)
    assert not np.allclose(pictured, inputs)  # the head moved some of them: the test compares refined boxes


def test_tensorboard_holds_every_scalar_once_per_epoch_and_the_box_grid(run):
    _cfg, work = run
    metrics = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    events = tensorboard_scalars(work / "out")
    tags = events.Tags()
    for key, tag in (("val_iou_refined", "val/iou_refined"), ("train_loss", "train/loss"), ("lr", "run/lr"),
                     ("val_iou_refined_small", "val/iou_refined_small")):
        assert tag in tags["scalars"]
        points = events.Scalars(tag)
        assert [p.step for p in points] == [0, 1, 2]  # epoch 2, run twice, is there once: the last try's
        assert [p.value for p in points] == pytest.approx([r[key] for r in metrics], rel=1e-5)
    assert "val_boxes" in tags["images"] and [i.step for i in events.Images("val_boxes")] == [0, 1, 2]


def test_missing_tensorboard_is_one_line_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    assert visuals.open_tensorboard(tmp_path, 0) is None
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "pip install tensorboard" in lines[0] and "goes on" in lines[0]


def test_a_picture_that_fails_does_not_stop_the_run(synthetic_root, tmp_path, monkeypatch, caplog):
    calls = []
    works = visuals.plot_results

    def broken_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no font")
        works(*args, **kwargs)

    monkeypatch.setattr(visuals, "plot_results", broken_once)
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 2}, logging={"plots": True})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "val_boxes.jpg").mkdir()  # a folder where the picture goes: the rename fails
    history = train(config_from_dict(raw), CPU)
    assert len(history) == 2 and (tmp_path / "ckpt" / "last.pth").is_file()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("pictures of epoch 0 were not drawn: RuntimeError: no font" in line for line in errors) == 1
    assert sum("val_boxes.jpg not written" in line for line in errors) == 2  # each epoch: the folder in the way
    assert (tmp_path / "out" / "results.png").is_file()  # drawn after epoch 1
    assert len((tmp_path / "out" / "results.csv").read_text().splitlines()) == 3


def test_every_rank_pictures_the_same_objects_whatever_it_draws(run, monkeypatch):
    """evaluate merges the pictured boxes across ranks collectively: a rank that draws nothing (not
    rank 0) must still picture the same objects, or the ranks' collectives stop matching."""
    cfg, _ = run
    split = load_split(cfg.data, "val")
    own = validation_inputs(cfg, Targets.of(split))[""]
    main = visuals.RunVisuals(replace(cfg, "logging", tensorboard=False), split, own, 0)
    monkeypatch.setattr(visuals.distributed, "is_main", lambda: False)
    for plots, tensorboard in ((True, False), (False, True)):
        other = visuals.RunVisuals(replace(cfg, "logging", plots=plots, tensorboard=tensorboard), split, own, 0)
        assert other.pictured is not None and torch.equal(other.pictured.objects, main.pictured.objects)
        assert other.thumbs == [] and other.writer is None and other.pool is None  # it draws nothing
    nothing = visuals.RunVisuals(replace(cfg, "logging", plots=False, tensorboard=False), split, own, 0)
    assert nothing.pictured is None
    main.close()


def test_each_image_of_the_grid_shows_its_own_objects(run):
    """Several objects per image: each refined box is drawn on its own image, where its object is."""
    from test_multi_object import crowded

    from boxrefiner.boxes import normalise_boxes
    from boxrefiner.plots.boxes import CELL
    from boxrefiner.plots.draw import REFINED

    cfg, _ = run
    split = crowded(load_split(cfg.data, "val"), per_image=3)
    own = validation_inputs(cfg, Targets.of(split))[""]
    shown = visuals.RunVisuals(replace(cfg, "logging", tensorboard=False), split, own, 0)
    objects = shown.pictured.objects
    width, height = (t[objects] for t in split.image_sizes())
    truth = torch.tensor([split.objects[k].box for k in objects.tolist()], dtype=torch.float64)
    shown.pictured.refined = normalise_boxes(truth, width, height)[0].float()  # "refined" onto the truth
    grid = shown.box_grid(3, shown.pictured.refined)
    assert len(shown.thumbs) == 4 and all(len(t.objects) == 3 for t in shown.thumbs)
    pixels = np.asarray(grid.convert("RGB")).astype(int)
    header = grid.height - CELL  # one row of four cells under the legend
    for cell, thumb in enumerate(shown.thumbs):
        left = cell * CELL + (CELL - thumb.image.width) // 2
        top = header + (CELL - thumb.image.height) // 2
        for k in thumb.objects:
            _, y0, x1, y1 = (v * thumb.scale for v in split.objects[k].box)
            edge = pixels[top + round(y0) + 3:top + round(y1) - 2, left + max(0, round(x1) - 1):left + round(x1) + 2]
            drawn = (np.abs(edge - np.array(REFINED)).max(2) < 30).any(1)  # rows of its right edge in the colour
            assert drawn.mean() > 0.3, f"object {k} is not drawn where it is"
    shown.close()


def test_short_epochs_redraw_results_png_within_its_share_of_the_time_and_always_the_last(synthetic_root, tmp_path,
                                                                                          monkeypatch):
    drawn = []
    works = visuals.plot_results

    def counted(history, path, title=""):
        drawn.append(len(history))
        works(history, path, title)

    monkeypatch.setattr(visuals, "plot_results", counted)
    monkeypatch.setattr(visuals, "DUTY", 0.0)  # no time for it: only the first epoch and the last
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 3}, logging={"plots": True, "val_images": 2})
    train(config_from_dict(raw), CPU)
    assert drawn == [1, 3]
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert len(rows) == 3  # the table every epoch
