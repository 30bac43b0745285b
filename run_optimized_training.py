#!/usr/bin/env python
"""Example: train on the embedded default twice — first with the cache filling (or already warm), then
again with --fast on the warm cache — and compare wall time, cache use and validation IoU.

    python run_optimized_training.py                          # configs/demo.yaml, data generated if missing
    python run_optimized_training.py --config my_config.yaml  # your own data and checkpoint
    python run_optimized_training.py --clear-cache            # make the first run really cold
"""

import sys
from pathlib import Path

from boxrefiner.cli.compare import main

if __name__ == "__main__":
    sys.exit(main(prog="run_optimized_training.py", demo=Path(__file__).resolve().parent / "configs" / "demo.yaml"))
