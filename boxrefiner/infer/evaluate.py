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
Every box is scored against the object of its image it overlaps most (several boxes may point at one
object); a detection that overlaps none is a false positive, counted apart and in the COCO box AP
that detections also get (pycocotools), before and after refinement. The main set is also reported
per category.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from boxrefiner.boxes import box_iou, pixel_boxes
from boxrefiner.data.detections import (
    DetectionsError,
    parse_detections,
    to_xyxy,
)
from boxrefiner.data.masks import GroundTruthMasks
from boxrefiner.data.matching import best_overlap
from boxrefiner.data.splits import SplitData
from boxrefiner.data.targets import Targets, validation_inputs
from boxrefiner.features.sam import mask_iou
from boxrefiner.infer.refiner import BoxRefiner, ImageFeatures
from boxrefiner.metrics import box_ap, iou_summary
from boxrefiner.utils.progress import progress


@dataclass
class Case:
    """One box to score: the split image it lies on, the object it is scored against (-1: it points at
    none, a false positive that only the AP counts), the input box and (if given) the refined one, in a
    set of boxes scored together (`group`: "" for the main set, else a noise level's name)."""
    image: int
    object: int
    box: np.ndarray  # xyxy pixels
    refined: np.ndarray | None = None
    iou_pred: float | None = None  # the refiner's predicted IoU of `refined`, where known
    group: str = ""
    score: float = 1.0  # the detector's confidence (COCO AP)
    category_id: int | None = None  # the detector's class, where it gives one


def jittered_cases(refiner: BoxRefiner, split: SplitData) -> list[Case]:
    """The trainer's validation inputs: ground truth with the run's own noise and seed (group ""), and
    each of `evaluation.levels` (grouped by level name)."""
    targets = Targets.of(split)
    width, height = split.image_sizes()
    cases = []
    for name, inputs in validation_inputs(refiner.cfg, targets).items():
        boxes = pixel_boxes(inputs.boxes, width[inputs.owner], height[inputs.owner])
        cases += [Case(split.objects[k].image, k, box.numpy(), group=name) for k, box in zip(inputs.owner.tolist(), boxes)]
    return cases


def cases_from_rows(rows: list, split: SplitData, box_format: str, refined: bool,
                    match_iou: float = 0.0) -> tuple[list[Case], Counter]:
    """Cases from detection rows (`refined`: refine_boxes.py's output, `bbox_input` -> `bbox`), each
    scored against the object of its image it overlaps most (at least `match_iou`); and what was left
    out, by reason."""
    objects_of = split.objects_by_image()
    truth_of = {image: np.array([split.objects[k].box for k in mine]) for image, mine in objects_of.items()}
    detections, problems = parse_detections(rows, box_format)
    skipped = Counter("malformed_row" for _ in problems)
    cases = []
    for detection in detections:
        image = split.image_named(detection.file_name)
        if image is None:
            skipped["not_in_split"] += 1
            continue
        row = rows[detection.row]
        before, after, predicted = detection.box, None, None
        if refined:
            if "refine_error" in row or "bbox_input" not in row:
                skipped["not_refined"] += 1  # refine_boxes.py could not refine it
                continue
            try:
                before, after = to_xyxy(row["bbox_input"], box_format), detection.box
            except ValueError:
                skipped["malformed_row"] += 1
                continue
            predicted = row.get("iou_pred")
        mine = objects_of.get(image, [])
        best, iou = best_overlap(np.array([before]), truth_of.get(image, np.zeros((0, 4))))
        target = mine[int(best[0])] if best[0] >= 0 and iou[0] >= match_iou else -1
        score, category = row.get("score", 1.0), row.get("category_id")
        cases.append(Case(image, target, np.array(before), None if after is None else np.array(after),
                          float(predicted) if isinstance(predicted, (int, float)) else None,
                          score=float(score) if isinstance(score, (int, float)) else 1.0,
                          category_id=category if isinstance(category, int) else None))
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


def evaluate_cases(refiner: BoxRefiner, split: SplitData, cases: list[Case], with_masks: bool = False,
                   ap: bool = False) -> dict:
    """Score every case against its object, by group and (main group) by category; with `with_masks`
    also HQ-SAM's masks from both boxes of the main group; with `ap`, COCO box AP of the input and the
    refined boxes (false positives included) on every image of the split that could be read."""
    return score_cases(refiner, split, cases, with_masks).report(split, cases, ap)


def score_cases(refiner: BoxRefiner, split: SplitData, cases: list[Case], with_masks: bool = False) -> Tally:
    """The per-box scores of every case (see evaluate_cases), kept for the report and the plots."""
    by_image: dict[int, list[Case]] = {}
    for case in cases:
        by_image.setdefault(case.image, []).append(case)
    order = list(by_image)
    images = [split.images[i] for i in order]
    truth_masks = GroundTruthMasks(split, [c.object for c in cases if c.object >= 0 and c.group == ""]) \
        if with_masks else None
    tally = Tally({name: Scores() for name in dict.fromkeys(c.group for c in cases)})
    if with_masks or any(c.refined is None for c in cases):
        items = refiner.image_features([i.image_path for i in images], for_masks=with_masks)
    else:  # refined boxes given and no masks wanted: nothing to read
        items = (ImageFeatures(k, i.image_path) for k, i in enumerate(images))
    with progress(total=len(order), desc="Evaluating", unit="img") as bar:
        for item in items:
            bar.update(1)
            mine = by_image[order[item.index]]
            if item.error:
                tally.skipped[item.error] += sum(c.group == "" for c in mine) or len(mine)
                for case in mine:
                    case.object = -2  # not scored, not in the AP either
                continue
            tally.images += 1
            refine_cases(refiner, item, mine)
            scored = [c for c in mine if c.object >= 0]
            if scored:
                tally.add_boxes(split, scored)
                if truth_masks is not None:
                    tally.add_masks(refiner, item, scored, truth_masks)
    return tally


def refine_cases(refiner: BoxRefiner, item: ImageFeatures, mine: list[Case]) -> None:
    """Refine one image's cases on its features (unless they came refined)."""
    if mine[0].refined is not None:
        return
    result = refiner.refine_features(item.map, item.width, item.height, np.stack([c.box for c in mine]))
    predicted = result.iou_pred if result.iou_pred is not None else [None] * len(mine)
    for case, box, iou in zip(mine, result.boxes, predicted):
        case.refined, case.iou_pred = box, None if iou is None else float(iou)


@dataclass
class Tally:
    """The scores collected so far: per group (level), per category (main group), what was left out."""
    groups: dict[str, Scores]
    categories: dict[int, Scores] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    images: int = 0

    def add_boxes(self, split: SplitData, scored: list[Case]) -> None:
        truth = torch.tensor([split.objects[c.object].box for c in scored], dtype=torch.float64)
        before = box_iou(torch.from_numpy(np.stack([c.box for c in scored])), truth)
        after = box_iou(torch.from_numpy(np.stack([np.asarray(c.refined) for c in scored])), truth)
        known = [c.iou_pred for c in scored]
        predicted = torch.tensor(known, dtype=torch.float64) if all(p is not None for p in known) else None
        for name, scores in self.groups.items():
            rows = torch.tensor([c.group == name for c in scored])
            if rows.any():
                scores.box_before.append(before[rows])
                scores.box_after.append(after[rows])
                if predicted is not None:
                    scores.predicted.append(predicted[rows])
        for k, case in enumerate(scored):
            if case.group == "":
                per = self.categories.setdefault(split.objects[case.object].category_id, Scores())
                per.box_before.append(before[k:k + 1])
                per.box_after.append(after[k:k + 1])

    def add_masks(self, refiner: BoxRefiner, item: ImageFeatures, scored: list[Case],
                  truth_masks: GroundTruthMasks) -> None:
        """HQ-SAM's masks from the input and the refined box of each main-group case whose object has a mask."""
        drawn_masks = truth_masks([c.object for c in scored if c.group == ""])
        drawn = [c for c in scored if c.group == "" and c.object in drawn_masks]
        if not drawn:
            return
        main = self.groups[""]
        for boxes, out in (([c.box for c in drawn], main.mask_before),
                           ([np.asarray(c.refined) for c in drawn], main.mask_after)):
            masks, _ = refiner.prompter.masks(*item.decoder_inputs, item.width, item.height, np.stack(boxes))
            out.append(torch.tensor([mask_iou(m, drawn_masks[c.object]) for m, c in zip(masks, drawn)],
                                    dtype=torch.float64))

    def per_box(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each group's box IoUs, input and refined, one entry per scored box."""
        return {name: (torch.cat(s.box_before).numpy(), torch.cat(s.box_after).numpy())
                for name, s in self.groups.items() if s.box_before}

    def report(self, split: SplitData, cases: list[Case], ap: bool) -> dict:
        main = self.groups.get("", Scores())
        unmatched = sum(c.object == -1 for c in cases)
        if unmatched:
            self.skipped["unmatched_detection"] += unmatched
        if not main.box_before:
            raise DetectionsError(f"nothing to evaluate on split '{split.split}' (left out: "
                                  f"{dict(self.skipped) or 'none'})")
        report = {"split": split.split, "images": self.images, "boxes": int(sum(len(t) for t in main.box_before)),
                  "box": main.summary("box"), "mask": main.summary("mask"),
                  "mask_boxes": int(sum(len(t) for t in main.mask_before)),  # those whose object has a mask
                  "levels": {name: scores.summary("box") for name, scores in self.groups.items() if name},
                  "categories": {split.category_name(c): {"boxes": int(sum(len(t) for t in s.box_before)),
                                                          **_means(s)} for c, s in sorted(self.categories.items())},
                  "skipped": dict(self.skipped)}
        if ap:
            unread = {c.image for c in cases if c.object == -2}
            report["ap"] = split_ap(split, [c for c in cases if c.object >= -1 and c.group == ""], unread)
        return report


def split_ap(split: SplitData, cases: list[Case], unread: set[int]) -> dict:
    """COCO box AP of the cases against the split's objects, on every image of the split that could be read."""
    sizes = {i: (image.width, image.height) for i, image in enumerate(split.images) if i not in unread}
    return box_ap(sizes, [(o.image, o.category_id, o.box) for o in split.objects], split.categories, cases)


def _means(scores: Scores) -> dict:
    summary = scores.summary("box") or {}
    return {"iou_input": summary.get("iou_input"), "iou_refined": summary.get("iou_refined")}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_report(report: dict) -> str:
    """Small tables: what the input boxes gave, and what the refined ones give (main set, then levels)."""
    lines = [(f"{report['boxes']} boxes on {report['images']} images of split '{report['split']}' "
              f"(inputs: {report['inputs']}; mask decoder: {report['mask_decoder']}; gate: {report['gate']})"), "",
             "| measure | input boxes | refined boxes |", "|---|---|---|"]
    if report["mask"] is not None and report.get("mask_boxes", report["boxes"]) < report["boxes"]:
        lines.insert(1, f"mask IoU on the {report['mask_boxes']} boxes whose object has an annotated mask")
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
    if report.get("categories") and len(report["categories"]) > 1:
        lines += ["", "| category | boxes | input IoU | refined IoU | gain |", "|---|---|---|---|---|"]
        for name, c in report["categories"].items():
            lines.append(f"| {name} | {c['boxes']} | {c['iou_input']:.3f} | {c['iou_refined']:.3f} | "
                         f"{c['iou_refined'] - c['iou_input']:+.3f} |")
    if report.get("ap"):
        ap = report["ap"]
        lines += ["", (f"COCO box AP (pycocotools, {'per category' if ap['class_aware'] else 'class-agnostic'}, "
                       f"{ap['detections']} detections on {ap['images']} images, false positives included):"),
                  "| measure | input boxes | refined boxes |", "|---|---|---|"]
        lines += [f"| {key} | {_number(ap['input'][key])} | {_number(ap['refined'][key])} |"
                  for key in ("AP", "AP50", "AP75")]
    if report["skipped"]:
        lines += ["", "left out: " + ", ".join(f"{n} {r}" for r, n in sorted(report["skipped"].items()))]
    return "\n".join(lines)
