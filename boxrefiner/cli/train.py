"""`boxrefiner train` (and `train_box_refiner_optimized.py`): flags, then `key=value` overrides, then
the validated config goes to `train.trainer.train`.

User errors (config, data layout, checkpoints) end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from boxrefiner.cli.common import (
    add_device_argument,
    add_override_arguments,
    parse_with_overrides,
    positive_int,
    run_command,
    split_overrides,
)
from boxrefiner.config import (
    Config,
    fast_variant,
    load_config,
    replace,
    to_yaml,
    with_overrides,
)
from boxrefiner.data.synthetic import ensure_synthetic_data
from boxrefiner.errors import TrainingError
from boxrefiner.features.cache import clear_features, clear_orphaned_features
from boxrefiner.modeling.checkpoint import LAST, CheckpointError
from boxrefiner.utils import distributed
from boxrefiner.utils.device import resolve_device
from boxrefiner.utils.logs import setup_logging
from boxrefiner.utils.signals import Interrupted, StopRequest

log = logging.getLogger("boxrefiner")
SCRIPT = "train_box_refiner_optimized.py"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train a box-refinement head on frozen HQ-SAM image "
                                                            "embeddings.")
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/box_refinement_config.yaml")
    parser.add_argument("--fast", action="store_true", help="sample_ratio 0.1, AMP on, batch size min(2x, 32)")
    parser.add_argument("--debug", action="store_true", help="at most debug.max_samples images per split, debug.epochs epochs")
    parser.add_argument("--clear-cache", nargs="?", const="encoder", choices=["encoder", "all", "orphans"],
                        help="delete this encoder's cached features before the run ('all': every encoder's; "
                             "'orphans': entries no manifest lists and those of encoders this version no longer "
                             "produces)")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                        help="continue from a checkpoint; 'auto' or no value: last.pth in output.checkpoint_dir")
    parser.add_argument("--allow-rollback", action="store_true",
                        help="let --resume go back to an older checkpoint (e.g. best_model.pth), replacing newer work")
    add_device_argument(parser)
    parser.add_argument("--extract-only", action="store_true",
                        help="fill the feature cache for both splits and exit (alone or under torchrun)")
    parser.add_argument("--epochs", type=positive_int, help="override training.epochs")
    parser.add_argument("--batch-size", type=positive_int, help="override training.batch_size")
    add_override_arguments(parser)
    return parser


def apply_flags(cfg: Config, args: argparse.Namespace) -> tuple[Config, list[str]]:
    """Apply --batch-size, --fast, --debug and --epochs, in that order; returns the config and what changed."""
    notes = []
    if args.batch_size:
        cfg = replace(cfg, "training", batch_size=args.batch_size)
        notes.append(f"--batch-size: batch_size={args.batch_size}")
    if args.fast:
        cfg, change = fast_variant(cfg)
        notes.append(f"--fast: {change}")
    if args.debug:
        cfg = replace(cfg, "training", epochs=cfg.debug.epochs)
        notes.append(f"--debug: at most {cfg.debug.max_samples} images per split, {cfg.debug.epochs} epochs")
    if args.epochs:
        cfg = replace(cfg, "training", epochs=args.epochs)
        notes.append(f"--epochs: epochs={args.epochs}")
    return cfg, notes


def resolve_config(args: argparse.Namespace) -> tuple[Config, list[str], list[str]]:
    """The file, then the flags, then the `key=value` overrides: (config, ignored legacy keys, notes).
    The overrides are laid over the file before the flags too, so that what a flag reads
    (`debug.epochs`, `training.batch_size`) is the overridden value, and again after them, so they win."""
    cfg, ignored = load_config(args.config)
    cfg = with_overrides(cfg, args.overrides)
    cfg, notes = apply_flags(cfg, args)
    if args.overrides:
        cfg = with_overrides(cfg, args.overrides)
        notes.append(f"overrides: {' '.join(args.overrides)}")
    return cfg, ignored, notes


def resolve_resume(value: str | None, cfg: Config) -> str | None:
    if value != "auto":
        return value
    last = Path(cfg.output.checkpoint_dir) / LAST
    if not last.is_file():
        raise CheckpointError(f"--resume auto: no {LAST} in output.checkpoint_dir '{cfg.output.checkpoint_dir}'")
    return str(last)


def run(argv: Sequence[str] | None, prog: str) -> int:
    args = parse_with_overrides(build_parser(prog), argv)
    cfg, ignored, notes = resolve_config(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    device = distributed.init(resolve_device(args.device))  # under torchrun: join the world first
    setup_logging(cfg.output.log_dir)
    from boxrefiner.features.encoder import resolved_precision
    cfg = resolved_precision(cfg, device)  # before anything names the encoder (clearing the cache does)
    for key in ignored:
        log.info("config key '%s' is accepted for compatibility with the original tool but not used", key)
    for note in notes:
        log.info(note)
    if distributed.world() > 1:
        log.info("torchrun: %d processes, backend %s; this is rank 0 (device %s); training.batch_size %d is the "
                 "global batch, %d per process", distributed.world(), distributed.backend(), device,
                 cfg.training.batch_size, cfg.training.batch_size // distributed.world())
    resume = resolve_resume(args.resume, cfg)
    if distributed.is_main():
        ensure_synthetic_data(cfg)
        if args.clear_cache == "orphans":
            clear_orphaned_features(cfg)
        elif args.clear_cache:
            clear_features(cfg, every_encoder=args.clear_cache == "all")
    distributed.barrier()  # the other ranks wait for the data and the cleared cache
    # heavy imports after argument errors are reported
    from boxrefiner.training.resume import RollbackRefused
    from boxrefiner.training.trainer import extract_features, train
    with StopRequest() as stop:
        try:
            if args.extract_only:
                extract_features(cfg, device, debug=args.debug, stop=stop)
            else:
                train(cfg, device, resume=resume, debug=args.debug, stop=stop, allow_rollback=args.allow_rollback)
        except RollbackRefused as exc:
            raise CheckpointError(f"{exc} (--allow-rollback)") from None
        except Interrupted as exc:
            if distributed.is_main():
                report_interruption(exc, list(sys.argv[1:] if argv is None else argv), prog)
            return 128 + exc.signum
        finally:
            distributed.close()
    return 0


def report_interruption(exc: Interrupted, argv: list[str], prog: str) -> None:
    name = signal.Signals(exc.signum).name
    if exc.checkpoint is None:
        log.warning("stopped by %s during %s; every feature written so far is complete and kept. Run the same "
                    "command again to continue:\n  %s", name, exc.where, resume_command(argv, None, prog))
    else:
        log.warning("stopped by %s; state saved in %s. Resume with:\n  %s", name, exc.checkpoint,
                    resume_command(argv, exc.checkpoint, prog))


def resume_command(argv: list[str], checkpoint: Path | None, prog: str = SCRIPT) -> str:
    """The same command line, without --resume/--clear-cache, plus --resume CHECKPOINT (if any)."""
    flags, pairs = split_overrides(argv)
    kept, skip_value = [], False
    for arg in flags:
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
    command = ["python", prog] if prog.endswith(".py") else prog.split()
    if distributed.launched():  # the same world again, under torchrun
        processes = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
        nodes = int(os.environ.get("WORLD_SIZE", "1")) // max(1, int(processes))
        launcher = ["torchrun", f"--nproc_per_node={processes}"] + (
            [f"--nnodes={nodes}", "<the job's --node_rank and --rdzv flags, on every node>"] if nodes > 1 else [])
        command = [*launcher, *(command[1:] if prog.endswith(".py") else ["-m", "boxrefiner", *command[1:]])]
    return shlex.join([*command, *kept, *resume, *pairs])


def main(argv: Sequence[str] | None = None, prog: str = SCRIPT) -> int:
    return run_command(lambda: run(argv, prog), fatal=(TrainingError,))


def extract_main(argv: Sequence[str] | None = None, prog: str = "boxrefiner extract") -> int:
    """`boxrefiner extract`: `train --extract-only`, for a cluster step that fills the cache before training."""
    return main(["--extract-only", *(sys.argv[1:] if argv is None else argv)], prog)
