#!/usr/bin/env python
"""Refine detector boxes with a trained refiner (optionally prompting HQ-SAM with them):
python refine_boxes.py --checkpoint checkpoints/demo/best_model.pth --images DIR --detections in.json --output out.json"""

import sys

from boxrefiner.cli.refine import main

if __name__ == "__main__":
    sys.exit(main(prog="refine_boxes.py"))
