"""torchrun on CPU (gloo, 2 processes): sharded extraction that encodes each image once, DDP training that
matches one process, checkpoints that load and resume in one process; and two independent processes
filling one cache at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, small_config

from boxrefiner.config import config_from_dict
from boxrefiner.features.cache import FeatureCache
from boxrefiner.features.encoder import encoder_identity
from boxrefiner.infer.refiner import BoxRefiner
from boxrefiner.training.trainer import prepare_splits, train
from boxrefiner.utils.files import sha256_file

EPOCHS = 6
CPU = torch.device("cpu")


def config(synthetic_root: Path, work: Path, **training) -> Path:
    raw = small_config(synthetic_root, work, training={"epochs": EPOCHS, **training},
                       refinement={"max_iter": 2, "stop_threshold": 0.0, "gate": False})
    path = work / "config.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "boxrefiner", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def metrics(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics without the timings."""
    return [{k: v for k, v in r.items() if not k.endswith("seconds") and k != "samples_per_second"} for r in rows]


def journal_adds(features: Path) -> list[str]:
    """The key of every entry any writer listed, once per listing."""
    keys = []
    for journal in sorted(features.glob("*/manifest/*.jsonl")):
        for line in journal.read_text().splitlines()[1:]:
            event = json.loads(line)
            if event.get("op") == "add":
                keys.append(event["key"])
    return keys


def entries(cfg_path: Path) -> dict[str, np.ndarray]:
    cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()))
    identity = encoder_identity(cfg.hqsam, memo_dir=cfg.optimization.feature_cache.cache_dir)
    found = {}
    for split in prepare_splits(cfg):
        cache = FeatureCache(cfg.optimization.feature_cache.cache_dir, split.split, identity)
        for image in split.images:
            stored = cache.load(cache.key_for(sha256_file(image.image_path)), count=False)
            assert stored is not None, f"{image.file_name}: no entry"
            found[f"{split.split}/{image.file_name}"] = stored
    return found


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    one_cfg, two_cfg = config(synthetic_root, one), config(synthetic_root, two)
    train(config_from_dict(yaml.safe_load(one_cfg.read_text())), CPU)
    result = torchrun("train", "--config", str(two_cfg))
    assert result.returncode == 0, result.stderr[-3000:]
    return one_cfg, two_cfg, result


def test_two_processes_extract_each_image_once_and_store_what_one_process_stores(runs):
    one_cfg, two_cfg, result = runs
    listed = journal_adds(two_cfg.parent / "features")
    assert len(listed) == len(set(listed)) == 32  # 24 train + 8 val images, each encoded by one rank only
    assert len(list((two_cfg.parent / "features").glob("*/manifest/*.jsonl"))) == 4  # 2 ranks x 2 splits wrote
    alone, sharded = entries(one_cfg), entries(two_cfg)
    assert alone.keys() == sharded.keys()
    for name, value in alone.items():  # thread counts change summation order: float16 rounding apart
        np.testing.assert_allclose(sharded[name].astype(np.float32), value.astype(np.float32), atol=4e-3, err_msg=name)
    assert "distributed extraction: 2 ranks" in result.stderr


def test_two_processes_train_one_run_that_matches_one_process(runs):
    one_cfg, two_cfg, result = runs
    alone, together = metrics(one_cfg.parent), metrics(two_cfg.parent)
    assert [r["epoch"] for r in together] == list(range(EPOCHS))  # rank 0 alone writes, one line per epoch
    for key in ("val_iou_refined", "val_iou_refined_levels"):
        assert abs(together[-1][key] - alone[-1][key]) <= 0.01, (key, together[-1][key], alone[-1][key])
    assert together[-1]["val_iou_input"] == alone[-1]["val_iou_input"]  # every validation object counted once
    assert result.stderr.count("INFO done: best val IoU") == 1  # rank 0 alone logs


def test_a_two_process_checkpoint_refines_and_resumes_in_one_process(runs, synthetic_root, tmp_path, caplog):
    import shutil
    _, two_cfg, _ = runs
    work = two_cfg.parent
    refiner = BoxRefiner.from_checkpoint(work / "ckpt" / "best_model.pth", device="cpu", num_workers=0)
    image = next((synthetic_root / "FungiTastic-Mini" / "val" / "300p").glob("*.JPG"))
    result = refiner.refine(image, [[20, 20, 120, 140]])
    assert result.boxes.shape == (1, 4) and np.isfinite(result.boxes).all()
    state = torch.load(work / "ckpt" / "last.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    raw = yaml.safe_load(two_cfg.read_text())
    raw["training"]["epochs"] = EPOCHS + 1
    raw["output"] = {k: str(tmp_path / k) for k in ("save_dir", "checkpoint_dir", "log_dir")}  # the run stays as it was
    shutil.copy(work / "ckpt" / "last.pth", tmp_path / "last.pth")
    history = train(config_from_dict(raw), CPU, resume=str(tmp_path / "last.pth"))
    assert [r["epoch"] for r in history] == [EPOCHS]
    assert "written by 2 process(es), this run has 1: it continues at the epoch boundary" in caplog.text


def test_a_global_batch_the_world_does_not_divide_is_one_line(synthetic_root, tmp_path):
    result = torchrun("train", "--config", str(config(synthetic_root, tmp_path, batch_size=7)))
    assert result.returncode != 0
    assert "'training.batch_size': 7 is the global batch and must divide by the 2 processes" in result.stderr


def test_two_independent_processes_fill_one_cache_at_once(synthetic_root, tmp_path):
    shared = tmp_path / "features"
    paths = []
    for name in ("a", "b"):
        raw = small_config(synthetic_root, tmp_path / name)
        raw["optimization"]["feature_cache"]["cache_dir"] = str(shared)
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "config.yaml")
        paths[-1].write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "boxrefiner", "extract", "--config"]
    processes = [subprocess.Popen([*command, str(p)], cwd=ROOT, stderr=subprocess.PIPE, text=True) for p in paths]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    listed = set(journal_adds(shared))
    found = entries(paths[0])  # every image's entry is there, listed and readable
    assert len(found) == 32 and len(listed) == 32
    assert not list(shared.rglob("*.tmp*")), "a temp file was left behind"
    again = entries(paths[1])
    assert all(np.array_equal(found[k], again[k]) for k in found)


def test_two_processes_refine_the_images_between_them_into_one_output_in_order(runs, synthetic_root, tmp_path):
    from boxrefiner.data.synthetic import simulated_detections
    _, two_cfg, _ = runs
    checkpoint = str(two_cfg.parent / "ckpt" / "best_model.pth")
    rows = simulated_detections(synthetic_root, "val", seed=5, per_image=2)
    rows.insert(3, {"file_name": "missing.JPG", "bbox": [1, 1, 9, 9]})  # a row only one rank can report
    (tmp_path / "in.json").write_text(json.dumps(rows))
    images = str(synthetic_root / "FungiTastic-Mini" / "val" / "300p")
    common = ["--checkpoint", checkpoint, "--images", images, "--detections", str(tmp_path / "in.json"),
              "--num-workers", "0"]
    result = torchrun("refine", *common, "--output", str(tmp_path / "two.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    alone = subprocess.run([sys.executable, "-m", "boxrefiner", "refine", *common, "--output", str(tmp_path / "one.json")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert [r["file_name"] for r in two] == [r["file_name"] for r in rows]  # the input's order
    assert two[3]["refine_error"] == "missing_image" and "bbox_input" not in two[3]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        np.testing.assert_allclose(b["bbox"], a["bbox"], atol=1e-3)
    assert "refined 16 of 17 detections on 8 images" in result.stderr


def test_sigterm_stops_every_rank_at_one_step_and_the_same_world_resumes_exactly(runs, synthetic_root, tmp_path):
    import signal
    import time
    _, two_cfg, _ = runs
    cfg = config(synthetic_root, tmp_path)
    log = tmp_path / "run.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "boxrefiner", "train", "--config", str(cfg)]
    with open(log, "w") as err:
        launcher = subprocess.Popen(command, cwd=ROOT, stderr=err, stdout=subprocess.DEVNULL)
        deadline = time.time() + 300
        while "INFO epoch 1/" not in log.read_text() and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)  # torchrun hands it to both ranks
        launcher.wait(timeout=300)
    text = log.read_text()
    assert "stopped by SIGTERM; state saved in" in text and "Resume with:\n  torchrun --nproc_per_node=2" in text
    state = torch.load(tmp_path / "ckpt" / "last.pth", weights_only=True)
    assert state["interrupted"] and state["epoch"] < EPOCHS - 1
    result = torchrun("train", "--config", str(cfg), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert comparable(metrics(tmp_path)) == comparable(metrics(two_cfg.parent))
