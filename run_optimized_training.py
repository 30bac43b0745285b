#!/usr/bin/env python
"""Example: train on the embedded default twice — first with the cache filling (or already warm),
then again with --fast on the warm cache — and compare wall time, cache use and validation IoU.

    python run_optimized_training.py                          # configs/demo.yaml, data generated if missing
    python run_optimized_training.py --config my_config.yaml  # your own data and checkpoint
    python run_optimized_training.py --clear-cache            # make the first run really cold
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from boxrefiner.cli import apply_overrides, build_parser, clear_features, ensure_synthetic_data
from boxrefiner.console import resolve_device, run_command, setup_logging
from boxrefiner.config import Config, load_config, replace

DEMO = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def run(cfg: Config, device: torch.device, label: str) -> dict:
    """Train with outputs in `<save_dir>/<label>` and `<checkpoint_dir>/<label>`; returns the comparison row."""
    from boxrefiner.engine import train
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO, help="config (default: the embedded demo)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--clear-cache", action="store_true", help="delete this encoder's cached features first")
    args = parser.parse_args(argv)

    def compare_runs(_) -> int:
        cfg, _ = load_config(args.config)
        setup_logging(cfg.output.log_dir)
        device = resolve_device(args.device)
        ensure_synthetic_data(cfg)
        if args.clear_cache:
            clear_features(cfg, every_encoder=False)
        rows = [run(cfg, device, "full")]
        fast, notes = apply_overrides(cfg, build_parser().parse_args(["--config", str(args.config), "--fast"]))
        print("\n".join(notes), file=sys.stderr)
        rows.append(run(fast, device, "fast"))
        print()
        print(comparison(rows))
        return 0

    return run_command(compare_runs)


if __name__ == "__main__":
    sys.exit(main())
