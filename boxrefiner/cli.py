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

from .cache import cache_tag, clear_cache
from .checkpoint import LAST, CheckpointError
from .config import Config, load_config, replace
from .console import positive_int, resolve_device, run_command, setup_logging
from .encoder import encoder_identity
from .signals import Interrupted, StopRequest

log = logging.getLogger("boxrefiner")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a box-refinement head on frozen HQ-SAM image embeddings.")
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/box_refinement_config.yaml")
    parser.add_argument("--fast", action="store_true", help="sample_ratio 0.1, AMP on, batch size min(2x, 32)")
    parser.add_argument("--debug", action="store_true", help="at most debug.max_samples images per split, debug.epochs epochs")
    parser.add_argument("--clear-cache", nargs="?", const="encoder", choices=["encoder", "all"],
                        help="delete this encoder's cached features before the run ('all': every encoder's)")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                        help="continue from a checkpoint; 'auto' or no value: last.pth in output.checkpoint_dir")
    parser.add_argument("--allow-rollback", action="store_true",
                        help="let --resume go back to an older checkpoint (e.g. best_model.pth), replacing newer work")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--epochs", type=positive_int, help="override training.epochs")
    parser.add_argument("--batch-size", type=positive_int, help="override training.batch_size")
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


def resolve_resume(value: str | None, cfg: Config) -> str | None:
    if value != "auto":
        return value
    last = Path(cfg.output.checkpoint_dir) / LAST
    if not last.is_file():
        raise CheckpointError(f"--resume auto: no {LAST} in output.checkpoint_dir '{cfg.output.checkpoint_dir}'")
    return str(last)


def ensure_synthetic_data(cfg: Config) -> None:
    """Generate the demo dataset when the config asks for it (`data.synthetic`) and it is not there yet:
    FungiTastic's layout at data.data_root, or for coco / yolo the multi-object dataset (both layouts
    and simulated detections) at data.data_root, which the config's paths then point into."""
    data, s = cfg.data, cfg.data.synthetic
    if s is None:
        return
    root = Path(data.data_root)
    if data.format == "fungitastic":
        if (root / "metadata").is_dir():
            return
        from .synthetic import generate
        log.info("data.data_root %s is missing: generating %d train + %d val synthetic images (seed %d)", root,
                 s.train_images, s.val_images, s.seed)
        generate(root, s.train_images, s.val_images, s.seed)
        return
    wanted = data.yolo_data if data.format == "yolo" else data.train_annotations
    if not data.data_root or (wanted and Path(wanted).is_file()):
        return
    from .synthetic import generate_multi_object
    log.info("%s is missing: generating a %d train + %d val multi-object synthetic dataset (seed %d) in %s", wanted,
             s.train_images, s.val_images, s.seed, root)
    generate_multi_object(root, s.train_images, s.val_images, s.seed)


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
    from .engine import train  # heavy imports after argument errors are reported
    with StopRequest() as stop:
        try:
            train(cfg, device, resume=resume, debug=args.debug, stop=stop, allow_rollback=args.allow_rollback)
        except Interrupted as exc:
            name, command = signal.Signals(exc.signum).name, argv if argv is not None else sys.argv[1:]
            if exc.checkpoint is None:
                log.warning("stopped by %s during %s; every feature written so far is complete and kept. Run the "
                            "same command again to continue:\n  %s", name, exc.where, resume_command(command, None))
            else:
                log.warning("stopped by %s; state saved in %s. Resume with:\n  %s", name, exc.checkpoint,
                            resume_command(command, exc.checkpoint))
            return 128 + exc.signum
    return 0


def resume_command(argv: list[str], checkpoint: Path | None) -> str:
    """The same command line, without --resume/--clear-cache, plus --resume CHECKPOINT (if any)."""
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
    resume = ["--resume", str(checkpoint)] if checkpoint is not None else []
    return shlex.join(["python", "train_box_refiner_optimized.py", *kept, *resume])


def main(argv: list[str] | None = None) -> int:
    from .engine import TrainingError
    return run_command(run, argv, fatal=(TrainingError,))
