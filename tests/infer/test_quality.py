"""Trusting refined boxes: noise levels, the predicted-IoU gate, patience, and refiners from before it."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_config

from boxrefiner.boxes import jitter_with_levels
from boxrefiner.config import ConfigError, config_from_dict
from boxrefiner.data.synthetic import simulated_detections
from boxrefiner.infer.refiner import BoxRefiner
from boxrefiner.metrics import iou_summary, spearman
from boxrefiner.modeling.checkpoint import load_checkpoint
from boxrefiner.modeling.head import BoxRefinementModule
from boxrefiner.training.trainer import train

CPU = torch.device("cpu")


def test_box_noise_takes_one_level_or_a_weighted_list():
    one = config_from_dict({"data": {"data_root": "x", "box_noise": {"center_std": 0.2, "scale_std": 0.3}}})
    assert [n.center_std for n in one.data.noise_levels] == [0.2]
    assert one.evaluation.own_noise(one.data).center_std == 0.2  # validation keeps the one level
    many = config_from_dict({"data": {"data_root": "x", "box_noise": [
        {"center_std": 0.02, "scale_std": 0.03}, {"center_std": 0.2, "scale_std": 0.3, "weight": 3}]},
        "evaluation": {"levels": {"tiny": [0.01, 0.01]}}})
    assert [n.weight for n in many.data.noise_levels] == [1.0, 3.0]
    assert many.evaluation.own_noise(many.data).center_std == 0.1  # a list: the documented default
    assert many.evaluation.levels == {"tiny": (0.01, 0.01)}
    for bad, match in (({"box_noise": []}, "the list is empty"),
                       ({"box_noise": [{"center_sd": 0.1}]}, r"box_noise\[0\].center_sd'; did you mean"),
                       ({"box_noise": [{"center_std": 0.1, "weight": 0}]}, r"box_noise\[0\].weight': 0.0 is out of range")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"data": {"data_root": "x", **bad}})
    with pytest.raises(ConfigError, match="evaluation.levels.big': \\[center_std, scale_std\\] must lie in"):
        config_from_dict({"data": {"data_root": "x"}, "evaluation": {"levels": {"big": [0.1, 1.5]}}})
    with pytest.raises(ConfigError, match="evaluation.levels.very big': a level's name may hold letters"):
        config_from_dict({"data": {"data_root": "x"}, "evaluation": {"levels": {"very big": [0.1, 0.1]}}})


def test_a_level_name_never_overwrites_another_metric():
    from boxrefiner.config import RESERVED_LEVEL_NAMES
    from boxrefiner.metrics import iou_summary
    from boxrefiner.training.validate import metric_name
    keys = list(iou_summary(torch.rand(4), torch.rand(4), torch.rand(4)))
    own = {metric_name(key, "") for key in keys} | {"val_iou_refined_levels"}
    colliding = {key.split("_", k)[-1] for key in own for k in range(1, key.count("_") + 1)
                 if any(metric_name(base, key.split("_", k)[-1]) == key for base in keys)}
    # every name that collides is refused, and "detections", the validation detections' own set
    assert colliding | {"detections"} == set(RESERVED_LEVEL_NAMES) and colliding
    for name in RESERVED_LEVEL_NAMES:
        with pytest.raises(ConfigError, match=f"evaluation.levels.{name}': this name would overwrite"):
            config_from_dict({"data": {"data_root": "x"}, "evaluation": {"levels": {name: [0.1, 0.1]}}})


def test_levels_are_drawn_per_box_in_proportion_to_their_weight():
    truth = torch.tensor([[0.2, 0.2, 0.6, 0.6]]).repeat(4000, 1)
    extent = torch.ones(4000, 2)
    exact = (0.0, 0.0, 2.5, 1.0)
    loose = (0.2, 0.3, 2.5, 3.0)
    out = jitter_with_levels(truth, extent, [exact, loose], torch.Generator().manual_seed(0))
    unchanged = torch.isclose(out, truth).all(dim=1).double().mean().item()
    assert unchanged == pytest.approx(0.25, abs=0.03)
    one = jitter_with_levels(truth[:8], extent[:8], [loose], torch.Generator().manual_seed(1))
    from boxrefiner.boxes import jitter_boxes
    assert torch.equal(one, jitter_boxes(truth[:8], extent[:8], 0.2, 0.3, 2.5, torch.Generator().manual_seed(1)))


def test_spearman_and_the_tolerant_worse_rate():
    a, b = torch.tensor([1.0, 2, 2, 3, 5, 4]), torch.tensor([0.1, 0.3, 0.2, 0.2, 0.9, 0.5])
    ranks = np.corrcoef(pd.Series(a.numpy()).rank(), pd.Series(b.numpy()).rank())[0, 1]
    assert spearman(a, b) == pytest.approx(ranks) and spearman(a, torch.ones(6)) is None
    summary = iou_summary(torch.tensor([0.8, 0.8, 0.8]), torch.tensor([0.797, 0.79, 0.9]), torch.tensor([0.7, 0.6, 0.9]))
    assert summary["worse_rate"] == pytest.approx(2 / 3) and summary["worse_rate_tol"] == pytest.approx(1 / 3)
    assert summary["iou_pred_spearman"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def levels_run(synthetic_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("levels")
    raw = small_config(synthetic_root, work, training={"epochs": 3, "boxes_per_object": 2}, data={"box_noise": [
        {"center_std": 0.02, "scale_std": 0.03}, {"center_std": 0.2, "scale_std": 0.3}]},
        evaluation={"box_noise": {"center_std": 0.15, "scale_std": 0.2}})
    return raw, work, train(config_from_dict(raw), CPU)


def test_validation_reports_every_level_and_best_is_their_mean(levels_run):
    _raw, work, _history = levels_run
    records = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    for level in ("", "_small", "_medium", "_large"):
        for key in ("iou_input", "iou_refined", "worse_rate", "worse_rate_tol", "iou75_refined", "iou90_refined",
                    "iou_pred_spearman"):
            assert f"val_{key}{level}" in records[-1], key + level
    assert records[0]["val_iou_input_small"] > records[0]["val_iou_input_medium"] > records[0]["val_iou_input_large"]
    for r in records:
        levels = [r[f"val_iou_refined_{n}"] for n in ("small", "medium", "large")]
        assert r["val_iou_refined_levels"] == pytest.approx(sum(levels) / 3)
    best = max(records, key=lambda r: r["val_iou_refined_levels"])
    assert load_checkpoint(work / "ckpt" / "best_model.pth")["epoch"] == best["epoch"]


def test_the_api_repeats_validation_at_every_level_gate_on_and_off(levels_run, synthetic_root):
    from boxrefiner.data.splits import load_split
    from boxrefiner.infer.evaluate import evaluate_cases, jittered_cases
    raw, work, history = levels_run
    split = load_split(config_from_dict(raw).data, "val")
    for gate in (True, False):
        refiner = BoxRefiner.from_checkpoint(work / "ckpt" / "last.pth", device="cpu", num_workers=0, gate=gate)
        report = evaluate_cases(refiner, split, jittered_cases(refiner, split))
        if gate:  # the trainer validates with the run's gate
            for level in ("small", "medium", "large"):
                assert report["levels"][level]["iou_refined"] == pytest.approx(
                    history[-1][f"val_iou_refined_{level}"], abs=1e-5)
                assert report["levels"][level]["worse_rate_tol"] == pytest.approx(
                    history[-1][f"val_worse_rate_tol_{level}"], abs=1e-6)
            assert report["box"]["iou_refined"] == pytest.approx(history[-1]["val_iou_refined"], abs=1e-5)
            gated = report
    assert report["levels"]["large"]["iou_input"] == gated["levels"]["large"]["iou_input"]


def test_each_level_is_judged_on_several_fixed_boxes_per_image(levels_run):
    from boxrefiner.data.splits import load_split
    from boxrefiner.data.targets import Targets, validation_inputs
    raw, _, _ = levels_run
    cfg = config_from_dict(raw)
    targets = Targets.of(load_split(cfg.data, "val"))
    inputs = validation_inputs(cfg, targets)
    n = len(targets.boxes)
    per = cfg.evaluation.boxes_per_level
    assert inputs[""].boxes.shape == (n, 4) and inputs["medium"].boxes.shape == (n * per, 4)
    medium = inputs["medium"].boxes.view(n, per, 4)
    assert torch.equal(inputs["medium"].owner, torch.arange(n).repeat_interleave(per))
    assert len({tuple(b.tolist()) for b in medium[0]}) == per  # distinct draws
    assert torch.equal(inputs["medium"].boxes, validation_inputs(cfg, targets)["medium"].boxes)  # fixed across runs
    fewer = config_from_dict({**raw, "evaluation": {**raw.get("evaluation", {}), "boxes_per_level": 2}})
    assert torch.equal(validation_inputs(fewer, targets)["medium"].boxes.view(n, 2, 4), medium[:, :2])  # a prefix


def test_keep_margin_one_always_keeps_the_input(levels_run, synthetic_root):
    _raw, work, _ = levels_run
    refiner = BoxRefiner.from_checkpoint(work / "ckpt" / "last.pth", device="cpu", num_workers=0)
    refiner.keep_margin = 1.0
    rows = simulated_detections(synthetic_root, "val", seed=4)[:3]
    images = synthetic_root / "FungiTastic-Mini" / "val" / "300p"
    for row in rows:
        result = refiner.refine(images / row["file_name"], [row["bbox"]])
        assert result.chosen.tolist() == [0] and result.boxes.tolist() == [row["bbox"]]
        assert 0 < result.iou_pred[0] < 1


def test_patience_stops_a_run_that_stopped_improving(synthetic_root, tmp_path, caplog, monkeypatch):
    import boxrefiner.training.trainer as engine
    values = iter([0.5, 0.6, 0.55, 0.58, 0.59, 0.7])
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: {**real(*a, **k), "val_iou_refined_levels": next(values)})
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 6, "patience": 2})
    history = train(config_from_dict(raw), CPU)
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]  # best at 1; 2 and 3 no better: stop
    assert "stopping after epoch 3: no better validation" in caplog.text
    assert train(config_from_dict(raw), CPU, resume=str(tmp_path / "ckpt" / "last.pth")) == []
    assert "stopped early at epoch 3" in caplog.text


def test_a_refiner_from_before_the_quality_head_refines_without_the_gate(levels_run, synthetic_root, tmp_path, caplog):
    _raw, work, _ = levels_run
    state = load_checkpoint(work / "ckpt" / "last.pth")
    pre_03 = ("embed_dim", "hidden_dim", "num_heads", "max_offset", "max_iter", "roi_size", "context_scale")
    old_args = {k: v for k, v in state["model_args"].items() if k in pre_03}
    old = BoxRefinementModule(**old_args, quality_head=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state.update(model_args=old_args, model_state_dict=old.state_dict())
    torch.save(state, tmp_path / "old.pth")
    refiner = BoxRefiner.from_checkpoint(tmp_path / "old.pth", device="cpu", num_workers=0)
    assert "no quality head (trained before version 0.3)" in caplog.text and refiner.gate is False
    row = simulated_detections(synthetic_root, "val", seed=4)[0]
    result = refiner.refine(synthetic_root / "FungiTastic-Mini" / "val" / "300p" / row["file_name"], [row["bbox"]])
    assert result.iou_pred is None and np.allclose(result.boxes, result.iterations[-1])
