#!/usr/bin/env python
"""Measure a trained refiner on a labelled split (box IoU before/after, HQ-SAM mask IoU):
python evaluate_refiner.py --checkpoint checkpoints/demo/best_model.pth"""

import sys

from boxrefiner.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main(prog="evaluate_refiner.py"))
