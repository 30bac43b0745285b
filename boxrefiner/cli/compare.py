"""The example (`run_optimized_training.py`): train on the embedded default twice — first with the cache
filling (or already warm), then again with --fast on the warm cache — and compare wall time, cache use
and validation IoU.

    python run_optimized_training.py                          # configs/demo.yaml, data generated if missing
    python run_optimized_training.py --config my_config.yaml  # your own data and checkpoint
    python run_optimized_training.py --clear-cache            # make the first run really cold
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from boxrefiner.cli.common import add_device_argument, run_command
from boxrefiner.config import Config, fast_variant, load_config, replace
from boxrefiner.data.synthetic import ensure_synthetic_data
from boxrefiner.features.cache import clear_features
from boxrefiner.features.encoder import resolved_precision
from boxrefiner.utils.device import resolve_device
from boxrefiner.utils.logs import setup_logging

DEMO = Path("configs/demo.yaml")


def run(cfg: Config, device: torch.device, label: str) -> dict:
    """Train with outputs in `<save_dir>/<label>` and `<checkpoint_dir>/<label>`; returns the comparison row."""
    from boxrefiner.training.trainer import (
        train,  # heavy imports after argument errors are reported
    )
    out = cfg.output
    cfg = replace(cfg, "output", save_dir=str(Path(out.save_dir) / label),
                  checkpoint_dir=str(Path(out.checkpoint_dir) / label), log_dir=out.log_dir)
    start = time.perf_counter()
    history = train(cfg, device)
    stats = history.cache_stats
    last, best = history[-1], history.best or history[-1]  # best: what best_model.pth gives
    return {"run": label, "wall_seconds": time.perf_counter() - start, "epochs": len(history),
            "train_images": round(last["samples_per_second"] * last["epoch_seconds"]),
            "extracted": stats["extracted"] if stats else None, "hit_rate": stats["hit_rate"] if stats else None,
            "epoch_seconds": last["epoch_seconds"], "best_epoch": best["epoch"], "val_iou_input": best["val_iou_input"],
            "val_iou_refined": best["val_iou_refined"], "val_worse_rate_tol": best.get("val_worse_rate_tol")}


def comparison(rows: list[dict]) -> str:
    lines = ["| run | wall time | epochs x images | features extracted | cache hit rate | last epoch | best epoch: "
             "val IoU input -> refined |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cache = "off" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%"
        lines.append(f"| {r['run']} | {r['wall_seconds']:.1f} s | {r['epochs']} x {r['train_images']} | "
                     f"{r['extracted'] if r['extracted'] is not None else '-'} | {cache} | {r['epoch_seconds']:.2f} s | "
                     f"{r['best_epoch']}: {r['val_iou_input']:.3f} -> {r['val_iou_refined']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None, demo: Path = DEMO) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=demo, help="config (default: the embedded demo)")
    add_device_argument(parser)
    parser.add_argument("--clear-cache", action="store_true", help="delete this encoder's cached features first")
    args = parser.parse_args(argv)

    def compare_runs() -> int:
        cfg, _ = load_config(args.config)
        setup_logging(cfg.output.log_dir)
        device = resolve_device(args.device)
        cfg = resolved_precision(cfg, device)
        ensure_synthetic_data(cfg)
        if args.clear_cache:
            clear_features(cfg, every_encoder=False)
        rows = [run(cfg, device, "full")]
        fast, change = fast_variant(cfg)
        print(f"--fast: {change}", file=sys.stderr)
        rows.append(run(fast, device, "fast"))
        print()
        print(comparison(rows))
        return 0

    return run_command(compare_runs)

