"""Interruption and resumption: SIGKILL between epochs, SIGINT inside one, finished runs, NaN losses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, small_config

from boxrefiner.config import config_from_dict
from boxrefiner.errors import TrainingError
from boxrefiner.modeling.checkpoint import CheckpointError, load_checkpoint
from boxrefiner.training import loop
from boxrefiner.training.trainer import train

CPU = torch.device("cpu")
TIMING = ("epoch_seconds", "data_seconds", "val_seconds", "samples_per_second")


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def write_config(synthetic_root, work: Path, **sections) -> Path:
    # Cache off: the encoder runs in the loop, so an epoch lasts long enough (~2 s) to be hit by a signal.
    raw = small_config(synthetic_root, work, training={"epochs": 4, "feature_cache": False, **sections.pop("training", {})},
                       **sections)
    path = work / "cfg.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def launch(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train_box_refiner_optimized.py"), "--config", str(config),
                             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epochs(metrics: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("training did not reach the expected epoch in time")


def signal_after_first_epoch(config: Path, work: Path, signum: int) -> tuple[int, str]:
    process = launch(config)
    wait_for_epochs(work / "out" / "metrics.jsonl", 1, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def assert_same_run(work: Path, expected) -> None:
    weights, records = final_state(work)
    expected_weights, expected_records = expected
    assert [r["epoch"] for r in records] == [r["epoch"] for r in expected_records]
    assert records == expected_records
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)


def final_state(work: Path):
    state = load_checkpoint(work / "ckpt" / "last.pth")
    records = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    return state["model_state_dict"], comparable(records)


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("straight")
    result = launch(write_config(synthetic_root, work))
    _out, err = result.communicate(timeout=300)
    assert result.returncode == 0, err
    return final_state(work)


def test_sigkill_between_epochs_then_resume_is_bit_identical(synthetic_root, tmp_path, uninterrupted):
    config = write_config(synthetic_root, tmp_path)
    process = launch(config)
    wait_for_epochs(tmp_path / "out" / "metrics.jsonl", 2, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    resumed = launch(config, "--resume")
    _out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_run(tmp_path, uninterrupted)


def test_sigint_saves_inside_the_epoch_exits_130_and_resumes_exactly(synthetic_root, tmp_path, uninterrupted):
    config = write_config(synthetic_root, tmp_path)
    returncode, err = signal_after_first_epoch(config, tmp_path, signal.SIGINT)
    assert returncode == 130, err
    assert "Resume with:" in err and "--resume" in err and "Traceback" not in err
    command = err.split("Resume with:")[1].strip().splitlines()[0].split()
    state = load_checkpoint(tmp_path / "ckpt" / "last.pth")
    assert state["interrupted"] is True
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path, uninterrupted)


def test_sigterm_exits_143_with_a_resumable_checkpoint(synthetic_root, tmp_path):
    returncode, err = signal_after_first_epoch(write_config(synthetic_root, tmp_path), tmp_path, signal.SIGTERM)
    assert returncode == 143, err
    assert load_checkpoint(tmp_path / "ckpt" / "last.pth")["epoch"] >= 0


def test_resuming_a_finished_run_says_so_unless_more_epochs(synthetic_root, tmp_path, caplog):
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 2})
    train(config_from_dict(raw), CPU)
    last = str(tmp_path / "ckpt" / "last.pth")
    assert train(config_from_dict(raw), CPU, resume=last) == []
    assert "already finished its 2 epochs" in caplog.text
    raw["training"]["epochs"] = 3
    more = train(config_from_dict(raw), CPU, resume=last)
    assert [r["epoch"] for r in more] == [2]
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 3


def test_safe_changes_are_allowed_and_logged(synthetic_root, tmp_path, caplog):
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 1})
    train(config_from_dict(raw), CPU)
    raw["training"].update(epochs=2, batch_size=4)
    train(config_from_dict(raw), CPU, resume=str(tmp_path / "ckpt" / "last.pth"))
    assert "resume: training.batch_size: 8 -> 4 (allowed)" in caplog.text


def test_non_finite_losses_are_skipped_then_stop_without_touching_the_checkpoint(synthetic_root, tmp_path, monkeypatch):
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 1})
    train(config_from_dict(raw), CPU)
    good = load_checkpoint(tmp_path / "ckpt" / "last.pth")["model_state_dict"]
    real_loss = loop.refinement_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        parts = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(loop, "refinement_loss", sometimes_nan)
    raw["training"]["epochs"] = 2
    history = train(config_from_dict(raw), CPU, resume=str(tmp_path / "ckpt" / "last.pth"))
    assert history[0]["nonfinite_steps"] >= 1 and torch.isfinite(torch.tensor(history[0]["train_loss"]))

    monkeypatch.setattr(loop, "refinement_loss", lambda *a, **k: _nan(real_loss(*a, **k)))
    raw["training"].update(epochs=3, max_nonfinite_steps=2)
    before = load_checkpoint(tmp_path / "ckpt" / "last.pth")["model_state_dict"]
    with pytest.raises(TrainingError, match="not finite for 2 consecutive steps"):
        train(config_from_dict(raw), CPU, resume=str(tmp_path / "ckpt" / "last.pth"))
    after = load_checkpoint(tmp_path / "ckpt" / "last.pth")["model_state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before) and good.keys() == after.keys()


def _nan(parts):
    parts.total = parts.total * float("nan")
    return parts


def test_the_cli_prints_one_line_for_a_corrupt_resume_file(synthetic_root, tmp_path):
    config = write_config(synthetic_root, tmp_path)
    bad = tmp_path / "last.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    result = subprocess.run([sys.executable, str(ROOT / "train_box_refiner_optimized.py"), "--config", str(config),
                             "--resume", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint '{bad}' cannot be read")
    assert os.path.getsize(bad) == len(b"PK\x03\x04 truncated")


def test_resume_applies_a_changed_learning_rate_and_refuses_other_images(synthetic_root, tmp_path):
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 1, "lr_scheduler": "none", "warmup_epochs": 0})
    train(config_from_dict(raw), CPU)
    last = str(tmp_path / "ckpt" / "last.pth")
    raw["training"].update(epochs=2, learning_rate=1e-4)
    train(config_from_dict(raw), CPU, resume=last)
    assert load_checkpoint(last)["optimizer_state_dict"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    raw["training"]["epochs"] = 3
    with pytest.raises(CheckpointError, match="the images, objects or detections of the splits differ"):
        train(config_from_dict(raw), CPU, resume=last, debug=True)  # --debug keeps fewer images
