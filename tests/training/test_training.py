"""Short real training runs: random-weight vit_tiny at 256 input on the synthetic FungiTastic copy."""

import json

import pytest
import torch
from conftest import small_config

from boxrefiner.config import config_from_dict, replace
from boxrefiner.data.targets import Targets, validation_inputs
from boxrefiner.features.sources import FeatureSources
from boxrefiner.modeling.build import build_model
from boxrefiner.modeling.checkpoint import CheckpointError, load_checkpoint
from boxrefiner.training import precision
from boxrefiner.training.trainer import prepare_splits, train
from boxrefiner.training.validate import evaluate

CPU = torch.device("cpu")
TIMING = ("epoch_seconds", "data_seconds", "val_seconds", "samples_per_second")


def without_timing(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def first_run_config(data_root, work, **training):
    # vit_b's random features at 256 input carry more than vit_tiny's: the loss falls clearly in 20 short epochs.
    # Their 16x16 maps are too small for the context network (its dilation 4 spans a quarter of the map,
    # and its box loss hardly moves in 20 epochs on 24 images), so this run samples the embedding itself.
    raw = small_config(data_root, work, hqsam={"model_type": "vit_b"}, training={"epochs": 20, "batch_size": 4, **training})
    raw["model"]["context_layers"] = 0
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def first_run(synthetic_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    cfg = first_run_config(synthetic_root, work)
    return cfg, work, train(cfg, CPU)


def fixed_input_loss(cfg, state_dict=None) -> float:
    """Loss on the training images with one fixed set of noisy boxes (the per-epoch loss has fresh noise)."""
    train_split, val_split = prepare_splits(cfg)
    sources = FeatureSources(cfg, CPU, train_split, val_split, "fp32")
    targets = Targets.of(train_split)
    model = build_model(cfg)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return evaluate(model, sources.train, targets, validation_inputs(cfg, targets), cfg, "fp32")["val_loss"]


def test_loss_falls_and_metrics_are_logged(first_run):
    cfg, work, history = first_run
    assert len(history) == 20
    trained = load_checkpoint(work / "ckpt" / "last.pth")["model_state_dict"]
    assert fixed_input_loss(cfg, trained) < 0.95 * fixed_input_loss(cfg)  # untrained head = identity
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    lines = (work / "out" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == list(range(20))
    for key in ("train_loss", "val_loss", "val_iou_input", "val_iou_refined", "epoch_seconds", "val_seconds",
                "samples_per_second", "cache_hit_rate", "val_worse_rate", "val_iou75_refined", "val_iou90_refined"):
        assert key in records[-1], key
    assert records[-1]["cache_hit_rate"] == 1.0
    assert len({r["val_iou_input"] for r in records}) == 1  # fixed validation inputs


def test_checkpoints_hold_the_original_keys(first_run):
    _cfg, work, history = first_run
    for name in ("last.pth", "best_model.pth"):
        state = load_checkpoint(work / "ckpt" / name)  # weights_only=True inside
        for key in ("epoch", "model_state_dict", "optimizer_state_dict", "train_loss", "val_loss", "config"):
            assert key in state
    last = load_checkpoint(work / "ckpt" / "last.pth")
    assert last["epoch"] == 19 and last["config"]["model"]["hidden_dim"] == 64 and last["encoder"]["model_type"] == "vit_b"
    best = max(history, key=lambda r: r["val_iou_refined_levels"])
    assert load_checkpoint(work / "ckpt" / "best_model.pth")["epoch"] == best["epoch"]
    assert history.best == best  # what the example script reports


def test_warm_run_never_builds_the_encoder_and_matches_the_cold_run(first_run, tmp_path, caplog):
    cfg, _work, history = first_run
    warm_cfg = first_run_config(cfg.data.data_root, tmp_path)
    warm_cfg = replace(warm_cfg, "optimization", feature_cache=cfg.optimization.feature_cache)
    warm = train(warm_cfg, CPU)
    assert "the HQ-SAM encoder was never built" in caplog.text
    assert "RANDOM, UNTRAINED" not in caplog.text
    assert without_timing(warm) == without_timing(history)


def test_cache_off_runs_the_encoder_in_the_loop(synthetic_root, tmp_path, caplog):
    cfg = config_from_dict(small_config(synthetic_root, tmp_path, training={"epochs": 1, "feature_cache": False}))
    history = train(cfg, CPU)
    assert history[0]["cache_hit_rate"] is None and "feature cache off" in caplog.text
    assert not (tmp_path / "features").exists()


def test_resume_continues_where_it_stopped(synthetic_root, tmp_path):
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 2})
    train(config_from_dict(raw), CPU)
    raw["training"]["epochs"] = 3
    resumed = train(config_from_dict(raw), CPU, resume=str(tmp_path / "ckpt" / "last.pth"))
    assert [r["epoch"] for r in resumed] == [2]
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


def test_corrupt_resume_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "last.pth"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(bad)


def test_sample_ratio_draws_a_seeded_subset_not_a_prefix(synthetic_root, tmp_path):
    raw = small_config(synthetic_root, tmp_path, data={"sample_ratio": 0.25})
    train_a, val = prepare_splits(config_from_dict(raw))
    train_b, _ = prepare_splits(config_from_dict(raw))
    names = [s.file_name for s in train_a.images]
    assert len(names) == 6 and names == [s.file_name for s in train_b.images]
    assert names != sorted(names)[:6] or names[-1] != "train-3-00005.JPG"
    assert len(val.images) == 8  # validation is never sampled
    raw["training"]["seed"] = 8
    assert [s.file_name for s in prepare_splits(config_from_dict(raw))[0].images] != names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_training(synthetic_root, tmp_path):
    cfg = config_from_dict(small_config(synthetic_root, tmp_path, training={"epochs": 2, "use_amp": True}))
    history = train(cfg, torch.device("cuda"))
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)


def test_resume_with_another_model_shape_is_refused(first_run, tmp_path):
    cfg, work, _ = first_run
    with pytest.raises(CheckpointError, match=r"config key 'model.hidden_dim' changed \(64 -> 32\)"):
        train(replace(cfg, "model", hidden_dim=32), CPU, resume=str(work / "ckpt" / "last.pth"))


def test_resume_with_another_gate_is_refused(first_run):
    cfg, work, _ = first_run  # epochs judged with one gate must not be compared with epochs judged with another
    with pytest.raises(CheckpointError, match=r"config key 'refinement.keep_margin' changed \(0.1 -> 0.3\)"):
        train(replace(cfg, "refinement", keep_margin=0.3), CPU, resume=str(work / "ckpt" / "last.pth"))


def test_cpu_amp_uses_bf16_autocast(synthetic_root, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)  # whatever CPU runs the test
    cfg = config_from_dict(small_config(synthetic_root, tmp_path, training={"epochs": 1, "use_amp": True}))
    history = train(cfg, CPU)
    assert "training precision bf16" in caplog.text
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))


def test_cpu_amp_without_bf16_kernels_trains_in_fp32_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.amp_precision(CPU, True) == "fp32"
    assert "no bfloat16 kernels" in caplog.text and "training in fp32" in caplog.text
    assert precision.amp_precision(CPU, False) == "fp32"


def test_feature_dropout_draws_from_the_epoch_generator_only():
    from boxrefiner.training.loop import drop_channels
    features = torch.ones(3, 64, 4, 4, dtype=torch.float16)
    global_state = torch.get_rng_state()
    a = drop_channels(features, 0.25, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), global_state)  # a cache-off run (encoder draws) sees the same masks
    assert torch.equal(a, drop_channels(features, 0.25, torch.Generator().manual_seed(5)))
    assert a.dtype == torch.float32 and torch.allclose(a.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert (a[:, :, 0, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.1)
    assert torch.equal(a.amax(dim=(2, 3)), a.amin(dim=(2, 3)))  # whole channels
