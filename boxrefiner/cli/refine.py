"""`boxrefiner refine` (and `refine_boxes.py`): detector boxes in, refined boxes (and HQ-SAM masks) out.

    boxrefiner refine --checkpoint checkpoints/demo/best_model.pth (--images DIR | --split val) \\
        --detections in.json --output out.json [--box-format xywh] [--masks masks/] \\
        [--output-format json|coco|yolo [--coco-annotations instances.json]] [--visualize pictures/]
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from boxrefiner.cli.common import (
    add_device_argument,
    non_negative_float,
    non_negative_int,
    positive_int,
    run_command,
)
from boxrefiner.data.detections import (
    BOX_FORMATS,
    DetectionsError,
    read_detections,
)
from boxrefiner.infer.apply import (
    ImagePaths,
    RefineReport,
    folder_resolver,
    layout_resolver,
    refine_rows,
)
from boxrefiner.infer.export import (
    OUTPUT_FORMATS,
    annotation_image_ids,
    check_folder,
    claim_folder,
    coco_results,
    index_image_ids,
    output_paths,
    write_yolo,
    yolo_labels,
)
from boxrefiner.infer.pictures import write_pictures
from boxrefiner.infer.refiner import STORE_SPLIT, BoxRefiner
from boxrefiner.utils import distributed
from boxrefiner.utils.device import resolve_device
from boxrefiner.utils.files import write_json
from boxrefiner.utils.logs import setup_logging

log = logging.getLogger("boxrefiner")
LOGGED_PROBLEMS = 20  # rows not refined that are logged one by one


def add_refiner_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a refiner."""
    parser.add_argument("--checkpoint", required=True, help="refiner checkpoint (best_model.pth or last.pth)")
    parser.add_argument("--hqsam-checkpoint", help="HQ-SAM checkpoint (default: the training run's hqsam.checkpoint)")
    parser.add_argument("--cache-dir", help="feature cache to read (default: the training run's)")
    parser.add_argument("--batch-size", type=positive_int, help="images per encoder batch (default: the run's hqsam.batch_size)")
    parser.add_argument("--num-workers", type=non_negative_int, default=2, help="image-decoding workers")
    add_device_argument(parser)
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


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Refine detector boxes with a trained box refiner (and prompt HQ-SAM).")
    add_refiner_arguments(parser)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--images", type=Path, help="folder the detections' file_name values are in")
    where.add_argument("--split", help="or a split of the run's dataset (any data.format): file_name as its "
                                       "annotations name the images")
    parser.add_argument("--detections", required=True, help="JSON list of {file_name, bbox, [score], ...}")
    parser.add_argument("--output", required=True, help="where to write: a JSON file (json: the same list with refined "
                                                        "bbox + bbox_input; coco: a COCO results list), or a folder "
                                                        "(yolo: one txt per image)")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="json",
                        help="json: the tool's own (default); coco: results list (image_id, category_id, bbox xywh, "
                             "score); yolo: 'class cx cy w h score' normalised, one txt per image")
    parser.add_argument("--coco-annotations", type=Path,
                        help="coco: take image_id from this annotations file's images (default: the 1-based index "
                             "of the file name among the detections' sorted file names)")
    parser.add_argument("--visualize", type=Path, metavar="DIR",
                        help="also write one picture per image here: input (dashed) and refined boxes, masks with --masks")
    parser.add_argument("--box-format", choices=BOX_FORMATS, default="xyxy", help="bbox layout, in and out")
    parser.add_argument("--masks", type=Path, help="also prompt HQ-SAM with each refined box; write PNG masks here")
    parser.add_argument("--no-cache", action="store_true", help="always run the encoder")
    parser.add_argument("--store-features", action="store_true",
                        help=f"keep features computed here in the cache (folder '{STORE_SPLIT}')")
    return parser


def run(argv: Sequence[str] | None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    args.device = str(distributed.init(resolve_device(args.device)))  # under torchrun: this rank's device
    setup_logging()
    rows = read_detections(args.detections)
    check_outputs(args, rows)
    if args.images is not None and not args.images.is_dir():
        raise DetectionsError(f"--images '{args.images}' is not a folder")
    image_id = annotation_image_ids(args.coco_annotations) if args.coco_annotations else index_image_ids(rows)
    refiner = load_refiner(args, read_cache=not args.no_cache, store_features=args.store_features)
    images: ImagePaths = (layout_resolver(refiner.cfg.data, args.split) if args.split is not None
                          else folder_resolver(args.images))
    try:
        report = refine_rows(refiner, rows, images, args.box_format, args.masks)
        hits, encoded = (int(v) for v in distributed.sum_all([refiner.cache_hits, refiner.encoded]))
        main = distributed.is_main()
    finally:
        distributed.close()
    if not main:  # rank 0 writes the one output, rows in the input's order, then the pictures
        return 0
    write_output(args, report, image_id)
    if args.visualize:
        written, failed = write_pictures(report.rows, images, args.box_format, args.visualize)
        log.info("wrote %d pictures in %s%s", written, args.visualize, f" ({failed} could not be drawn)" if failed else "")
    reasons = report.reasons()
    summary = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "none"
    for index, reason in report.problems[:LOGGED_PROBLEMS]:
        log.warning("row %d: %s", index, reason)
    if len(report.problems) > LOGGED_PROBLEMS:
        log.warning("... and %d more rows not refined (each has 'refine_error' in %s)",
                    len(report.problems) - LOGGED_PROBLEMS, args.output)
    log.info("refined %d of %d detections on %d images (features: %d from the cache, %d encoded); not refined: %s; "
             "wrote %s%s", report.refined, len(rows), report.images, hits, encoded, summary,
             args.output, f" and {report.refined} masks in {args.masks}" if args.masks else "")
    if rows and not report.refined:
        hint = ("; is --images (or --split) right?" if reasons["missing_image"] else
                "; is --box-format right?" if reasons["bad_row"] else "")
        raise DetectionsError(f"none of the {len(rows)} detections could be refined ({summary}){hint}")
    return 0


def check_outputs(args: argparse.Namespace, rows: list) -> None:
    """Refuse, before any slow work, outputs that do not fit the format, folders of files this tool did
    not write, and images whose label files or pictures would be one file."""
    output = Path(args.output)
    if args.output_format == "yolo" and output.exists() and not output.is_dir():
        raise DetectionsError(f"--output '{output}' is a file; --output-format yolo writes a folder of txt files")
    if args.output_format != "yolo" and output.is_dir():
        raise DetectionsError(f"--output '{output}' is a folder; --output-format {args.output_format} writes a JSON file")
    names = [r["file_name"] for r in rows if isinstance(r, dict) and isinstance(r.get("file_name"), str)]
    for folder, suffix, what in ((output, ".txt", "--output-format yolo labels"),
                                 (args.visualize, ".jpg", "--visualize pictures")):
        if folder is not None and (suffix == ".jpg" or args.output_format == "yolo"):
            check_folder(folder, what)
            output_paths(names, folder, suffix)
            claim_folder(folder)  # now, so that masks written into it meanwhile do not make it look foreign
    if args.coco_annotations is not None:
        if args.output_format != "coco":
            raise DetectionsError("--coco-annotations is for --output-format coco")
        if not args.coco_annotations.is_file():
            raise DetectionsError(f"--coco-annotations '{args.coco_annotations}' does not exist")


def write_output(args: argparse.Namespace, report: RefineReport, image_id: Callable[[str], int | None]) -> None:
    """The rows in the format asked for; what could not be written, or was written unrefined, in the log."""
    if args.output_format == "json":
        write_json(args.output, report.rows)
        return
    if args.output_format == "coco":
        results, left_out, unrefined = coco_results(report.rows, args.box_format, image_id)
        write_json(args.output, results)
        what = f"{len(results)} COCO results"
    else:
        labels, left_out, unrefined = yolo_labels(report.rows, args.box_format, report.sizes)
        what = (f"{sum(len(lines) for lines in labels.values())} boxes in {write_yolo(Path(args.output), labels)} "
                "YOLO label files")
    log.info("wrote %s to %s (%d of them with the input box: not refined); not written: %s", what, args.output,
             unrefined, ", ".join(f"{n} {reason}" for reason, n in sorted(left_out.items())) or "none")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_command(lambda: run(argv, prog))
