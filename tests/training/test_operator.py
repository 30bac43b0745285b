"""What an operator can do to a run (signals to the process group, shared folders, read-only caches,
a second run on the same folders, full disks, odd files) loses no work and gives one clear line."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, as_other_user, small_config

from boxrefiner.cli.train import main as cli_main
from boxrefiner.config import config_from_dict
from boxrefiner.data.synthetic import generate
from boxrefiner.features.cache import MARKER, FeatureCache, clear_cache, read_manifest
from boxrefiner.features.encoder import EncoderIdentity, ImageEncoder
from boxrefiner.modeling.checkpoint import CheckpointError, load_checkpoint
from boxrefiner.training import checkpoint as checkpoint_module
from boxrefiner.training.runlock import LOCK_NAME, RunLockError
from boxrefiner.training.trainer import train
from boxrefiner.utils.files import HOST, atomic_write, file_mode, write_json

CPU = torch.device("cpu")
IDENTITY = EncoderIdentity("vit_tiny", "a" * 64, 256, "fp32")


def strict_json(line: str):
    """json.loads that refuses NaN/Infinity, which are not JSON."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in JSON output"))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --- files and permissions -------------------------------------------------------------------------


def test_files_get_the_umask_mode_not_0600(tmp_path):
    previous = os.umask(0o002)
    try:
        import boxrefiner.utils.files as fileio
        fileio._UMASK = None  # read the umask again
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
        checkpoint_module.save_checkpoint({"epoch": 0}, tmp_path / "c.pth")
        cache = FeatureCache(tmp_path / "features", "train", IDENTITY)
        cache.save("ab" * 20, np.zeros(cache.shape, np.float32), {"file": "x.jpg"})
        cache.manifest.close()
        files = [tmp_path / "a.bin", tmp_path / "c.pth", cache.path("ab" * 20),
                 *(tmp_path / "features" / "train" / "manifest").glob("*.jsonl")]
        assert len(files) == 4 and all(p.stat().st_mode & 0o777 == 0o664 for p in files)
    finally:
        os.umask(previous)
        fileio._UMASK = None
    assert file_mode() == 0o666 & ~previous


def _load_as_user(cache_dir, key):
    cache = FeatureCache(cache_dir, "train", IDENTITY)
    return cache.load(key) is None, cache.find(key) is not None


def test_an_entry_this_user_cannot_read_is_a_miss_never_deleted(shared_tmp):
    cache = FeatureCache(shared_tmp / "features", "train", IDENTITY)
    key = "cd" * 20
    cache.save(key, np.ones(cache.shape, np.float32), {"file": "x.jpg"})
    os.chmod(cache.path(key), 0o600)  # written by another user, e.g. by an older version
    missing, still_there = as_other_user(_load_as_user, shared_tmp / "features", key)
    assert missing and still_there and cache.path(key).exists()


@pytest.fixture
def shared_data(shared_tmp):
    root = generate(shared_tmp / "data", train=4, val=2, seed=1)
    for folder in [shared_tmp, *shared_tmp.rglob("*")]:
        if folder.is_dir():
            os.chmod(folder, 0o755)
    return root


def _train_as_user(raw):
    try:
        return len(train(config_from_dict(raw), CPU))
    except RunLockError as exc:
        return str(exc)


def test_a_read_only_cache_with_every_entry_trains_and_a_read_only_run_folder_fails_at_start(shared_tmp, shared_data):
    raw = small_config(shared_data, shared_tmp / "root-run", training={"epochs": 1})
    raw["optimization"]["feature_cache"]["cache_dir"] = str(shared_tmp / "features")
    train(config_from_dict(raw), CPU)  # fills the cache as its owner (and imports what training needs)
    writable = shared_tmp / "other"
    writable.mkdir()
    os.chmod(writable, 0o777)
    raw["output"] = {"save_dir": str(writable / "out"), "checkpoint_dir": str(writable / "ckpt"),
                     "log_dir": str(writable / "logs")}
    assert as_other_user(_train_as_user, raw) == 1
    raw["output"]["checkpoint_dir"] = str(shared_tmp / "root-run" / "ckpt")  # the owner's, read-only to others
    message = as_other_user(_train_as_user, raw)
    assert "is not writable" in message and "root-run/ckpt" in message


def test_clear_all_and_runs_leave_files_the_tool_did_not_write(synthetic_root, tmp_path):
    folder = tmp_path / "mydata"
    (folder / "train").mkdir(parents=True)
    mine = {folder / "notes.txt": b"mine", folder / "train" / "manifest.json": b'{"my": "manifest"}'}
    np.save(folder / "train" / "array.npy", np.arange(3))
    np.save(folder / "train" / ("e" * 40 + ".npy"), np.arange(3))  # named like an entry, but not listed
    for path, data in mine.items():
        path.write_bytes(data)
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 1})
    raw["optimization"]["feature_cache"]["cache_dir"] = str(folder)
    train(config_from_dict(raw), CPU)
    assert not (folder / MARKER).exists()  # a folder with other content is not marked as the tool's
    assert all(path.read_bytes() == data for path, data in mine.items())
    files, _ = clear_cache(folder)  # --clear-cache all
    assert files == 32 and not list(folder.glob("*/*/*.npy"))
    assert all(path.read_bytes() == data for path, data in mine.items())
    assert (folder / "train" / "array.npy").exists() and (folder / "train" / ("e" * 40 + ".npy")).exists()


def test_manifests_of_the_wrong_shape_are_ignored_not_fatal(synthetic_root, tmp_path):
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 1})
    train(config_from_dict(raw), CPU)
    for folder, content in ((tmp_path / "features" / "train", "[1, 2]"),
                            (tmp_path / "features" / "val", '{"encoders": {"x": "not a mapping"}}')):
        (folder / "manifest.json").write_text(content)
        journal = folder / "manifest" / "odd.jsonl"
        journal.write_text('{"tool": "boxrefiner", "format": 2}\n[1]\n{"op": "add", "tag": 5}\n{"op": "add", "t": "x"\n')
    history = train(config_from_dict(raw), CPU)
    assert history.cache_stats["found"] == 32 and history.cache_stats["extracted"] == 0


def test_temp_files_of_killed_writers_are_removed_and_kill_orphans_are_cleared(synthetic_root, tmp_path):
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 1})
    split = tmp_path / "features" / "train" / "ab"
    split.mkdir(parents=True)
    dead = split / f".{'ab' * 20}.npy.{HOST}.{dead_pid()}.x1.tmp"
    live = split / f".{'ab' * 20}.npy.{HOST}.{os.getpid()}.x2.tmp"
    old = split / f".{'ab' * 20}.npy.otherhost.123.x3.tmp"
    for path in (dead, live, old):
        path.write_bytes(b"torn")
    os.utime(old, (time.time() - 25 * 3600,) * 2)
    train(config_from_dict(raw), CPU)
    assert live.exists() and not dead.exists() and not old.exists()
    # every entry on disk is listed before it is written, so clearing one encoder finds them all
    listed = {k for enc in read_manifest(tmp_path / "features" / "train").values() for k in enc.entries}
    assert {p.stem for p in (tmp_path / "features" / "train").glob("*/*.npy")} <= listed


# --- one run per folder, no rollback, best before last -----------------------------------------------


def test_a_second_run_on_the_same_folders_refuses_stale_locks_are_taken_over(synthetic_root, tmp_path, caplog):
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 1})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (ckpt / LOCK_NAME).write_text(json.dumps({"host": HOST, "pid": sleeper.pid, "started": time.time()}))
        with pytest.raises(RunLockError, match=f"is in use by another run \\(pid {sleeper.pid} on host {HOST}"):
            train(config_from_dict(raw), CPU)
    finally:
        sleeper.kill()
        sleeper.wait()
    (ckpt / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time()}))
    with pytest.raises(RunLockError, match="host elsewhere.*if that run is gone, delete"):
        train(config_from_dict(raw), CPU)
    (ckpt / LOCK_NAME).write_text(json.dumps({"host": HOST, "pid": dead_pid(), "started": time.time()}))
    assert len(train(config_from_dict(raw), CPU)) == 1
    assert "taking over the lock of a run that is gone" in caplog.text
    assert not (ckpt / LOCK_NAME).exists() and not (tmp_path / "out" / LOCK_NAME).exists()  # released


def test_best_is_written_before_last_and_resuming_an_older_checkpoint_refuses(synthetic_root, tmp_path, monkeypatch):
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 1})
    written = []
    real_save = checkpoint_module.save_checkpoint
    monkeypatch.setattr("boxrefiner.training.checkpoint.save_checkpoint", lambda state, path: (written.append(Path(path).name),
                                                                                   real_save(state, path)))
    train(config_from_dict(raw), CPU)
    assert written == ["best_model.pth", "last.pth"]  # a kill between the two leaves best current
    old = tmp_path / "epoch0.pth"
    old.write_bytes((tmp_path / "ckpt" / "last.pth").read_bytes())
    raw["training"]["epochs"] = 2
    train(config_from_dict(raw), CPU, resume=str(tmp_path / "ckpt" / "last.pth"))
    with pytest.raises(CheckpointError, match=r"goes back to epoch 0: it would replace .*last.pth \(epoch 1\) and "
                                              r"epochs 1-1 of metrics.jsonl; allow the"):
        train(config_from_dict(raw), CPU, resume=str(old))
    assert [json.loads(x)["epoch"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    history = train(config_from_dict(raw), CPU, resume=str(old), allow_rollback=True)
    assert [r["epoch"] for r in history] == [1]


# --- one line, never a traceback -------------------------------------------------------------------


def run_cli(args, capsys):
    code = cli_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture
def config_file(synthetic_root, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(small_config(synthetic_root, tmp_path, training={"epochs": 1})))
    return path


def test_resume_from_an_empty_file_or_weights_of_another_shape_is_one_line(config_file, tmp_path, capsys):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    code, line = run_cli(["--config", str(config_file), "--resume", str(empty)], capsys)
    assert code == 2 and line == f"error: checkpoint '{empty}' is empty (0 bytes): an interrupted copy or download?"
    assert cli_main(["--config", str(config_file)]) == 0
    state = load_checkpoint(tmp_path / "ckpt" / "last.pth")
    state["model_state_dict"] = {k: torch.zeros(3) for k in state["model_state_dict"]}
    torch.save(state, tmp_path / "other_shape.pth")
    code, line = run_cli(["--config", str(config_file), "--resume", str(tmp_path / "other_shape.pth"), "--epochs", "2"],
                         capsys)
    assert code == 2 and "its saved state does not fit this model" in line and "size mismatch" in line


def test_a_full_disk_names_the_checkpoint_not_a_temp_file(config_file, tmp_path, capsys, monkeypatch):
    def full(state, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    code, line = run_cli(["--config", str(config_file)], capsys)
    assert code == 1 and line == f"error: No space left on device: {tmp_path / 'ckpt' / 'best_model.pth'}"
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))
    monkeypatch.setattr(checkpoint_module.torch, "save", lambda state, f: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:859] . PytorchStreamWriter failed writing file data/3")))
    code, line = run_cli(["--config", str(config_file)], capsys)
    assert code == 1 and line.startswith("error: writing failed (") and line.endswith(str(tmp_path / "ckpt" / "best_model.pth"))


class Pickled:
    pass


def test_weights_only_refusal_keeps_its_reason_and_yaml_keys_are_unique(config_file, tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"epoch": 0, "model_state_dict": {}, "optimizer_state_dict": {}, "config": {}, "x": Pickled()}, evil)
    code, line = run_cli(["--config", str(config_file), "--resume", str(evil)], capsys)
    assert code == 2 and "arbitrary code execution" in line and "test_operator.Pickled" in line
    dup = tmp_path / "dup.yaml"
    dup.write_text(config_file.read_text() + "training:\n  epochs: 3\n")
    code, line = run_cli(["--config", str(dup)], capsys)
    assert code == 2 and "key 'training' appears twice" in line


# --- non-finite values never cached, never in JSON --------------------------------------------------


def test_nonfinite_features_are_extracted_again_then_the_image_is_left_out(synthetic_root, tmp_path, monkeypatch):
    real_encode = ImageEncoder.encode
    calls = {"n": 0}

    def poisoned(self, images, precision=None):
        features = real_encode(self, images, precision).clone()
        calls["n"] += 1
        if calls["n"] == 1 or len(images) == 1:  # the first batch's first image, and its retry alone
            features[0, 0, 0, 0] = float("nan")
        return features

    monkeypatch.setattr(ImageEncoder, "encode", poisoned)
    raw = small_config(synthetic_root, tmp_path, training={"epochs": 2})
    history = train(config_from_dict(raw), CPU)
    skipped = [strict_json(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in skipped] == ["nonfinite_features"] and skipped[0]["split"] == "train"
    records = [strict_json(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_iou_refined"]) for r in records)
    assert history.cache_stats["served"] == 2 * 23 + 2 * 8
    assert len(list((tmp_path / "features" / "train").glob("*/*.npy"))) == 23  # nothing non-finite stored


def test_json_outputs_write_null_for_nan(tmp_path):
    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5]})
    assert strict_json((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5]}


# --- signals to the whole process group ------------------------------------------------------------


class Run:
    """The training command in its own process group, its stderr read as it comes."""

    def __init__(self, config: Path, *extra: str):
        self.process = subprocess.Popen([sys.executable, str(ROOT / "train_box_refiner_optimized.py"), "--config",
                                         str(config), *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.err = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):  # raw reads: progress bars end their updates with a carriage return, not a newline
        while chunk := os.read(self.process.stderr.fileno(), 65536):
            self.err += chunk.decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while text not in self.err:
            assert self.process.poll() is None, self.err
            assert time.time() < deadline, f"no '{text}' in time:\n{self.err}"
            time.sleep(0.05)

    def signal_group(self, signum: int) -> int:
        os.killpg(self.process.pid, signum)
        try:
            code = self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"still running 120 s after {signal.Signals(signum).name}:\n{self.err}") from None
        self.reader.join(timeout=10)
        return code


def write_config(root, work: Path, **sections) -> Path:
    raw = small_config(root, work, **sections)
    raw["data"]["num_workers"] = 2  # DataLoader workers, as any real run has
    work.mkdir(parents=True, exist_ok=True)
    (work / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return work / "cfg.yaml"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_stops_training_with_workers_and_saves(synthetic_root, tmp_path, signum):
    run = Run(write_config(synthetic_root, tmp_path, training={"epochs": 4, "feature_cache": False}))
    run.wait_for("epoch 0/3")
    code = run.signal_group(signum)
    assert code == 128 + signum, run.err
    assert "Traceback" not in run.err and "killed by signal" not in run.err
    assert run.err.count(f"{signal.Signals(signum).name} received") == 1  # the main process alone
    assert load_checkpoint(tmp_path / "ckpt" / "last.pth")["interrupted"] is True


def test_sigterm_during_extraction_ends_with_one_line_and_complete_entries(synthetic_root, tmp_path):
    config = write_config(synthetic_root, tmp_path, hqsam={"input_size": 512, "batch_size": 2})
    run = Run(config)
    run.wait_for("Extracting train")
    code = run.signal_group(signal.SIGTERM)  # the batch in hand is finished and stored, then the run stops
    assert code == 143, run.err
    assert "Traceback" not in run.err and "stopped by SIGTERM during feature extraction" in run.err
    folder = tmp_path / "features" / "train"
    entries = list(folder.glob("*/*.npy"))
    assert 0 < len(entries) < 24 and not list(folder.rglob(".*.tmp"))
    assert all(np.load(p).shape == (256, 32, 32) for p in entries)
    assert {p.stem for p in entries} <= {k for e in read_manifest(folder).values() for k in e.entries}
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()


WORKER_START_SCRIPT = """
import os, signal, sys, time
import boxrefiner.features.sources as features
from boxrefiner.utils.signals import ignore_stop_signals
import torch

def slow_start(worker_id):  # a worker still starting up when the signal comes
    time.sleep(1.0)
    ignore_stop_signals(worker_id)

features.ignore_stop_signals = slow_start
received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
loader = features.make_loader(list(range(8)), 2, 2, torch.device("cpu"), persistent=False)
batches = iter(loader)
os.killpg(0, signal.SIGTERM)  # as systemd or scancel would: every process of the group
print(sum(len(b) for b in batches), received, flush=True)
"""


def test_a_signal_while_workers_start_reaches_the_main_process_only(tmp_path):
    script = tmp_path / "start.py"
    script.write_text(WORKER_START_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.split() == ["8", f"[{int(signal.SIGTERM)}]"], done.stderr[-2000:]
