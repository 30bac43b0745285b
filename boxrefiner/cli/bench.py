"""`boxrefiner bench epoch` (where one training epoch's time goes, on one config) and `boxrefiner bench
suite` (and `test_optimization_performance.py`: every speed-up side by side, with chart). Benchmarks,
not unit tests: each writes what it measured."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from boxrefiner.cli.common import (
    add_device_argument,
    positive_int,
    run_command,
)
from boxrefiner.config import (
    Config,
    ConfigError,
    SyntheticDataConfig,
    load_config,
    replace,
)
from boxrefiner.utils.device import resolve_device
from boxrefiner.utils.files import write_json
from boxrefiner.utils.logs import setup_logging

DEMO = Path("configs/demo.yaml")
QUICK_DATA = {"train_images": 64, "val_images": 16}


def epoch_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Measure where a training epoch's time goes.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--epochs", type=positive_int, default=3,
                        help="epochs timed with the cache warm and head-only (--streamed: rounds of one epoch each)")
    parser.add_argument("--cache-off-epochs", type=positive_int, default=1,
                        help="epochs timed with the encoder in the loop")
    parser.add_argument("--streamed", action="store_true",
                        help="instead: warm epochs in memory and streamed from disk (float16 and float32 "
                             "storage) against head-only compute")
    add_device_argument(parser)
    parser.add_argument("--json", help="also write the numbers to this file")
    return parser


def run_epoch(argv: Sequence[str] | None, prog: str | None) -> int:
    from boxrefiner.bench.epoch import measure, measure_streamed
    from boxrefiner.bench.extract import storage_deviation
    from boxrefiner.features.encoder import resolved_precision
    args = epoch_parser(prog).parse_args(argv)
    setup_logging()
    cfg, _ = load_config(args.config)
    device = resolve_device(args.device)
    cfg = resolved_precision(cfg, device)
    if args.streamed:
        result = measure_streamed(cfg, device, args.epochs)
    else:
        result = measure(cfg, device, args.epochs, args.cache_off_epochs)
        result["storage_deviation"] = storage_deviation(cfg)
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    if args.streamed:
        print(f"in memory: {result['in_memory_over_head_only']:.2f}x head-only; streamed float32 storage: "
              f"{result['streamed_float32_over_head_only']:.2f}x head-only")
        print(f"streamed epoch (float16 storage): {result['streamed_float16_epoch_seconds']:.2f} s, "
              f"{result['streamed_float16_over_head_only']:.2f}x head-only")
    return 0


def startup_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Time a warm training start-up on N synthetic images.")
    parser.add_argument("--images", type=positive_int, default=10_000, help="images in all (a fifth of them val)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the synthetic data and cache (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="also write the numbers to this file")
    return parser


def run_startup(argv: Sequence[str] | None, prog: str | None) -> int:
    from boxrefiner.bench.startup import measure
    args = startup_parser(prog).parse_args(argv)
    setup_logging()
    with tempfile.TemporaryDirectory(prefix="boxrefiner-startup-", dir=args.work) as work:
        result = measure(Path(work), args.images)
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    print(f"startup {result['images']} images: {result['warm_start_seconds']:.1f} s")
    return 0


def extract_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from boxrefiner.bench.extract import MODES
    parser = argparse.ArgumentParser(prog=prog, description="Extraction speed of each encoder mode (bare encoder and "
                                                            "the whole pipeline), its feature deviation from fp32 "
                                                            "and, with --train-epochs, the refiner trained on it.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--images", type=positive_int, default=8, help="training images timed per mode and round")
    parser.add_argument("--rounds", type=positive_int, default=2, help="rounds; the modes take turns in each")
    parser.add_argument("--train-epochs", type=int, default=0,
                        help="also train a refiner this many epochs on each mode's features (extracts the whole "
                             "dataset once per mode: slow)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=None, help="default: all")
    add_device_argument(parser)
    parser.add_argument("--json", help="also write the numbers to this file")
    return parser


def run_extract(argv: Sequence[str] | None, prog: str | None) -> int:
    from boxrefiner.bench.extract import markdown_table, measure, targets
    from boxrefiner.data.synthetic import ensure_synthetic_data
    from boxrefiner.features.encoder import resolved_precision
    args = extract_parser(prog).parse_args(argv)
    setup_logging()
    cfg, _ = load_config(args.config)
    device = resolve_device(args.device)
    cfg = resolved_precision(cfg, device)  # the modes set their own; the rest of the config as a run sees it
    ensure_synthetic_data(cfg)
    result = measure(cfg, device, args.images, args.rounds, args.train_epochs, args.modes)
    print(markdown_table(result))
    result["targets"] = targets(result, device.type)
    for key, t in result["targets"].items():
        print(f"target {key} {t['target']}: {t['status']} ({t['value']:.3g})")
    if args.json:
        write_json(args.json, result)
    return 0


def suite_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Measure the cache, sampling and AMP speed-ups side by "
                                                            "side and check the targets.")
    parser.add_argument("--config", type=Path, default=None, help="base config (default: configs/demo.yaml)")
    parser.add_argument("--quick", action="store_true",
                        help="small run: with the demo, 64/16 synthetic images at 512 input; else at most "
                             "debug.max_samples images per split; 2 epochs")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per variant (default 3, quick 2)")
    add_device_argument(parser)
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the JSON, table and chart")
    return parser


def suite_config(args: argparse.Namespace, demo: Path = DEMO) -> Config:
    cfg, _ = load_config(args.config or demo)
    epochs = args.epochs or (2 if args.quick else 3)
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    cfg = replace(cfg, "training", epochs=epochs)
    if args.quick and args.config is None:  # the embedded default, shrunk
        cfg = replace(cfg, "data", data_root=str(Path(cfg.data.data_root).parent / "synthetic_quick"),
                      synthetic=SyntheticDataConfig(**QUICK_DATA, seed=0))
        cfg = replace(cfg, "hqsam", input_size=512)
    return cfg


def run_suite(argv: Sequence[str] | None, prog: str | None, demo: Path = DEMO) -> int:
    args = suite_parser(prog).parse_args(argv)
    cfg = suite_config(args, demo)
    device = resolve_device(args.device)
    setup_logging()
    from boxrefiner.features.encoder import resolved_precision
    cfg = resolved_precision(cfg, device)
    from boxrefiner.bench.suite import markdown_table, write_outputs
    from boxrefiner.bench.suite import run_suite as measure_suite
    from boxrefiner.data.synthetic import ensure_synthetic_data
    ensure_synthetic_data(cfg)
    with tempfile.TemporaryDirectory(prefix="boxrefiner-perf-") as work:
        result = measure_suite(cfg, device, Path(work), debug=args.quick and args.config is not None)
    paths = write_outputs(result, args.out)
    print(markdown_table(result))
    print(f"\nwrote {paths['json']}, {paths['table']}, {paths['chart']}")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "boxrefiner bench") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    jobs = {"epoch": run_epoch, "suite": run_suite, "startup": run_startup, "extract": run_extract}
    if not args or args[0] not in jobs:
        print(f"usage: {prog} {{epoch,suite,startup,extract}} [options]\n  epoch    where one training epoch's time "
              "goes (cache off / warm / head alone)\n  suite    every speed-up side by side, with table and chart\n"
              "  startup  a warm training start-up on N synthetic images\n"
              "  extract  extraction speed and feature deviation of each encoder mode",
              file=sys.stderr if args[:1] not in (["-h"], ["--help"]) else sys.stdout)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    job = jobs[args[0]]
    return run_command(lambda: job(args[1:], f"{prog} {args[0]}"))
