"""Plumbing of the example and benchmark scripts: arguments, variants, targets, outputs (no training)."""

import json

import pytest

from boxrefiner.bench.suite import (
    VARIANTS,
    compare,
    evaluate_targets,
    markdown_table,
    variant,
    write_outputs,
)
from boxrefiner.cli.bench import suite_config, suite_parser
from boxrefiner.cli.compare import comparison
from boxrefiner.cli.compare import main as compare_main
from boxrefiner.config import config_from_dict


def base():
    return config_from_dict({"data": {"data_root": "x", "sample_ratio": 0.5}, "training": {"batch_size": 24}})


def test_variants_switch_exactly_one_thing_each():
    cfgs = {name: variant(base(), name) for name in VARIANTS}
    assert not cfgs["baseline"].cache_enabled and not cfgs["baseline"].training.use_amp
    assert cfgs["baseline"].data.sample_ratio is None
    assert cfgs["feature_cache"].cache_enabled and not cfgs["feature_cache"].training.use_amp
    assert cfgs["sampling"].data.sample_ratio == 0.1 and not cfgs["sampling"].cache_enabled
    assert cfgs["amp"].training.use_amp and not cfgs["amp"].cache_enabled
    combined = cfgs["combined"]
    assert combined.cache_enabled and combined.training.use_amp and combined.data.sample_ratio == 0.1
    assert combined.training.batch_size == 32  # min(2 x 24, 32), as --fast does
    assert not any(c.refinement.gate for c in cfgs.values())  # an untrained gate would hide every difference
    with pytest.raises(ValueError):
        variant(base(), "turbo")


def result_rows(cache_seconds=1.0, amp_memory=600.0, cache_iou=0.70):
    rows = [
        {"name": "baseline", "epoch_seconds": 60.0, "peak_memory_mb": 1000.0, "val_iou": 0.70, "val_iou_loss": 0.30},
        {"name": "feature_cache", "epoch_seconds": cache_seconds, "peak_memory_mb": 1100.0, "val_iou": cache_iou,
         "val_iou_loss": 1 - cache_iou},
        {"name": "amp", "epoch_seconds": 40.0, "peak_memory_mb": amp_memory, "val_iou": 0.69, "val_iou_loss": 0.31},
    ]
    return compare(rows)


def test_speedups_and_iou_loss_changes_are_against_the_baseline():
    rows = {r["name"]: r for r in result_rows()}
    assert rows["feature_cache"]["speedup"] == pytest.approx(60.0)
    assert rows["amp"]["speedup"] == pytest.approx(1.5)
    assert rows["amp"]["val_iou_loss_change_pp"] == pytest.approx(1.0)


def test_targets_pass_fail_and_not_measurable():
    on_cpu = evaluate_targets(result_rows(), "cpu")
    assert on_cpu["cache_speedup"]["status"] == "pass"
    assert on_cpu["feature_cache_iou_loss_change"]["status"] == "pass"
    assert on_cpu["amp_iou_loss_change"]["status"] == "fail"  # 1.0 pp worse
    assert on_cpu["amp_memory_saving"]["status"].startswith("not measurable")
    slow = evaluate_targets(result_rows(cache_seconds=3.0, cache_iou=0.69), "cuda")
    assert slow["cache_speedup"]["status"] == "fail" and slow["feature_cache_iou_loss_change"]["status"] == "fail"
    assert slow["amp_memory_saving"]["status"] == "pass"
    assert slow["amp_speedup"]["status"] == "pass"  # 60 s -> 40 s
    assert evaluate_targets(result_rows(amp_memory=1200.0), "cuda")["amp_memory_saving"]["status"] == "fail"
    assert evaluate_targets(result_rows(amp_memory=800.0), "cuda")["amp_memory_saving"]["status"] == "fail"  # -20%
    assert on_cpu["amp_speedup"]["status"].startswith("not measurable")


def test_outputs_follow_the_schema(tmp_path):
    rows = result_rows()
    for r in rows:
        r.update(data_seconds=0.1, train_images=10, val_iou_input=0.6, wall_seconds=1.0)
    extraction = {"model_type": "vit_tiny", "input_size": 256, "batch_size": 2, "images": 2, "rounds": 1,
                  "device": "cpu", "modes": {"fp32": {"bare_images_per_second": 2.0, "pipeline_images_per_second": 1.9,
                                                      "pipeline_over_bare": 0.95, "max_abs_deviation": 0.0,
                                                      "mean_abs_deviation": 0.0}}}
    result = {"hardware": "test machine", "device": "cpu", "epochs": 2, "configs": rows,
              "extraction_images_per_second": 3.5, "head_only_epoch_seconds": 0.5,
              "targets": evaluate_targets(rows, "cpu"), "extraction": extraction}
    paths = write_outputs(result, tmp_path)
    document = json.loads(paths["json"].read_text())
    assert {"hardware", "configs", "targets"} <= document.keys()
    for config in document["configs"]:
        assert {"name", "epoch_seconds", "speedup", "peak_memory_mb", "val_iou", "val_iou_loss"} <= config.keys()
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(result)
    assert "| feature_cache | 1.00 s | 60.0x |" in table and "target cache_speedup >= 30x: pass" in table
    assert "| fp32 | 2.000 | 1.00x | 1.900 | 1.00x | 95% |" in table


def test_quick_mode_shrinks_the_embedded_default():
    args = suite_parser().parse_args(["--quick"])
    cfg = suite_config(args)
    assert cfg.training.epochs == 2 and cfg.hqsam.input_size == 512
    assert cfg.data.synthetic.train_images == 64 and cfg.data.data_root.endswith("synthetic_quick")
    full = suite_config(suite_parser().parse_args([]))
    assert full.training.epochs == 3 and full.hqsam.input_size == 1024


def test_example_comparison_table():
    rows = [{"run": "full", "wall_seconds": 300.0, "epochs": 40, "train_images": 192, "extracted": 240,
             "hit_rate": 0.976, "epoch_seconds": 0.6, "best_epoch": 25, "val_iou_input": 0.585, "val_iou_refined": 0.666},
            {"run": "fast", "wall_seconds": 20.0, "epochs": 40, "train_images": 19, "extracted": 0,
             "hit_rate": 1.0, "epoch_seconds": 0.1, "best_epoch": 3, "val_iou_input": 0.585, "val_iou_refined": 0.62}]
    table = comparison(rows)
    assert "| full | 300.0 s | 40 x 192 | 240 | 97.6% | 0.60 s | 25: 0.585 -> 0.666 |" in table
    assert "3: 0.585 -> 0.620" in table


def test_example_bad_config_is_one_line(tmp_path, capsys):
    assert compare_main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: config file not found: {tmp_path / 'none.yaml'}"


def test_head_only_timing_runs_real_training_steps(synthetic_root, tmp_path):
    import torch
    from conftest import small_config

    from boxrefiner.bench.epoch import head_only_seconds
    seconds = head_only_seconds(config_from_dict(small_config(synthetic_root, tmp_path, training={"epochs": 2})),
                                torch.device("cpu"), epochs=2)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)


def test_extraction_benchmark_measures_every_mode_against_fp32(synthetic_root, tmp_path, capsys):
    import json

    import torch
    import yaml
    from conftest import small_config

    from boxrefiner.bench.extract import markdown_table, measure
    from boxrefiner.cli.bench import main as bench_main

    raw = small_config(synthetic_root, tmp_path, hqsam={"model_type": "vit_tiny", "allow_random_init": True,
                                                        "input_size": 256, "batch_size": 2})
    cfg = config_from_dict(raw)
    result = measure(cfg, torch.device("cpu"), images=2, rounds=1, train_epochs=1,
                     modes=["fp32", "bf16 channels-last", "bf16 channels-last, int8 storage"])
    rows = result["modes"]
    assert list(rows) == ["fp32", "bf16 channels-last", "bf16 channels-last, int8 storage"]
    assert rows["fp32"]["max_abs_deviation"] == 0 and rows["fp32"]["bare_speedup"] == 1
    assert 0 < rows["bf16 channels-last"]["mean_abs_deviation"] < rows["bf16 channels-last, int8 storage"]["mean_abs_deviation"]
    for row in rows.values():
        assert row["bare_images_per_second"] > 0 and row["pipeline_images_per_second"] > 0
        assert 0 < row["refiner"]["val_iou_input"] < 1 and row["refiner"]["best_epoch"] == 0
    assert rows["fp32"]["refiner"]["val_iou_input"] == rows["bf16 channels-last"]["refiner"]["val_iou_input"]  # same boxes
    table = markdown_table(result)
    assert table.count("\n| ") == 4 and "refined vs fp32" in table and "| +0.000 |" in table  # fp32 against itself
    assert all("refined_vs_fp32" in r["refiner"] for r in rows.values())
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert bench_main(["extract", "--config", str(tmp_path / "c.yaml"), "--images", "2", "--rounds", "1",
                       "--modes", "fp32", "fp32 sdpa", "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "| fp32 sdpa |" in out and "target extraction_fastest_speedup >= 1.7x fp32 (fp32" in out
    document = json.loads((tmp_path / "e.json").read_text())
    assert set(document["modes"]) == {"fp32", "fp32 sdpa"} and "extraction_pipeline_over_encoder" in document["targets"]


def extraction_rows(**speed):
    """Extraction rows as measure() leaves them: (encoder speed-up, pipeline share) per mode."""
    return {"modes": {m: {"bare_speedup": b, "pipeline_over_bare": p} for m, (b, p) in speed.items()}}


def test_extraction_targets_take_the_fastest_mode_and_the_slowest_pipeline():
    from boxrefiner.bench.extract import targets
    result = extraction_rows(fp32=(1.0, 0.99), bf16=(1.9, 0.96), fp16=(1.2, 0.90))
    on_cpu = targets(result, "cpu")
    assert on_cpu["extraction_fastest_speedup"]["status"] == "pass" and "(bf16)" in on_cpu["extraction_fastest_speedup"]["target"]
    assert on_cpu["extraction_pipeline_over_encoder"]["status"] == "fail"  # fp16's pipeline is at 90%
    assert on_cpu["extraction_pipeline_over_encoder"]["value"] == 0.90
    on_gpu = targets(result, "cuda")
    assert on_gpu["extraction_fastest_speedup"]["status"] == "fail"  # 5x on a GPU
    assert on_gpu["extraction_pipeline_over_encoder"]["status"] == "pass"
    assert targets(extraction_rows(bf16=(1.9, 0.96)), "cpu") == {}  # nothing to compare against
