"""Command line of `refine_boxes.py`: detector boxes in, refined boxes (and HQ-SAM masks) out.

    python refine_boxes.py --checkpoint checkpoints/best_model.pth (--images DIR | --split val) \\
        --detections in.json --output out.json [--box-format xywh] [--masks masks/]

The output is the input list, in order, every field kept: refined rows get the refined `bbox` (in
the input's format), `bbox_input` (the original), `refine_steps` (iterations that moved the returned box;
0 when the refiner kept the input) and `iou_pred` (its predicted IoU); with `--masks`, also `mask` (the
PNG written) and `mask_score` (HQ-SAM's predicted IoU). Object rows that could not be refined keep
their `bbox` and get `refine_error` (missing_image, unreadable_image, a malformed bbox, ...); rows
that are not objects are kept as they are.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import DataConfig
from .console import (
    non_negative_float,
    non_negative_int,
    positive_int,
    run_command,
    setup_logging,
)
from .data import ImageNames, SplitData, read_layout
from .detections import (
    BOX_FORMATS,
    Detection,
    DetectionsError,
    from_xyxy,
    parse_detections,
    read_detections,
)
from .fileio import atomic_write, write_json
from .progress import progress
from .refiner import STORE_SPLIT, BoxRefiner

log = logging.getLogger("boxrefiner")
_LOGGED_PROBLEMS = 20
_OUTPUT_FIELDS = ("bbox_input", "refine_steps", "iou_pred", "mask", "mask_score", "refine_error")  # written here
_IMAGE_ERRORS = ("missing_image", "unreadable_image", "nonfinite_features")
_BOX_ERRORS = ("outside_image", "bad_box")


@dataclass
class RefineReport:
    rows: list[Any]  # the output list
    refined: int = 0
    images: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (row, reason)


ImagePaths = Callable[[str], Path]  # a detection's file_name -> its image file


def folder_resolver(folder: Path) -> ImagePaths:
    return lambda name: folder / name


def split_resolver(split: SplitData) -> ImagePaths:
    """A labelled split's images by file name, or by bare file name where unambiguous (any layout);
    a name not in the split has no file."""
    return _resolver([image.image_path for image in split.images], split.image_named, split.split)


def layout_resolver(data: DataConfig, split: str) -> ImagePaths:
    """Every image a split of the run's dataset lists, with objects or without (negatives count too),
    read from its listing only: no annotation is decoded."""
    listed = read_layout(data, split).images
    log.info("split '%s' of the run's %s dataset: %d images", split, data.format, len(listed))
    return _resolver([r.path for r in listed], ImageNames([r.file_name for r in listed]).find, split)


def _resolver(paths: list[Path], find: Callable[[str], int | None], split: str) -> ImagePaths:
    def resolve(name: str) -> Path:
        image = find(name)
        return paths[image] if image is not None else Path(split) / "not-in-split" / name
    return resolve


def refine_rows(refiner: BoxRefiner, rows: list[Any], images: Path | ImagePaths, box_format: str = "xyxy",
                masks: Path | None = None) -> RefineReport:
    """Refine every valid detection, image by image (`images`: their folder, or file name -> path); the
    rows of an image that cannot be used are reported."""
    resolve = folder_resolver(images) if isinstance(images, Path) else images
    detections, problems = parse_detections(rows, box_format)
    by_image: dict[str, list[Detection]] = {}
    for detection in detections:
        by_image.setdefault(detection.file_name, []).append(detection)
    names = list(by_image)
    if masks is not None:
        refiner.enable_masks()
    # a file written by an earlier run may come back as input: its results must not survive a failure now
    report = RefineReport([{k: v for k, v in r.items() if k not in _OUTPUT_FIELDS} if isinstance(r, dict) else r
                           for r in rows], problems=problems)
    with progress(total=len(names), desc="Refining", unit="img") as bar:
        for item in refiner.image_features([resolve(name) for name in names], for_masks=masks is not None):
            bar.update(1)
            group = by_image[names[item.index]]
            if item.error:
                report.problems += [(d.row, item.error) for d in group]
                continue
            boxes = np.array([d.box for d in group])
            inside = (boxes[:, 0] < item.width) & (boxes[:, 1] < item.height) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
            report.problems += [(d.row, f"outside_image: bbox lies outside the {item.width}x{item.height} image")
                                for d, ok in zip(group, inside) if not ok]
            fits = refiner.boxes_fit(boxes, item.width, item.height)
            report.problems += [(d.row, f"bad_box: bbox {json.dumps(rows[d.row]['bbox'])[:60]} is too large to refine")
                                for d, ok, inner in zip(group, fits, inside) if inner and not ok]
            inside &= fits
            group = [d for d, ok in zip(group, inside) if ok]
            if not group:
                continue
            result = refiner.refine_features(item.embedding, item.width, item.height, boxes[inside])
            if masks is not None:
                predicted, scores = refiner.prompter.masks(*item.sam_features, item.width, item.height, result.boxes)
            for k, detection in enumerate(group):
                row = report.rows[detection.row]
                row["bbox_input"] = rows[detection.row]["bbox"]
                row["bbox"] = from_xyxy(result.boxes[k], box_format)
                row["refine_steps"] = int(result.applied_steps[k])
                if result.iou_pred is not None:
                    row["iou_pred"] = round(float(result.iou_pred[k]), 4)
                if masks is not None:
                    path = masks / f"{detection.row:06d}_{Path(detection.file_name).stem}.png"
                    picture = Image.fromarray(predicted[k].astype(np.uint8) * 255)
                    atomic_write(path, lambda f, p=picture: p.save(f, "PNG"))
                    row["mask"], row["mask_score"] = str(path), round(float(scores[k]), 4)
            report.refined += len(group)
            report.images += 1
    report.problems.sort()
    for index, reason in report.problems:
        if isinstance(report.rows[index], dict):
            report.rows[index]["refine_error"] = reason
    return report


def add_refiner_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a refiner."""
    parser.add_argument("--checkpoint", required=True, help="refiner checkpoint (best_model.pth or last.pth)")
    parser.add_argument("--hqsam-checkpoint", help="HQ-SAM checkpoint (default: the training run's hqsam.checkpoint)")
    parser.add_argument("--cache-dir", help="feature cache to read (default: the training run's)")
    parser.add_argument("--batch-size", type=positive_int, help="images per encoder batch (default: the run's hqsam.batch_size)")
    parser.add_argument("--num-workers", type=non_negative_int, default=2, help="image-decoding workers")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-gate", action="store_true",
                        help="return every box's last iteration, even where the refiner predicts the input is better")
    parser.add_argument("--keep-margin", type=non_negative_float,
                        help="predicted IoU gain a refined box needs to replace the input (default: the run's "
                             "refinement.keep_margin)")


def load_refiner(args: argparse.Namespace, **options: Any) -> BoxRefiner:
    return BoxRefiner.from_checkpoint(args.checkpoint, device=args.device, hqsam_checkpoint=args.hqsam_checkpoint,
                                      cache_dir=args.cache_dir, batch_size=args.batch_size,
                                      num_workers=args.num_workers, gate=False if args.no_gate else None,
                                      keep_margin=args.keep_margin, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Refine detector boxes with a trained box refiner (and prompt HQ-SAM).")
    add_refiner_arguments(parser)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--images", type=Path, help="folder the detections' file_name values are in")
    where.add_argument("--split", help="or a split of the run's dataset (any data.format): file_name as its "
                                       "annotations name the images")
    parser.add_argument("--detections", required=True, help="JSON list of {file_name, bbox, [score], ...}")
    parser.add_argument("--output", required=True, help="JSON to write: the same list with refined bbox + bbox_input")
    parser.add_argument("--box-format", choices=BOX_FORMATS, default="xyxy", help="bbox layout, in and out")
    parser.add_argument("--masks", type=Path, help="also prompt HQ-SAM with each refined box; write PNG masks here")
    parser.add_argument("--no-cache", action="store_true", help="always run the encoder")
    parser.add_argument("--store-features", action="store_true",
                        help=f"keep features computed here in the cache (folder '{STORE_SPLIT}')")
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    rows = read_detections(args.detections)
    if args.images is not None and not args.images.is_dir():
        raise DetectionsError(f"--images '{args.images}' is not a folder")
    refiner = load_refiner(args, read_cache=not args.no_cache, store_features=args.store_features)
    images: Path | ImagePaths = args.images
    if args.split is not None:
        images = layout_resolver(refiner.cfg.data, args.split)
    report = refine_rows(refiner, rows, images, args.box_format, args.masks)
    write_json(args.output, report.rows)
    reasons = Counter(reason.split(":")[0] if reason.split(":")[0] in (*_IMAGE_ERRORS, *_BOX_ERRORS) else "bad_row"
                      for _, reason in report.problems)
    summary = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "none"
    for index, reason in report.problems[:_LOGGED_PROBLEMS]:
        log.warning("row %d: %s", index, reason)
    if len(report.problems) > _LOGGED_PROBLEMS:
        log.warning("... and %d more rows not refined (each has 'refine_error' in %s)",
                    len(report.problems) - _LOGGED_PROBLEMS, args.output)
    log.info("refined %d of %d detections on %d images (features: %d from the cache, %d encoded); not refined: %s; "
             "wrote %s%s", report.refined, len(rows), report.images, refiner.cache_hits, refiner.encoded, summary,
             args.output, f" and {report.refined} masks in {args.masks}" if args.masks else "")
    if rows and not report.refined:
        hint = ("; is --images (or --split) right?" if reasons["missing_image"] else
                "; is --box-format right?" if reasons["bad_row"] else "")
        raise DetectionsError(f"none of the {len(rows)} detections could be refined ({summary}){hint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)
