"""Measure a trained refiner on a labelled split: box IoU with the truth before and after refinement,
and, where HQ-SAM's mask decoder is available, the IoU of the masks HQ-SAM draws from each box (the
end goal: better boxes are worth something only if they give better masks).

    python evaluate_refiner.py --checkpoint checkpoints/demo/best_model.pth [--split val]
        [--detections in.json | --refined out.json] [--mask-iou | --no-mask-iou] [--output report.json]

Input boxes are one of
- the ground truth jittered with the run's own validation noise (`evaluation.box_noise`) and at each
  of `evaluation.levels` (default; on the validation split this repeats the trainer's validation
  numbers),
- a detector's boxes (`--detections`), refined here exactly as refine_boxes.py does, or
- refine_boxes.py's output (`--refined`), scored as written: `bbox_input` versus `bbox`.
A split image holds one object, so every box of an image is scored against that image's truth.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .boxes import box_iou, iou_summary
from .config import replace
from .console import run_command, setup_logging
from .data import SplitData, ground_truth_mask, load_split, read_masks, split_paths
from .detections import BOX_FORMATS, DetectionsError, parse_detections, read_detections, to_xyxy
from .engine import Targets, validation_inputs
from .fileio import write_json
from .progress import progress
from .refine_cli import add_refiner_arguments, load_refiner, refine_rows
from .refiner import BoxRefiner, ImageFeatures
from .sam import mask_iou

log = logging.getLogger("boxrefiner")


@dataclass
class Case:
    """One box to score: the split image it belongs to, the input box and (if given) the refined one,
    in a set of boxes scored together (`group`: "" for the main set, else a noise level's name)."""
    sample: int
    box: np.ndarray  # xyxy pixels
    refined: np.ndarray | None = None
    iou_pred: float | None = None  # the refiner's predicted IoU of `refined`, where known
    group: str = ""


def jittered_cases(refiner: BoxRefiner, split: SplitData) -> list[Case]:
    """The trainer's validation inputs: ground truth with the run's own noise and seed (group ""), and
    each of `evaluation.levels` (grouped by level name)."""
    targets = Targets.of(split.samples)
    longest = torch.tensor([max(s.width, s.height) for s in split.samples], dtype=torch.float64)
    return [Case(i, box.numpy(), group=name) for name, inputs in validation_inputs(refiner.cfg, targets).items()
            for i, boxes in enumerate(inputs.double() * longest[:, None, None]) for box in boxes]


def cases_from_rows(rows: list, split: SplitData, box_format: str) -> tuple[list[Case], Counter]:
    """Cases from refine_boxes.py's output rows; and what was left out, by reason."""
    index = {s.file_name: i for i, s in enumerate(split.samples)}
    detections, problems = parse_detections(rows, box_format)
    skipped = Counter("malformed_row" for _ in problems)
    cases = []
    for detection in detections:
        if detection.file_name not in index:
            skipped["not_in_split"] += 1
            continue
        row = rows[detection.row]
        if "refine_error" in row or "bbox_input" not in row:
            skipped["not_refined"] += 1  # refine_boxes.py could not refine it
            continue
        try:
            before = to_xyxy(row["bbox_input"], box_format)
        except ValueError:
            skipped["malformed_row"] += 1
            continue
        predicted = row.get("iou_pred")
        cases.append(Case(index[detection.file_name], np.array(before), np.array(detection.box),
                          float(predicted) if isinstance(predicted, (int, float)) else None))
    return cases, skipped


@dataclass
class Scores:
    """Per-box IoUs of one group of cases: input and refined boxes, their masks, and predicted IoUs."""
    box_before: list[torch.Tensor] = field(default_factory=list)
    box_after: list[torch.Tensor] = field(default_factory=list)
    predicted: list[torch.Tensor] = field(default_factory=list)
    mask_before: list[torch.Tensor] = field(default_factory=list)
    mask_after: list[torch.Tensor] = field(default_factory=list)

    def summary(self, part: str = "box") -> dict | None:
        before, after = getattr(self, f"{part}_before"), getattr(self, f"{part}_after")
        if not before:
            return None
        count = sum(len(t) for t in before)
        predicted = torch.cat(self.predicted) if part == "box" and sum(len(t) for t in self.predicted) == count else None
        return iou_summary(torch.cat(before), torch.cat(after), predicted)


def evaluate_cases(refiner: BoxRefiner, split: SplitData, cases: list[Case], masks_file: Path | None = None) -> dict:
    """Score every case, by group; with `masks_file` (the split's masks parquet) also HQ-SAM's masks
    from both boxes of the main group."""
    by_sample: dict[int, list[Case]] = {}
    for case in cases:
        by_sample.setdefault(case.sample, []).append(case)
    order = list(by_sample)
    samples = [split.samples[i] for i in order]
    mask_rows = read_masks(masks_file, {s.file_name for s in samples}) if masks_file else {}
    groups: dict[str, Scores] = {name: Scores() for name in dict.fromkeys(c.group for c in cases)}
    skipped: Counter = Counter()
    images = 0
    if masks_file is not None or any(c.refined is None for c in cases):
        items = refiner.image_features([s.image_path for s in samples], for_masks=masks_file is not None)
    else:  # refined boxes given and no masks wanted: nothing to read
        items = (ImageFeatures(i, s.image_path) for i, s in enumerate(samples))
    with progress(total=len(order), desc="Evaluating", unit="img") as bar:
        for item in items:
            bar.update(1)
            sample, mine = samples[item.index], by_sample[order[item.index]]
            if item.error:
                skipped[item.error] += sum(c.group == "" for c in mine) or len(mine)
                continue
            images += 1
            inputs = np.stack([c.box for c in mine])
            if mine[0].refined is None:
                result = refiner.refine_features(item.embedding, item.width, item.height, inputs)
                refined, predicted = result.boxes, result.iou_pred
            else:
                refined = np.stack([c.refined for c in mine])
                known = [c.iou_pred for c in mine]
                predicted = np.array(known, dtype=np.float64) if all(p is not None for p in known) else None
            truth = torch.tensor([sample.box] * len(mine), dtype=torch.float64)
            before, after = box_iou(torch.from_numpy(inputs), truth), box_iou(torch.from_numpy(refined), truth)
            for name, scores in groups.items():
                rows = torch.tensor([c.group == name for c in mine])
                if rows.any():
                    scores.box_before.append(before[rows])
                    scores.box_after.append(after[rows])
                    if predicted is not None:
                        scores.predicted.append(torch.from_numpy(np.asarray(predicted))[rows])
            if masks_file is not None:
                main = np.array([c.group == "" for c in mine])
                gt = ground_truth_mask(mask_rows[sample.file_name], item.width, item.height)
                for boxes, out in ((inputs[main], groups[""].mask_before), (refined[main], groups[""].mask_after)):
                    masks, _ = refiner.prompter.masks(*item.sam_features, item.width, item.height, boxes)
                    out.append(torch.tensor([mask_iou(m, gt) for m in masks], dtype=torch.float64))
    main = groups.get("", Scores())
    if not main.box_before:
        raise DetectionsError(f"nothing to evaluate on split '{split.split}' (left out: {dict(skipped) or 'none'})")
    return {"split": split.split, "images": images, "boxes": int(sum(len(t) for t in main.box_before)),
            "box": main.summary("box"), "mask": main.summary("mask"),
            "levels": {name: scores.summary("box") for name, scores in groups.items() if name},
            "skipped": dict(skipped)}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_report(report: dict) -> str:
    """Small tables: what the input boxes gave, and what the refined ones give (main set, then levels)."""
    lines = [f"{report['boxes']} boxes on {report['images']} images of split '{report['split']}' "
             f"(inputs: {report['inputs']}; mask decoder: {report['mask_decoder']}; gate: {report['gate']})", "",
             "| measure | input boxes | refined boxes |", "|---|---|---|"]
    for part in ("box", "mask"):
        s = report[part]
        if s is None:
            continue
        lines += [f"| {part} mean IoU | {s['iou_input']:.3f} | {s['iou_refined']:.3f} |",
                  f"| {part} IoU >= 0.75 | {_percent(s['iou75_input'])} | {_percent(s['iou75_refined'])} |",
                  f"| {part} IoU >= 0.9 | {_percent(s['iou90_input'])} | {_percent(s['iou90_refined'])} |",
                  f"| {part} IoU made worse (by > 0.005) | | {_percent(s['worse_rate_tol'])} |"]
        if part == "box":
            lines.append(f"| Spearman(predicted IoU, IoU) | | {_number(s['iou_pred_spearman'])} |")
    if report.get("levels"):
        lines += ["", "| noise level | input IoU | refined IoU | gain | made worse | IoU >= 0.9 in -> out | Spearman |",
                  "|---|---|---|---|---|---|---|"]
        for name, s in report["levels"].items():
            lines.append(f"| {name} | {s['iou_input']:.3f} | {s['iou_refined']:.3f} | "
                         f"{s['iou_refined'] - s['iou_input']:+.3f} | {_percent(s['worse_rate_tol'])} | "
                         f"{_percent(s['iou90_input'])} -> {_percent(s['iou90_refined'])} | "
                         f"{_number(s['iou_pred_spearman'])} |")
    if report["skipped"]:
        lines += ["", "left out: " + ", ".join(f"{n} {r}" for r, n in sorted(report["skipped"].items()))]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Measure a trained box refiner on a labelled split.")
    add_refiner_arguments(parser)
    parser.add_argument("--split", default=None, help="split to measure (default: the run's data.val_split)")
    parser.add_argument("--data-root", help="FungiTastic root (default: the run's data.data_root)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--detections", help="detector boxes to refine and score (JSON list, file_name + bbox)")
    source.add_argument("--refined", help="refine_boxes.py output to score as is (bbox_input vs bbox)")
    parser.add_argument("--box-format", choices=BOX_FORMATS, default="xyxy", help="bbox layout of those files")
    parser.add_argument("--mask-iou", action=argparse.BooleanOptionalAction, default=None,
                        help="prompt HQ-SAM with both boxes and compare masks with the truth (default: on with a "
                             "real HQ-SAM checkpoint that can be found, off with random weights)")
    parser.add_argument("--output", help="also write the report as JSON here")
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    refiner = load_refiner(args)
    random_weights = refiner.identity.weights.startswith("random-init")
    mask_iou = args.mask_iou
    if mask_iou is None:
        found = bool(refiner.hqsam_checkpoint) and Path(refiner.hqsam_checkpoint).is_file()
        mask_iou = not random_weights and found
        if random_weights:
            log.info("mask IoU skipped: HQ-SAM's weights are random here, so its masks mean nothing (--mask-iou forces it)")
        elif not found:
            log.warning("mask IoU skipped: the HQ-SAM checkpoint '%s' is not there (pass --hqsam-checkpoint)",
                        refiner.hqsam_checkpoint)
    if mask_iou:
        refiner.enable_masks()
    data = refiner.cfg.data  # another root has its own masks files, not the run's data.masks_file
    if args.data_root:
        data = replace(refiner.cfg, "data", data_root=args.data_root, masks_file=None).data
    split_name = args.split or data.val_split
    split = load_split(data, split_name)
    log.info("split '%s': %d labelled images%s", split_name, len(split.samples),
             "".join(f", {n} {r}" for r, n in sorted(split.skipped.items())))
    if args.detections or args.refined:
        rows = read_detections(args.detections or args.refined)
        if args.detections:
            rows = refine_rows(refiner, rows, split_paths(data, split_name)[1], args.box_format).rows
        cases, skipped = cases_from_rows(rows, split, args.box_format)
        source = f"{'refine_boxes.py output' if args.refined else 'detections'} {args.detections or args.refined}"
    else:
        cases, skipped = jittered_cases(refiner, split), Counter()
        noise = refiner.cfg.evaluation.own_noise(refiner.cfg.data)
        source = (f"ground truth jittered (center_std {noise.center_std}, scale_std {noise.scale_std}, "
                  f"seed {refiner.cfg.evaluation.noise_seed}; and the levels "
                  f"{', '.join(refiner.cfg.evaluation.levels) or 'none'})")
    report = evaluate_cases(refiner, split, cases, split_paths(data, split_name)[2] if mask_iou else None)
    report["skipped"] = dict(Counter(report["skipped"]) + skipped)
    report.update(inputs=source, checkpoint=str(args.checkpoint), gate=(
                  f"on (keep_margin {refiner.keep_margin:g})" if refiner.gate else "off"),
                  mask_decoder=("not used" if not mask_iou else "random weights" if random_weights else "HQ-SAM checkpoint"))
    print(format_report(report))
    if args.output:
        write_json(args.output, report)
        log.info("report written to %s", args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)
