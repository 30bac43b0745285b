#!/usr/bin/env python
"""Measure every speed-up side by side and check the targets (not a unit test: a benchmark); the same as
`boxrefiner bench suite`.

    python test_optimization_performance.py --quick        # embedded demo data at 512 input, ~3 min on 2 cores
    python test_optimization_performance.py                # the full measurement on configs/demo.yaml
    python test_optimization_performance.py --config configs/box_refinement_config.yaml

Writes benchmark_results.json, benchmark_results.md (the table) and benchmark_results.png (chart).
"""

import sys
from pathlib import Path

from boxrefiner.cli.bench import run_command, run_suite

if __name__ == "__main__":
    demo = Path(__file__).resolve().parent / "configs" / "demo.yaml"
    sys.exit(run_command(lambda: run_suite(None, "test_optimization_performance.py", demo)))
