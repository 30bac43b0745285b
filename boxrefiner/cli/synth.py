"""`boxrefiner synth`: write a deterministic synthetic dataset in FungiTastic's layout, or in COCO + YOLO
with a biased detector's boxes.

    boxrefiner synth --out data/synthetic_fungitastic --train 96 --val 32 --seed 0
    boxrefiner synth --out data/synthetic_multi --layout coco-yolo --train 192 --val 48
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from boxrefiner.data.synthetic import (
    generate,
    generate_multi_object,
    simulated_detections,
)
from boxrefiner.utils.files import write_json


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Write a synthetic dataset: FungiTastic-Mini's layout (one mushroom "
                                                 "per image), or COCO + YOLO (several per image, 3 categories).")
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--layout", choices=("fungitastic", "coco-yolo"), default="fungitastic",
                        help="fungitastic: metadata/, FungiTastic-Mini/, masks/; coco-yolo: images/, annotations/, "
                             "labels/, data.yaml and a biased detector's detections/")
    parser.add_argument("--train", type=int, help="number of training images (default 96; coco-yolo 192)")
    parser.add_argument("--val", type=int, help="number of validation images (default 32; coco-yolo 48)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[300],
                        help="image folders to write, e.g. 300 500 (coco-yolo: the first is the longest side)")
    parser.add_argument("--max-objects", type=int, default=3, help="coco-yolo: at most this many mushrooms per image")
    parser.add_argument("--detections", type=Path,
                        help="fungitastic: also write simulated detections (noisy xyxy boxes) of the val images to "
                             "this JSON (coco-yolo always writes detections/{train,val}.json)")
    parser.add_argument("--center-std", type=float, default=0.15, help="detection noise: centre shift / box size")
    parser.add_argument("--scale-std", type=float, default=0.2, help="detection noise: std of log width/height")
    parser.add_argument("--boxes-per-image", type=int, default=1, help="independent simulated detections per object")
    args = parser.parse_args(argv)
    multi = args.layout == "coco-yolo"
    train = args.train if args.train is not None else (192 if multi else 96)
    val = args.val if args.val is not None else (48 if multi else 32)
    if train < 1 or val < 1 or args.boxes_per_image < 1 or args.max_objects < 1:
        parser.error("--train, --val, --boxes-per-image and --max-objects must be at least 1")
    if multi:
        if args.detections:
            parser.error("--detections is for --layout fungitastic: coco-yolo writes detections/{train,val}.json")
        return _main_multi(Path(args.out), train, val, args.seed, args.sizes[0], args.max_objects)
    root = generate(args.out, train, val, args.seed, tuple(args.sizes))
    print(f"wrote {train} train and {val} val images to {root}")
    if args.detections:
        rows = simulated_detections(root, "val", args.center_std, args.scale_std, args.seed, args.boxes_per_image)
        write_json(args.detections, rows)
        print(f"wrote {len(rows)} simulated detections to {args.detections}")
    return 0


def _main_multi(out: Path, train: int, val: int, seed: int, size: int, max_objects: int) -> int:
    """The coco-yolo CLI: generate, then say what was written and how to point a config at it."""
    import json

    root = generate_multi_object(out, train, val, seed, size, max_objects)
    for split, count in (("train", train), ("val", val)):
        objects = len(json.loads((root / "annotations" / f"instances_{split}.json").read_text())["annotations"])
        detections = len(json.loads((root / "detections" / f"{split}.json").read_text()))
        print(f"wrote {count} {split} images with {objects} objects to {root / 'images' / split}, "
              f"{root / 'annotations' / f'instances_{split}.json'}, {root / 'labels' / split}; "
              f"{detections} biased detections to {root / 'detections' / f'{split}.json'}")
    print(f"YOLO: data.format yolo, data.yolo_data {root / 'data.yaml'}; COCO: data.format coco, "
          f"data.train_images {root / 'images' / 'train'}, data.train_annotations "
          f"{root / 'annotations' / 'instances_train.json'} (and val)")
    return 0
