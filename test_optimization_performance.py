#!/usr/bin/env python
"""Measure every speed-up side by side and check the targets (not a unit test: a benchmark).

    python test_optimization_performance.py --quick        # embedded demo data at 512 input, ~3 min on 2 cores
    python test_optimization_performance.py                # the full measurement on configs/demo.yaml
    python test_optimization_performance.py --config configs/box_refinement_config.yaml

Writes benchmark_results.json, benchmark_results.md (the table) and benchmark_results.png (chart).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from boxrefiner.config import ConfigError, load_config, replace

DEMO = Path(__file__).resolve().parent / "configs" / "demo.yaml"
QUICK_DATA = {"train_images": 64, "val_images": 16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Measure the cache, sampling and AMP speed-ups side by side.")
    parser.add_argument("--config", type=Path, default=None, help="base config (default: configs/demo.yaml)")
    parser.add_argument("--quick", action="store_true",
                        help="small run: with the demo, 64/16 synthetic images at 512 input; else at most "
                             "debug.max_samples images per split; 2 epochs")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per variant (default 3, quick 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the JSON, table and chart")
    return parser


def base_config(args: argparse.Namespace):
    from boxrefiner.config import SyntheticDataConfig
    cfg, _ = load_config(args.config or DEMO)
    epochs = args.epochs or (2 if args.quick else 3)
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    cfg = replace(cfg, "training", epochs=epochs)
    if args.quick and args.config is None:  # the embedded default, shrunk
        cfg = replace(cfg, "data", data_root=str(Path(cfg.data.data_root).parent / "synthetic_quick"),
                      synthetic=SyntheticDataConfig(**QUICK_DATA, seed=0))
        cfg = replace(cfg, "hqsam", input_size=512)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from boxrefiner.cli import ensure_synthetic_data
    from boxrefiner.console import resolve_device, run_command, setup_logging

    def run(_) -> int:
        cfg = base_config(args)
        device = resolve_device(args.device)
        setup_logging()
        ensure_synthetic_data(cfg)
        from boxrefiner.perfsuite import markdown_table, run_suite, write_outputs
        with tempfile.TemporaryDirectory(prefix="boxrefiner-perf-") as work:
            result = run_suite(cfg, device, Path(work), debug=args.quick and args.config is not None)
        paths = write_outputs(result, args.out)
        print(markdown_table(result))
        print(f"\nwrote {paths['json']}, {paths['table']}, {paths['chart']}")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
