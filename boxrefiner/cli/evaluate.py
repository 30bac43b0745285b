"""`boxrefiner evaluate` (and `evaluate_refiner.py`): measure a trained refiner on a labelled split.

    boxrefiner evaluate --checkpoint checkpoints/demo/best_model.pth [--detections D.json | --refined R.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from boxrefiner.cli.common import non_negative_float, run_command
from boxrefiner.cli.refine import add_refiner_arguments, load_refiner
from boxrefiner.config import DataConfig, replace
from boxrefiner.data.detections import (
    BOX_FORMATS,
    read_detections,
)
from boxrefiner.data.layout import DataError
from boxrefiner.data.splits import SplitData, load_split
from boxrefiner.infer.apply import refine_rows, split_resolver
from boxrefiner.infer.evaluate import (
    Case,
    cases_from_rows,
    format_report,
    jittered_cases,
    score_cases,
)
from boxrefiner.infer.refiner import BoxRefiner
from boxrefiner.plots import plot_gain
from boxrefiner.utils.files import write_json
from boxrefiner.utils.logs import setup_logging

log = logging.getLogger(__name__)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Measure a trained box refiner on a labelled split.")
    add_refiner_arguments(parser)
    parser.add_argument("--split", default=None, help="split to measure (default: the run's data.val_split)")
    parser.add_argument("--data-root", help="FungiTastic root (default: the run's data.data_root; data.format "
                                            "fungitastic only)")
    parser.add_argument("--images", help="data.format coco: the split's image folder (default: the run's)")
    parser.add_argument("--annotations", help="data.format coco: the split's instances JSON (default: the run's)")
    parser.add_argument("--yolo-data", help="data.format yolo: a data.yaml to read the split from (default: the run's)")
    parser.add_argument("--match-iou", type=non_negative_float, default=0.0,
                        help="score a detection only if it overlaps an object by at least this IoU (default 0: any "
                             "overlap); a detection is scored against the object it overlaps most")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--detections", help="detector boxes to refine and score (JSON list, file_name + bbox)")
    source.add_argument("--refined", help="refine_boxes.py output to score as is (bbox_input vs bbox)")
    parser.add_argument("--box-format", choices=BOX_FORMATS, default="xyxy", help="bbox layout of those files")
    parser.add_argument("--mask-iou", action=argparse.BooleanOptionalAction, default=None,
                        help="prompt HQ-SAM with both boxes and compare masks with the truth (default: on with a "
                             "real HQ-SAM checkpoint that can be found, off with random weights)")
    parser.add_argument("--output", help="also write the report as JSON here")
    parser.add_argument("--plots", type=Path, metavar="DIR",
                        help="where the IoU-gain histogram and the before/after scatter go (default: beside --output, "
                             "else beside the checkpoint)")
    parser.add_argument("--no-plots", action="store_true", help="write no pictures")
    return parser


def _other_dataset(data: DataConfig, split: str, args: argparse.Namespace) -> DataConfig:
    """The run's data config with the split read from the files given on the command line."""
    changes: dict[str, Any] = {}
    for flag, key, layout in (("images", f"{split}_images", "coco"), ("annotations", f"{split}_annotations", "coco"),
                              ("yolo_data", "yolo_data", "yolo")):
        if getattr(args, flag):
            if data.format != layout:
                raise DataError(f"--{flag.replace('_', '-')} is for data.format {layout}; this run reads data.format "
                                f"{data.format}")
            changes[key] = getattr(args, flag)
    return dataclasses.replace(data, **changes) if changes else data


def wants_mask_iou(args: argparse.Namespace, refiner: BoxRefiner) -> bool:
    """--mask-iou as given, else on only with a real HQ-SAM checkpoint that can be found (random
    weights make masks that mean nothing)."""
    if args.mask_iou is not None:
        return bool(args.mask_iou)
    random_weights = refiner.identity.weights.startswith("random-init")
    found = refiner.hqsam_checkpoint is not None and Path(refiner.hqsam_checkpoint).is_file()
    if random_weights:
        log.info("mask IoU skipped: HQ-SAM's weights are random here, so its masks mean nothing (--mask-iou forces it)")
    elif not found:
        log.warning("mask IoU skipped: the HQ-SAM checkpoint '%s' is not there (pass --hqsam-checkpoint)",
                    refiner.hqsam_checkpoint)
    return not random_weights and found


def labelled_split(args: argparse.Namespace, refiner: BoxRefiner) -> SplitData:
    """The split to measure: the run's, or the one the command line points at."""
    data = refiner.cfg.data  # another root has its own masks files, not the run's data.masks_file
    if args.data_root:
        if data.format != "fungitastic":
            raise DataError(f"--data-root is for data.format fungitastic; this run reads data.format {data.format}")
        data = replace(refiner.cfg, "data", data_root=args.data_root, masks_file=None).data
    split_name = args.split or data.val_split
    split = load_split(_other_dataset(data, split_name, args), split_name)
    log.info("split '%s': %d labelled objects on %d images%s", split_name, len(split.objects), len(split.images),
             "".join(f", {n} {r}" for r, n in sorted(split.skipped.items())))
    return split


def input_cases(args: argparse.Namespace, refiner: BoxRefiner, split: SplitData) -> tuple[list[Case], Counter, str]:
    """The boxes to score: detections (refined here), a refine output as is, or the jittered truth;
    returns them with the rows skipped and a line naming the source."""
    if args.detections or args.refined:
        rows = read_detections(args.detections or args.refined)
        if args.detections:
            rows = refine_rows(refiner, rows, split_resolver(split), args.box_format).rows
        cases, skipped = cases_from_rows(rows, split, args.box_format, refined=True, match_iou=args.match_iou)
        return cases, skipped, f"{'refine_boxes.py output' if args.refined else 'detections'} {args.detections or args.refined}"
    noise = refiner.cfg.evaluation.own_noise(refiner.cfg.data)
    return jittered_cases(refiner, split), Counter(), (
        f"ground truth jittered (center_std {noise.center_std}, scale_std {noise.scale_std}, seed "
        f"{refiner.cfg.evaluation.noise_seed}; and the levels {', '.join(refiner.cfg.evaluation.levels) or 'none'})")


def run(argv: Sequence[str] | None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging()
    refiner = load_refiner(args)
    mask_iou = wants_mask_iou(args, refiner)
    if mask_iou:
        refiner.enable_masks()
    split = labelled_split(args, refiner)
    cases, skipped, source = input_cases(args, refiner, split)
    tally = score_cases(refiner, split, cases, with_masks=mask_iou)
    report = tally.report(split, cases, ap=bool(args.detections or args.refined))
    report["skipped"] = dict(Counter(report["skipped"]) + skipped)
    random_weights = refiner.identity.weights.startswith("random-init")
    report.update(inputs=source, checkpoint=str(args.checkpoint), gate=(
                  f"on (keep_margin {refiner.keep_margin:g})" if refiner.gate else "off"),
                  mask_decoder=("not used" if not mask_iou else "random weights" if random_weights else "HQ-SAM checkpoint"))
    print(format_report(report))
    if args.output:
        write_json(args.output, report)
        log.info("report written to %s", args.output)
    if not args.no_plots:
        folder = args.plots or (Path(args.output) if args.output else Path(args.checkpoint)).parent
        try:
            paths = plot_gain(tally.per_box(), folder, f"evaluate_{split.split}")
            log.info("IoU gain per box: %s", ", ".join(str(p) for p in paths))
        except OSError as exc:  # the report above stands
            log.warning("the IoU-gain plots were not written: %s%s", exc.strerror or exc,
                        f": {exc.filename}" if exc.filename else "")
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_command(lambda: run(argv, prog))
