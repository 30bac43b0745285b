"""How fast each encoder mode extracts, what it does to the features, and (optionally) to the refiner.

    boxrefiner bench extract --config configs/demo.yaml [--images 8] [--rounds 2] [--train-epochs 0]

For each mode (precision, attention path, channels-last, torch.compile, storage dtype):

- the bare encoder's images/s on already preprocessed batches (`hqsam.batch_size`), timed just before
  and just after the pipeline and averaged,
- the extraction pipeline's images/s: decode, preprocess, encode and write entries into a fresh cache,
  exactly as training's warm-up does, and its share of the encoder's (the median of the rounds'),
- the deviation of the stored features from fp32's (max and mean |difference|),
- with `--train-epochs E`, the validation IoU of a refiner trained E epochs on that mode's features.

The modes take turns round by round, so a machine whose speed drifts favours none; every ratio is
against fp32 with the library's own attention (the tool as it extracted before 0.8).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from boxrefiner.bench.epoch import isolated_outputs
from boxrefiner.config import Config, replace
from boxrefiner.data.images import load_rgb
from boxrefiner.features.cache import FeatureCache
from boxrefiner.features.encoder import ImageEncoder, build_encoder, encoder_identity, preprocess
from boxrefiner.features.sources import extract
from boxrefiner.features.storage import STORAGE_DTYPES, Storage
from boxrefiner.training.trainer import prepare_splits, train

log = logging.getLogger(__name__)

REFERENCE = "fp32"
# per device type: the fastest mode's encoder speed-up over fp32, and the pipeline's share of the encoder's
TARGETS = {"cpu": {"speedup": 1.7, "pipeline": 0.95}, "cuda": {"speedup": 5.0, "pipeline": 0.90}}
MODES: dict[str, dict] = {  # hqsam keys, and the storage dtype under "storage"
    "fp32": {"precision": "fp32", "attention": "original"},
    "fp32 sdpa": {"precision": "fp32", "attention": "sdpa"},
    "bf16": {"precision": "bf16", "attention": "original"},
    "bf16 sdpa": {"precision": "bf16", "attention": "sdpa"},
    "bf16 channels-last": {"precision": "bf16", "attention": "original", "channels_last": True},
    "bf16 sdpa channels-last": {"precision": "bf16", "attention": "sdpa", "channels_last": True},
    "bf16 sdpa compile": {"precision": "bf16", "attention": "sdpa", "compile": True},
    "fp16 sdpa": {"precision": "fp16", "attention": "sdpa"},
    "bf16 channels-last, int8 storage": {"precision": "bf16", "attention": "original", "channels_last": True,
                                         "storage": "int8"},
}


def mode_config(cfg: Config, mode: str) -> Config:
    settings = dict(MODES[mode])
    storage = settings.pop("storage", cfg.optimization.feature_cache.storage_dtype)
    cfg = replace(cfg, "hqsam", **{"compile": False, "channels_last": False, **settings})
    return replace(cfg, "optimization", feature_cache=dataclasses.replace(cfg.optimization.feature_cache,
                                                                          storage_dtype=storage))


def deviation(values: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far features are from the reference's: max and mean |difference|."""
    difference = np.abs(values.astype(np.float32) - reference.astype(np.float32))
    return {"max_abs_deviation": float(difference.max()), "mean_abs_deviation": float(difference.mean())}


def storage_deviation(cfg: Config, count: int = 8) -> dict[str, dict]:
    """What each storage dtype does to the fp32 embeddings of `count` training images (the config's
    encoder on the CPU, in fp32)."""
    train_split, _ = prepare_splits(cfg)
    hqsam = dataclasses.replace(cfg.hqsam, precision="fp32")
    encoder = build_encoder(hqsam, torch.device("cpu"), encoder_identity(hqsam))
    images = torch.stack([preprocess(load_rgb(s.image_path), cfg.hqsam.input_size) for s in train_split.images[:count]])
    features = encoder.encode(images).numpy()
    result: dict[str, dict] = {}
    for dtype in STORAGE_DTYPES:
        storage = Storage(dtype, features.shape[1:])
        result[dtype] = {"images": len(images), "feature_abs_max": float(np.abs(features).max()),
                         **deviation(np.stack([storage.round_trip(f) for f in features]), features)}
    return result


def bare_seconds(encoder: ImageEncoder, batches: list[torch.Tensor]) -> tuple[float, np.ndarray]:
    """Seconds to encode every batch (after one warm-up batch: compilation, allocator), and the embeddings."""
    encoder.encode(batches[0])
    synchronise(encoder.device)
    start = time.perf_counter()
    out = [encoder.encode(batch) for batch in batches]
    synchronise(encoder.device)  # CUDA runs asynchronously: time the work, not its launch
    return time.perf_counter() - start, torch.cat(out).cpu().numpy()


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pipeline_seconds(cfg: Config, encoder: ImageEncoder, folder: Path, records, round_: int) -> float:
    """Seconds for training's extraction of `records` into a fresh cache (decode, preprocess, encode, write)."""
    cache_cfg = cfg.optimization.feature_cache
    cache = FeatureCache(folder / f"round{round_}", "bench", encoder.identity, cache_cfg.storage_dtype)
    keys = [cache.key_for(f"{r.file_name}-{k}") for k, r in enumerate(records)]
    start = time.perf_counter()
    result = extract(cache, records, keys, list(range(len(records))), encoder, cfg.hqsam.batch_size,
                     cfg.data.num_workers)
    seconds = time.perf_counter() - start
    cache.manifest.close()
    if result.failed:
        raise RuntimeError(f"extraction failed for {len(result.failed)} images: {sorted(result.failed.values())[:3]}")
    return seconds


def trained_iou(cfg: Config, epochs: int, folder: Path, device: torch.device) -> dict:
    """The best validation of a refiner trained `epochs` epochs on this mode's features (cache in `folder`)."""
    cfg = isolated_outputs(cfg, folder)
    cfg = replace(cfg, "optimization", feature_cache=dataclasses.replace(cfg.optimization.feature_cache,
                                                                          cache_dir=str(folder / "features")))
    cfg = replace(cfg, "training", epochs=epochs, patience=0)
    history = train(cfg, device)
    best = history.best or history[-1]
    return {"val_iou_input": best["val_iou_input"], "val_iou_refined": best["val_iou_refined"],
            "val_iou_refined_levels": best["val_iou_refined_levels"], "best_epoch": best["epoch"]}


def measure(cfg: Config, device: torch.device, images: int, rounds: int, train_epochs: int = 0,
            modes: list[str] | None = None) -> dict:
    """The extraction table: every mode's throughput, deviation and (train_epochs > 0) refiner IoU."""
    modes = modes or list(MODES)
    train_split, _ = prepare_splits(cfg)
    records = train_split.images[:images]
    batch = cfg.hqsam.batch_size
    tensors = [preprocess(load_rgb(r.image_path), cfg.hqsam.input_size) for r in records]
    batches = [torch.stack(tensors[k:k + batch]) for k in range(0, len(tensors), batch)]
    encoders = {}
    for mode in modes:
        mode_cfg = mode_config(cfg, mode)
        encoders[mode] = (mode_cfg, build_encoder(mode_cfg.hqsam, device, encoder_identity(mode_cfg.hqsam)))
    bare: dict[str, list[float]] = {m: [] for m in modes}
    pipeline: dict[str, list[float]] = {m: [] for m in modes}
    features: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="boxrefiner-bench-extract-") as tmp:
        for round_ in range(rounds):
            for mode in modes:
                mode_cfg, encoder = encoders[mode]
                before, out = bare_seconds(encoder, batches)
                pipeline[mode].append(pipeline_seconds(mode_cfg, encoder, Path(tmp) / mode.replace(" ", "_"),
                                                       records, round_))
                after, _ = bare_seconds(encoder, batches)  # the encoder on both sides: a drifting machine cancels
                bare[mode].append((before + after) / 2)
                storage = Storage(mode_cfg.optimization.feature_cache.storage_dtype, out.shape[1:])
                features[mode] = np.stack([storage.round_trip(f) for f in out])
                log.info("round %d/%d, %s: encoder %.3f then %.3f images/s, pipeline %.3f images/s between them",
                         round_ + 1, rounds, mode, len(records) / before, len(records) / after,
                         len(records) / pipeline[mode][-1])
        rows: dict[str, dict] = {}
        for mode in modes:
            rows[mode] = {"bare_images_per_second": len(records) / statistics.median(bare[mode]),
                          "pipeline_images_per_second": len(records) / statistics.median(pipeline[mode]),
                          **deviation(features[mode], features.get(REFERENCE, features[mode]))}
            if train_epochs:
                rows[mode]["refiner"] = trained_iou(encoders[mode][0], train_epochs,
                                                    Path(tmp) / ("train_" + mode.replace(" ", "_")), device)
    base = rows.get(REFERENCE)
    for mode, row in rows.items():  # each round's pipeline against the same round's encoder: drift cancels
        row["pipeline_over_bare_rounds"] = [b / p for b, p in zip(bare[mode], pipeline[mode])]
        row["pipeline_over_bare"] = statistics.median(row["pipeline_over_bare_rounds"])
        if base is not None:
            row["bare_speedup"] = row["bare_images_per_second"] / base["bare_images_per_second"]
            row["pipeline_speedup"] = row["pipeline_images_per_second"] / base["pipeline_images_per_second"]
            if "refiner" in row and "refiner" in base:
                row["refiner"]["refined_vs_fp32"] = row["refiner"]["val_iou_refined"] - base["refiner"]["val_iou_refined"]
    return {"model_type": cfg.hqsam.model_type, "input_size": cfg.hqsam.input_size, "batch_size": batch,
            "images": len(records), "rounds": rounds, "device": str(device), "modes": rows}


def targets(result: dict, device_type: str) -> dict[str, dict]:
    """pass / fail of the extraction targets (the fastest mode against fp32; the pipeline in every mode)."""
    goal = TARGETS.get(device_type)
    rows = result["modes"]
    if goal is None or REFERENCE not in rows or len(rows) < 2:
        return {}
    fastest = max(rows, key=lambda m: rows[m]["bare_speedup"])
    slowest_pipeline = min(rows, key=lambda m: rows[m]["pipeline_over_bare"])
    speedup, share = rows[fastest]["bare_speedup"], rows[slowest_pipeline]["pipeline_over_bare"]
    return {"extraction_fastest_speedup": {"target": f">= {goal['speedup']:g}x fp32 ({fastest})", "value": speedup,
                                           "status": "pass" if speedup >= goal["speedup"] else "fail"},
            "extraction_pipeline_over_encoder": {"target": f">= {100 * goal['pipeline']:g}% in every mode "
                                                           f"(lowest: {slowest_pipeline})", "value": share,
                                                 "status": "pass" if share >= goal["pipeline"] else "fail"}}


def share(row: dict) -> str:
    """The pipeline's share of the encoder: the median, and the rounds' range."""
    rounds = row.get("pipeline_over_bare_rounds") or []
    spread = f" ({100 * min(rounds):.0f}-{100 * max(rounds):.0f}%)" if len(rounds) > 1 else ""
    return f"{100 * row['pipeline_over_bare']:.0f}%{spread}"


def markdown_table(result: dict) -> str:
    """The modes as a markdown table, ratios against fp32."""
    trained = any("refiner" in r for r in result["modes"].values())
    head = ["mode", "encoder img/s", "vs fp32", "pipeline img/s", "vs fp32", "pipeline / encoder (rounds)", "max dev",
            "mean dev"] + (["val IoU input -> refined", "refined vs fp32"] if trained else [])
    lines = [f"{result['model_type']} at {result['input_size']}, batch {result['batch_size']}, {result['images']} "
             f"images x {result['rounds']} rounds on {result['device']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, r in result["modes"].items():
        cells = [mode, f"{r['bare_images_per_second']:.3f}", f"{r.get('bare_speedup', 1):.2f}x",
                 f"{r['pipeline_images_per_second']:.3f}", f"{r.get('pipeline_speedup', 1):.2f}x",
                 share(r), f"{r['max_abs_deviation']:.4f}", f"{r['mean_abs_deviation']:.5f}"]
        if trained:
            fit = r.get("refiner")
            cells += [f"{fit['val_iou_input']:.3f} -> {fit['val_iou_refined']:.3f}", f"{fit.get('refined_vs_fp32', 0):+.3f}"]\
                if fit else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
