"""Every speed-up measured side by side: same data, seed and epochs, on whatever hardware is given.

Variants (from one base config):
    baseline       cache off, fp32, full data: the original behaviour
    feature_cache  cache on (warm), fp32, full data
    sampling       cache off, data.sample_ratio 0.1
    amp            cache off, training.use_amp
    combined       what --fast does: cache on, sample_ratio 0.1, AMP, batch size min(2x, 32)

and the extraction modes (bench/extract.py): encoder and pipeline images/s, feature deviation from
fp32 and the refiner trained on each mode's features.

Every variant validates with the quality gate off (the head's own boxes). Each variant runs in its own process (so peak memory is its own) and writes into a private folder,
cache included: the feature_cache variant really starts cold, and the user's cache is not touched.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from boxrefiner.bench.epoch import head_only_seconds, isolated_outputs
from boxrefiner.bench.extract import MODES
from boxrefiner.bench.extract import markdown_table as extraction_table
from boxrefiner.bench.extract import measure as measure_extraction
from boxrefiner.bench.extract import targets as extraction_targets
from boxrefiner.config import (
    FAST_SAMPLE_RATIO,
    Config,
    config_from_dict,
    fast_variant,
    replace,
    with_cache,
)
from boxrefiner.training.precision import amp_precision
from boxrefiner.utils.files import write_json

VARIANTS = ("baseline", "feature_cache", "sampling", "amp", "combined")
TARGETS = {"cache_speedup_min": 30.0, "iou_loss_change_pp_max": 0.5, "amp_speedup_min": 1.5, "amp_memory_saving_min": 0.30}


def variant(cfg: Config, name: str) -> Config:
    """The base config changed into one variant."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}")
    # judge the head's own boxes: after a couple of epochs the quality gate keeps nearly every input box,
    # and an IoU that equals the input's in every variant cannot show what an optimisation changed
    cfg = with_cache(replace(cfg, "refinement", gate=False), name in ("feature_cache", "combined"))
    if name == "combined":  # the quick-iteration policy (fast_variant), on the cache
        return fast_variant(cfg)[0]
    cfg = replace(cfg, "training", use_amp=name == "amp")
    return replace(cfg, "data", sample_ratio=FAST_SAMPLE_RATIO if name == "sampling" else None)


def suite_modes(device: torch.device) -> list[str]:
    """The extraction modes the suite measures: all of them on CUDA; on a CPU not torch.compile (its
    compilation alone takes longer than the rest of the suite) nor fp16 (CPUs without native fp16
    arithmetic run it several times slower than fp32); `boxrefiner bench extract` measures those."""
    if device.type == "cuda":
        return list(MODES)
    return [m for m in MODES if "compile" not in m and not m.startswith("fp16")]


def isolate(cfg: Config, folder: Path, cache_dir: Path) -> Config:
    cfg = isolated_outputs(cfg, folder)
    return replace(cfg, "optimization", feature_cache=dataclasses.replace(cfg.optimization.feature_cache,
                                                                          cache_dir=str(cache_dir)))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _worker(cfg_dict: dict, device_name: str, debug: bool, queue) -> None:
    from boxrefiner.training.trainer import train
    from boxrefiner.utils.logs import setup_logging
    setup_logging()
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    history = train(config_from_dict(cfg_dict), device, debug=debug)
    queue.put({"wall_seconds": time.perf_counter() - start, "history": list(history),
               "cache_stats": history.cache_stats, "peak_memory_mb": _peak_memory_mb(device)})


def run_isolated(cfg: Config, device: torch.device, debug: bool = False) -> dict:
    """Train in a fresh process; returns its wall time, metrics history, cache stats and peak memory."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(cfg.to_dict(), str(device), debug, queue))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"benchmark run exited with code {process.exitcode}")
    return result


def summarise(name: str, run: dict) -> dict[str, Any]:
    history = run["history"]
    last = history[-1]
    return {"name": name, "epoch_seconds": statistics.median(r["epoch_seconds"] for r in history),
            "data_seconds": statistics.median(r["data_seconds"] for r in history),
            "train_images": round(history[0]["samples_per_second"] * history[0]["epoch_seconds"]),
            "peak_memory_mb": run["peak_memory_mb"], "val_iou_input": last["val_iou_input"],
            "val_iou": last["val_iou_refined"], "val_iou_loss": 1.0 - last["val_iou_refined"],
            "wall_seconds": run["wall_seconds"]}


def compare(configs: list[dict]) -> list[dict]:
    """Add speed-up and IoU-loss change (percentage points) against the baseline."""
    base = next(c for c in configs if c["name"] == "baseline")
    for c in configs:
        c["speedup"] = base["epoch_seconds"] / c["epoch_seconds"]
        c["val_iou_loss_change_pp"] = 100.0 * (c["val_iou_loss"] - base["val_iou_loss"])
    return configs


def evaluate_targets(configs: list[dict], device_type: str) -> dict[str, dict]:
    """pass / fail per target, or 'not measurable' where the hardware cannot show it."""
    by_name = {c["name"]: c for c in configs}
    targets: dict[str, dict] = {}
    cache = by_name.get("feature_cache")
    if cache:
        targets["cache_speedup"] = {"target": f">= {TARGETS['cache_speedup_min']:g}x", "value": cache["speedup"],
                                    "status": "pass" if cache["speedup"] >= TARGETS["cache_speedup_min"] else "fail"}
    for name in ("feature_cache", "amp"):
        if name in by_name:
            change = by_name[name]["val_iou_loss_change_pp"]
            targets[f"{name}_iou_loss_change"] = {
                "target": f"<= {TARGETS['iou_loss_change_pp_max']:g} pp", "value": change,
                "status": "pass" if change <= TARGETS["iou_loss_change_pp_max"] else "fail"}
    if "amp" in by_name and "baseline" in by_name:
        amp, base = by_name["amp"], by_name["baseline"]
        saving = 1 - amp["peak_memory_mb"] / base["peak_memory_mb"]
        memory_target = f">= {100 * TARGETS['amp_memory_saving_min']:g}% less GPU memory (cache off)"
        speed_target = f">= {TARGETS['amp_speedup_min']:g}x the fp32 epoch on a GPU (cache off)"
        if device_type == "cuda":
            targets["amp_memory_saving"] = {"target": memory_target, "value": saving,
                                            "status": "pass" if saving >= TARGETS["amp_memory_saving_min"] else "fail"}
            targets["amp_speedup"] = {"target": speed_target, "value": amp["speedup"],
                                      "status": "pass" if amp["speedup"] >= TARGETS["amp_speedup_min"] else "fail"}
        else:
            targets["amp_memory_saving"] = {"target": memory_target, "value": None, "status":
                                            "not measurable: the target is GPU memory and no GPU was used (CPU peak "
                                            "RSS is in the table)"}
            targets["amp_speedup"] = {"target": speed_target, "value": amp["speedup"], "status":
                                      "not measurable: CPU autocast is not what the target is about"}
    return targets


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    except OSError:
        return platform.processor() or "unknown CPU"


def hardware(device: torch.device) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.machine()}, {_cpu_model()})"
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ", no GPU used"
    return f"{cpu}{gpu}; torch {torch.__version__}; Python {platform.python_version()}"


def markdown_table(result: dict) -> str:
    rows = ["| config | epoch time | speed-up | peak memory | val IoU | IoU loss | change vs baseline |",
            "|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        rows.append(f"| {c['name']} | {c['epoch_seconds']:.2f} s | {c['speedup']:.1f}x | {c['peak_memory_mb']:.0f} MB | "
                    f"{c['val_iou']:.3f} | {100 * c['val_iou_loss']:.1f}% | {c['val_iou_loss_change_pp']:+.2f} pp |")
    lines = ["\n".join(rows), "", f"hardware: {result['hardware']}"]
    if result.get("amp_precision"):
        lines.append(f"training.use_amp trains in {result['amp_precision']} on this device")
    if result.get("extraction_images_per_second"):
        lines.append(f"cold-cache extraction: {result['extraction_images_per_second']:.2f} images/s")
    if result.get("head_only_epoch_seconds"):
        lines.append(f"head alone on features in memory: {result['head_only_epoch_seconds']:.2f} s per epoch")
    if result.get("extraction"):
        lines += ["", "extraction modes: " + extraction_table(result["extraction"]), ""]
    for key, t in result["targets"].items():
        value = "" if t["value"] is None else f" ({t['value']:.3g})"
        lines.append(f"target {key} {t['target']}: {t['status']}{value}")
    return "\n".join(lines)


def write_chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [c["name"] for c in result["configs"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(names, [c["epoch_seconds"] for c in result["configs"]], color="tab:blue")
    left.set_yscale("log")
    left.set_ylabel("training epoch (s, log scale)")
    right.bar(names, [c["val_iou"] for c in result["configs"]], color="tab:green")
    right.set_ylabel("validation IoU (refined boxes)")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
    fig.suptitle(result["hardware"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_suite(cfg: Config, device: torch.device, work: Path, debug: bool = False) -> dict:
    """All variants on one base config; returns the result document (see write_outputs)."""
    cache_dir = work / "features"
    runs, configs = {}, []
    cold = run_isolated(isolate(variant(cfg, "feature_cache"), work / "feature_cache_cold", cache_dir), device, debug)
    for name in VARIANTS:
        runs[name] = run_isolated(isolate(variant(cfg, name), work / name, cache_dir), device, debug)
        configs.append(summarise(name, runs[name]))
    epochs_time = sum(r["epoch_seconds"] + r["val_seconds"] for r in cold["history"])
    extracted = cold["cache_stats"]["extracted"] if cold["cache_stats"] else 0
    head = head_only_seconds(isolate(variant(cfg, "feature_cache"), work / "head", cache_dir), device,
                             cfg.training.epochs) if not debug else []
    extraction = measure_extraction(cfg, device, images=2 if debug else 4, rounds=1 if debug else 2,
                                    train_epochs=cfg.training.epochs, modes=suite_modes(device))
    return {"hardware": hardware(device), "device": str(device), "epochs": cfg.training.epochs,
            "amp_precision": amp_precision(device, True), "configs": compare(configs),
            "extraction_images_per_second": extracted / max(1e-9, cold["wall_seconds"] - epochs_time),
            "head_only_epoch_seconds": statistics.median(head) if head else None,
            "targets": {**evaluate_targets(configs, device.type), **extraction_targets(extraction, device.type)},
            "extraction": extraction}


def write_outputs(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "benchmark_results.json", "table": out_dir / "benchmark_results.md",
             "chart": out_dir / "benchmark_results.png"}
    write_json(paths["json"], result)
    paths["table"].write_text(markdown_table(result) + "\n")
    write_chart(result, paths["chart"])
    return paths
