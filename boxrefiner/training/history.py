"""The record of a run's epochs: the summary line, the best epoch and patience, metrics.jsonl read back,
and skipped.jsonl."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from boxrefiner.config import Config
from boxrefiner.data.splits import SplitData
from boxrefiner.utils.files import write_jsonl

log = logging.getLogger(__name__)


def out_of_patience(cfg: Config, epoch: int, best_epoch: int) -> bool:
    """Whether training.patience epochs have passed since the best one (0: never stop early)."""
    patience = cfg.training.patience
    return patience > 0 and best_epoch >= 0 and epoch - best_epoch >= patience and epoch + 1 < cfg.training.epochs


def improves(value: float, best: float, best_epoch: int) -> bool:
    """Whether an epoch's validation IoU is the run's best so far (the first epoch always is; NaN never
    beats a number)."""
    if best_epoch < 0 or not math.isfinite(best):
        return True
    return math.isfinite(value) and value > best


def epoch_summary(r: dict, epochs: int, improved: bool) -> str:
    cache = "off" if r["cache_hit_rate"] is None else f"{100 * r['cache_hit_rate']:.0f}%" + (
        f" ({r['cache_healed']} healed)" if r["cache_healed"] else "")
    levels = "  ".join(f"{name} {r[f'val_iou_input_{name}']:.3f}->{r[f'val_iou_refined_{name}']:.3f} "
                       f"({100 * r[f'val_worse_rate_tol_{name}']:.0f}% worse)"
                       for name in sorted({k[len("val_iou_input_"):] for k in r if k.startswith("val_iou_input_")}))
    return (f"epoch {r['epoch']}/{epochs - 1}  loss {r['train_loss']:.4f} (L1 {r['train_l1']:.4f}, GIoU "
            f"{r['train_giou_loss']:.4f}, IoU error {r['train_quality_error']:.3f})  val loss {r['val_loss']:.4f}  "
            f"IoU {r['val_iou_input']:.3f} -> {r['val_iou_refined']:.3f}  worse {100 * r['val_worse_rate']:.0f}%"
            + (f"  [{levels}]" if levels else "") +
            f"  {r['epoch_seconds']:.1f}s train ({r['samples_per_second']:.0f} samples/s, {r['data_seconds']:.1f}s "
            f"waiting for features), {r['val_seconds']:.1f}s val, cache {cache}" + ("  *best*" if improved else ""))


class RunHistory(list):
    """The metrics of the epochs run now, plus the run's feature-cache statistics (None with the cache off)
    and the record of the epoch `best_model.pth` holds (None before any epoch)."""
    cache_stats: dict | None = None
    best: dict | None = None


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (unparseable lines skipped)."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_skipped(path: Path, *splits: SplitData) -> None:
    """<save_dir>/skipped.jsonl: one line per image, object or detection left out (file name, split,
    reason, and the annotation, line or row where there is one)."""
    records = [{"file_name": r["file_name"], "split": split.split, **{k: v for k, v in r.items() if k != "file_name"}}
               for split in splits for r in split.skipped_files]
    write_jsonl(path, records)
    if records:
        log.info("%d skipped images, objects or detections listed in %s", len(records), path)
