"""Command line of `train_box_refiner_optimized.py`: flags -> validated config -> engine.train.

User errors (config, data layout, checkpoints) end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .cache import CacheError, cache_tag, clear_cache
from .checkpoint import LAST, CheckpointError
from .config import Config, ConfigError, load_config, replace
from .data import DataError
from .encoder import EncoderError, encoder_identity

log = logging.getLogger("boxrefiner")
USER_ERRORS = (ConfigError, DataError, EncoderError, CheckpointError, CacheError)


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(log_dir: str | None = None) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(log_dir) / "train.log", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a box-refinement head on frozen HQ-SAM image embeddings.")
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/box_refinement_config.yaml")
    parser.add_argument("--fast", action="store_true", help="sample_ratio 0.1, AMP on, batch size min(2x, 32)")
    parser.add_argument("--debug", action="store_true", help="at most debug.max_samples images per split, debug.epochs epochs")
    parser.add_argument("--clear-cache", nargs="?", const="encoder", choices=["encoder", "all"],
                        help="delete this encoder's cached features before the run ('all': every encoder's)")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                        help="continue from a checkpoint; 'auto' or no value: last.pth in output.checkpoint_dir")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--epochs", type=_positive_int, help="override training.epochs")
    parser.add_argument("--batch-size", type=_positive_int, help="override training.batch_size")
    return parser


def apply_overrides(cfg: Config, args: argparse.Namespace) -> tuple[Config, list[str]]:
    """Apply --fast, --debug, --epochs and --batch-size; returns the config and what changed."""
    notes = []
    if args.batch_size:
        cfg = replace(cfg, "training", batch_size=args.batch_size)
        notes.append(f"--batch-size: batch_size={args.batch_size}")
    if args.fast:
        batch = min(cfg.training.batch_size * 2, 32)
        cfg = replace(cfg, "training", use_amp=True, batch_size=batch)
        cfg = replace(cfg, "data", sample_ratio=0.1)
        notes.append(f"--fast: sample_ratio=0.1, use_amp=true, batch_size={batch}")
    if args.debug:
        cfg = replace(cfg, "training", epochs=cfg.debug.epochs)
        notes.append(f"--debug: at most {cfg.debug.max_samples} images per split, {cfg.debug.epochs} epochs")
    if args.epochs:
        cfg = replace(cfg, "training", epochs=args.epochs)
        notes.append(f"--epochs: epochs={args.epochs}")
    return cfg, notes


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device '{name}': use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ConfigError(f"--device '{name}': use auto, cpu, cuda or cuda:N")
    return device


def resolve_resume(value: str | None, cfg: Config) -> str | None:
    if value != "auto":
        return value
    last = Path(cfg.output.checkpoint_dir) / LAST
    if not last.is_file():
        raise CheckpointError(f"--resume auto: no {LAST} in output.checkpoint_dir '{cfg.output.checkpoint_dir}'")
    return str(last)


def ensure_synthetic_data(cfg: Config) -> None:
    """Generate the demo dataset when the config asks for it and it is not there yet."""
    root = Path(cfg.data.data_root)
    if cfg.data.synthetic is None or (root / "metadata").is_dir():
        return
    from .synthetic import generate
    s = cfg.data.synthetic
    log.info("data.data_root %s is missing: generating %d train + %d val synthetic images (seed %d)", root,
             s.train_images, s.val_images, s.seed)
    generate(root, s.train_images, s.val_images, s.seed)


def clear_features(cfg: Config, every_encoder: bool) -> None:
    """--clear-cache: this run's encoder's entries in every split, or (all) every entry."""
    cache_cfg = cfg.optimization.feature_cache
    if every_encoder:
        files, size = clear_cache(cache_cfg.cache_dir)
        whose = "every encoder"
    else:
        identity = encoder_identity(cfg.hqsam, memo_dir=cache_cfg.cache_dir)
        files, size = clear_cache(cache_cfg.cache_dir, cache_tag(identity, cache_cfg.storage_dtype))
        whose = identity.short()
    log.info("--clear-cache: removed %d feature files (%.1f MiB) of %s from %s", files, size / 2**20, whose,
             cache_cfg.cache_dir)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, ignored = load_config(args.config)
    cfg, notes = apply_overrides(cfg, args)
    setup_logging(cfg.output.log_dir)
    for key in ignored:
        log.info("config key '%s' is accepted for compatibility with the original tool but not used", key)
    for note in notes:
        log.info(note)
    device = resolve_device(args.device)
    resume = resolve_resume(args.resume, cfg)
    ensure_synthetic_data(cfg)
    if args.clear_cache:
        clear_features(cfg, every_encoder=args.clear_cache == "all")
    from .engine import Interrupted, StopRequest, train  # heavy imports after argument errors are reported
    with StopRequest() as stop:
        try:
            train(cfg, device, resume=resume, debug=args.debug, stop=stop)
        except Interrupted as exc:
            log.warning("stopped by %s; state saved in %s. Resume with:\n  %s", signal.Signals(exc.signum).name,
                        exc.checkpoint, resume_command(argv if argv is not None else sys.argv[1:], exc.checkpoint))
            return 128 + exc.signum
    return 0


def resume_command(argv: list[str], checkpoint: Path) -> str:
    """The same command line, without --resume/--clear-cache, plus --resume CHECKPOINT."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
            if not arg.startswith("--"):
                continue
        if arg in ("--resume", "--clear-cache"):
            skip_value = True
            continue
        if arg.startswith(("--resume=", "--clear-cache=")):
            continue
        kept.append(arg)
    return shlex.join(["python", "train_box_refiner_optimized.py", *kept, "--resume", str(checkpoint)])


def main(argv: list[str] | None = None) -> int:
    from .engine import TrainingError
    try:
        return run(argv)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # read-only folder, full disk, ...: what and where, without a traceback
        print(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: every file is written atomically, so nothing is torn
        print("interrupted at once; the last saved checkpoint is intact", file=sys.stderr)
        return 130
