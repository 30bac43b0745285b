"""The one command: `boxrefiner <subcommand>`, `python -m boxrefiner`, key=value overrides and --print-config."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from boxrefiner.cli import main as command
from boxrefiner.cli import train as train_cli
from boxrefiner.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")


def printed_config(capsys, *args: str) -> dict:
    assert train_cli.main(["--config", DEMO, *args, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_help_lists_every_subcommand(capsys):
    assert command.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "refine", "evaluate", "synth", "bench"):
        assert f"  {name} " in out
    assert command.main([]) == 2  # no command: the usage, and a failing status for scripts


def test_unknown_command_is_one_line(capsys):
    assert command.main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown command 'trian'; choose one of train, extract, refine, evaluate, synth, bench"


def test_python_dash_m_and_the_console_script_run():
    result = subprocess.run([sys.executable, "-m", "boxrefiner", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "commands:" in result.stdout
    try:
        importlib.metadata.distribution("boxrefiner")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the package is not installed (pip install -e .): no console script to run")
    script = shutil.which("boxrefiner", path=str(Path(sys.executable).parent))
    assert script is not None, "pip install put no `boxrefiner` script beside the interpreter"
    result = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "key=value" in result.stdout and "--print-config" in result.stdout


def test_overrides_win_over_flags_and_flags_over_the_file(capsys):
    assert printed_config(capsys)["training"]["epochs"] == yaml.safe_load(Path(DEMO).read_text())["training"]["epochs"]
    assert printed_config(capsys, "--debug")["training"]["epochs"] == 2  # debug.epochs
    assert printed_config(capsys, "--debug", "training.epochs=1")["training"]["epochs"] == 1
    fast = printed_config(capsys, "--fast", "training.batch_size=3", "data.sample_ratio=0.2", "hqsam.model_type=vit_b")
    assert fast["training"]["batch_size"] == 3 and fast["training"]["use_amp"] is True  # --fast's, then mine
    assert fast["data"]["sample_ratio"] == 0.2 and fast["hqsam"]["model_type"] == "vit_b"


def test_an_option_with_an_optional_value_does_not_swallow_an_override(capsys):
    assert printed_config(capsys, "--resume", "training.epochs=5")["training"]["epochs"] == 5


def test_printed_config_reads_back_to_the_same_config(capsys, tmp_path):
    text = yaml.safe_dump(printed_config(capsys, "training.epochs=7", "evaluation.levels.tiny=[0.01, 0.02]"))
    (tmp_path / "c.yaml").write_text(text)
    cfg, _ = load_config(tmp_path / "c.yaml")
    original, _ = load_config(DEMO)
    assert cfg.training.epochs == 7 and cfg.evaluation.levels["tiny"] == (0.01, 0.02)
    assert cfg.model == original.model and cfg.data == original.data and cfg.hqsam == original.hqsam


@pytest.mark.parametrize(("override", "message"), [
    ("training.epocs=5", "error: override 'training.epocs=5': unknown config key 'training.epocs'; did you mean "
                         "'training.epochs'?"),
    ("training.epochs=0", "error: override 'training.epochs=0': config key 'training.epochs': 0 is out of range, "
                          "allowed [1, inf]"),
    ("trainig.epochs=5", "error: override 'trainig.epochs=5': unknown config key 'trainig'; did you mean 'training'?"),
    ("epochs=5", "error: override 'epochs=5': unknown config key 'epochs'; valid keys: model, refinement, training, "
                 "loss, data, hqsam, output, logging, optimization, evaluation, debug"),
    ("training.epochs", "error: override 'training.epochs': expected dotted.key=value, e.g. training.epochs=5"),
])
def test_a_bad_override_is_one_line_naming_it(capsys, override, message):
    assert train_cli.main(["--config", DEMO, override, "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == message


def test_the_resume_hint_keeps_the_overrides_and_replaces_resume():
    argv = ["--config", "c.yaml", "--resume", "training.epochs=5", "--clear-cache", "all", "--debug"]
    assert train_cli.resume_command(argv, Path("ck/last.pth"), "boxrefiner train") == (
        "boxrefiner train --config c.yaml --debug --resume ck/last.pth training.epochs=5")
    assert train_cli.resume_command(["--config", "c.yaml"], None).startswith("python train_box_refiner_optimized.py")


def test_bench_names_its_two_measurements(capsys):
    assert command.main(["bench"]) == 2
    assert "epoch" in capsys.readouterr().err
    assert command.main(["bench", "--help"]) == 0
    assert "suite" in capsys.readouterr().out


def test_flags_read_the_overridden_values(capsys):
    """An override reaches what a flag derives from it: --debug takes debug.epochs, --fast the batch size."""
    assert printed_config(capsys, "--debug", "debug.epochs=1")["training"]["epochs"] == 1
    assert printed_config(capsys, "--fast", "training.batch_size=4")["training"]["batch_size"] == 4


@pytest.mark.parametrize(("override", "key", "expected"), [
    ("evaluation.levels={tiny: [0.01, 0.02]}", ("evaluation", "levels"), {"tiny": [0.01, 0.02]}),  # replaces, as a file
    ("data.data_subset=no", ("data", "data_subset"), "no"),  # YAML's false, but the key takes text
    ("output.save_dir=#run1", ("output", "save_dir"), "#run1"),
    ("data.synthetic.seed=5", ("data", "synthetic", "seed"), 5),
])
def test_an_override_sets_exactly_its_key(capsys, override, key, expected):
    value = printed_config(capsys, override)
    for part in key:
        value = value[part]
    assert value == expected


def test_an_override_into_a_list_asks_for_the_whole_list(capsys):
    assert train_cli.main(["--config", DEMO, "data.box_noise.center_std=0.3", "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == ("error: override 'data.box_noise.center_std=0.3': config key "
                                               "'data.box_noise' is a list; give the whole list, e.g. data.box_noise=[...]")


def test_the_public_api_names_the_functions_not_the_subpackages():
    """`from boxrefiner import train` is the training function, in a fresh interpreter."""
    code = ("from boxrefiner import BoxRefiner, BoxRefinementModule, Config, load_config, train\n"
            "import boxrefiner.training.trainer as t\n"
            "assert callable(train) and train is t.train and BoxRefiner.__name__ == 'BoxRefiner'\n"
            "import boxrefiner; assert boxrefiner.train is t.train and callable(boxrefiner.load_config)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
