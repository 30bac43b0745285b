#!/usr/bin/env python
"""Train the HQ-SAM box refiner: python train_box_refiner_optimized.py --config configs/demo.yaml"""

import sys

from boxrefiner.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="train_box_refiner_optimized.py"))
