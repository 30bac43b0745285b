import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from boxrefiner.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, raw) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


@pytest.mark.parametrize("name", ["demo.yaml", "box_refinement_config.yaml"])
def test_shipped_configs_load(name):
    cfg, ignored = load_config(ROOT / "configs" / name)
    assert cfg.training.epochs >= 1 and ignored == []


def test_scientific_notation_reads_as_float(tmp_path):
    path = write(tmp_path, "data:\n  data_root: x\ntraining:\n  learning_rate: 5e-5\n  weight_decay: 1E-4\n")
    cfg, _ = load_config(path)
    assert cfg.training.learning_rate == pytest.approx(5e-5) and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.weight_decay == pytest.approx(1e-4)


def test_typo_suggests_closest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'training.learnig_rate'; did you mean 'training.learning_rate'"):
        config_from_dict({"data": {"data_root": "x"}, "training": {"learnig_rate": 0.1}})


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="unknown config key 'trainig'; did you mean 'training'"):
        config_from_dict({"data": {"data_root": "x"}, "trainig": {}})


@pytest.mark.parametrize("section,key,value,match", [
    ("data", "sample_ratio", 0.0, r"'data.sample_ratio': 0.0 is out of range, allowed \(0, 1\]"),
    ("data", "sample_ratio", 1.5, r"'data.sample_ratio': 1.5 is out of range"),
    ("training", "learning_rate", -1e-3, r"'training.learning_rate': -0.001 is out of range"),
    ("training", "batch_size", 0, r"'training.batch_size': 0 is out of range"),
    ("training", "batch_size", "big", r"'training.batch_size': expected an integer"),
    ("training", "use_amp", "yes please", r"'training.use_amp': expected true or false"),
    ("training", "lr_scheduler", "linear", r"'training.lr_scheduler': must be one of 'cosine' \| 'step' \| 'none'"),
    ("hqsam", "model_type", "vit_x", r"'hqsam.model_type': must be one of"),
])
def test_bad_values_name_the_key(section, key, value, match):
    raw = {"data": {"data_root": "x"}}
    raw.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_input_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ConfigError, match="'hqsam.input_size'"):
        config_from_dict({"data": {"data_root": "x"}, "hqsam": {"input_size": 1000}})


def test_original_performance_keys_are_ignored_and_reported(tmp_path):
    path = write(tmp_path, {"data": {"data_root": "x"}, "optimization": {
        "performance": {"use_amp": False, "batch_size_multiplier": 1.0, "data_sampling": None}}})
    _, ignored = load_config(path)
    assert ignored == ["optimization.performance"]


def test_cache_switches_both_must_allow():
    base = {"data": {"data_root": "x"}}
    assert config_from_dict(base).cache_enabled
    assert not config_from_dict({**base, "training": {"feature_cache": False}}).cache_enabled
    assert not config_from_dict({**base, "optimization": {"feature_cache": {"enabled": False}}}).cache_enabled


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train_box_refiner_optimized.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("raw,needle", [
    ({"data": {"data_root": "x"}, "training": {"learnig_rate": 0.1}}, "did you mean 'training.learning_rate'"),
    ({"data": {"data_root": "x", "sample_ratio": 2}}, "'data.sample_ratio'"),
])
def test_cli_config_errors_are_one_line(tmp_path, raw, needle):
    result = run_cli("--config", str(write(tmp_path, raw)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr


def test_cli_missing_data_folder_is_one_line(tmp_path):
    raw = {"data": {"data_root": str(tmp_path / "nowhere")}, "hqsam": {"allow_random_init": True},
           "output": {"log_dir": str(tmp_path / "logs")}}
    result = run_cli("--config", str(write(tmp_path, raw)))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "data.data_root" in last and "nowhere" in last and "metadata/" in last
    assert "Traceback" not in result.stderr


def test_cli_missing_config_file(tmp_path):
    result = run_cli("--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_non_utf8_and_non_mapping_files_are_one_line_errors(tmp_path):
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("data:\n  data_root: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(binary)
    with pytest.raises(ConfigError, match="the top level of the config file: expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
