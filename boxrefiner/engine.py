"""Training and evaluation: data and features prepared once, then a plain epoch loop.

    prepare_splits -> build_model -> FeatureSources (cache warm-up, or encoder in the loop)
    -> for each epoch: train_one_epoch, evaluate, log metrics, save last/best checkpoints
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .boxes import box_iou, hflip_boxes, hflip_extent, jitter_boxes
from .checkpoint import BEST, LAST, CheckpointError, load_checkpoint, save_checkpoint
from .config import Config
from .data import DataError, Sample, SplitData, expected_layout, load_split
from .encoder import EMBED_DIM, autocast_context
from .features import FeatureBatches, FeatureSources
from .losses import refinement_loss
from .model import BoxRefinementModule
from .progress import progress

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_precision(device: torch.device, use_amp: bool) -> str:
    """The autocast dtype for training: bf16 where the hardware has it, else fp16 (CUDA only)."""
    if not use_amp:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


@dataclass
class Targets:
    """Per-sample ground truth in the normalised frame (pixels / longest side)."""
    boxes: torch.Tensor  # (N, 4)
    extent: torch.Tensor  # (N, 2) image width, height

    @classmethod
    def of(cls, samples: list[Sample]) -> "Targets":
        longest = torch.tensor([max(s.width, s.height) for s in samples], dtype=torch.float64)
        boxes = torch.tensor([s.box for s in samples], dtype=torch.float64) / longest[:, None]
        extent = torch.tensor([(s.width, s.height) for s in samples], dtype=torch.float64) / longest[:, None]
        return cls(boxes.float(), extent.float())


def prepare_splits(cfg: Config, debug: bool = False) -> tuple[SplitData, SplitData]:
    """Index both splits; train is sampled by data.sample_ratio, both capped by --debug."""
    cap = cfg.debug.max_samples if debug else None
    train = load_split(cfg.data, cfg.data.train_split, sample_ratio=cfg.data.sample_ratio, max_samples=cap,
                       seed=cfg.training.seed)
    val = load_split(cfg.data, cfg.data.val_split, max_samples=cap, seed=cfg.training.seed)
    for split in (train, val):
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(split.skipped.items())) or "none"
        log.info("%s split: %d samples used; skipped: %s", split.split, len(split.samples), reasons)
        if not split.samples:
            raise DataError(f"split '{split.split}' has no usable samples (skipped: {reasons}); {expected_layout(cfg.data)}")
    if cfg.data.sample_ratio is not None:
        log.info("data.sample_ratio=%g: training on a seeded random %d-image subset", cfg.data.sample_ratio,
                 len(train.samples))
    return train, val


def make_lr_lambda(cfg: Config, steps_per_epoch: int):
    """LR factor per optimizer step: linear warm-up, then cosine to 1% / step decay / constant."""
    t = cfg.training
    warmup = t.warmup_epochs * steps_per_epoch
    total = t.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.lr_scheduler == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
        if t.lr_scheduler == "step":
            return t.lr_gamma ** ((step // steps_per_epoch) // t.lr_step_epochs)
        return 1.0

    return factor


def build_model(cfg: Config) -> BoxRefinementModule:
    return BoxRefinementModule(**model_arguments(cfg))


def model_arguments(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return {"embed_dim": EMBED_DIM, "hidden_dim": m.hidden_dim, "num_heads": m.num_heads, "max_offset": m.max_offset,
            "max_iter": cfg.refinement.max_iter, "roi_size": m.roi_size, "context_scale": m.context_scale}


def train_one_epoch(model: BoxRefinementModule, loader: FeatureBatches, targets: Targets, optimizer, scheduler,
                    scaler: torch.amp.GradScaler | None, cfg: Config, precision: str, epoch: int) -> dict[str, float]:
    model.train()
    device = next(model.parameters()).device
    noise = cfg.data.box_noise
    generator = torch.Generator().manual_seed(cfg.training.seed * 100_003 + epoch)  # fresh jitter each epoch
    totals = {"loss": 0.0, "l1": 0.0, "giou": 0.0}
    seen = 0
    reads_before, healed_before = loader.cache_reads, loader.healed
    data_seconds = 0.0
    start = fetch = time.perf_counter()
    bar = progress(loader, desc=f"Epoch {epoch}", unit="batch", leave=False)
    for indices, features in bar:
        data_seconds += time.perf_counter() - fetch  # waiting for features: reading, or the encoder
        gt, extent = targets.boxes[indices], targets.extent[indices]
        inputs = jitter_boxes(gt, extent, noise.center_std, noise.scale_std, noise.max_sigma, generator)
        if cfg.training.hflip:
            flip = torch.rand(len(indices), generator=generator) < 0.5
            gt, inputs, extent = hflip_boxes(gt, flip), hflip_boxes(inputs, flip), hflip_extent(extent, flip)
            features = torch.where(flip.to(device)[:, None, None, None], features.flip(-1), features)
        gt, extent, inputs = gt.to(device), extent.to(device), inputs.to(device)
        with autocast_context(device, precision):
            iterations = model(features, inputs, extent)
        loss = refinement_loss(iterations, gt, cfg.loss.l1_weight, cfg.loss.iou_weight)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss.total).backward()
            scaler.unscale_(optimizer)
        else:
            loss.total.backward()
        if cfg.training.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        n = len(indices)
        seen += n
        for name, value in (("loss", loss.total), ("l1", loss.l1), ("giou", loss.giou)):
            totals[name] += value.item() * n
        cache = f"{100.0 * (loader.cache_reads - reads_before) / seen:.1f}%" if loader.from_cache else "off"
        bar.set_postfix(refresh=False, Loss=f"{totals['loss'] / seen:.4f}", L1=f"{totals['l1'] / seen:.4f}",
                        IoU=f"{totals['giou'] / seen:.4f}", Cache=cache)
        fetch = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    return {"train_loss": totals["loss"] / seen, "train_l1": totals["l1"] / seen, "train_giou_loss": totals["giou"] / seen,
            "epoch_seconds": seconds, "data_seconds": data_seconds, "samples_per_second": seen / seconds,
            "cache_hit_rate": (loader.cache_reads - reads_before) / seen if loader.from_cache else None,
            "cache_healed": loader.healed - healed_before}


def validation_inputs(cfg: Config, targets: Targets) -> torch.Tensor:
    """One fixed, seeded set of noisy validation boxes: numbers compare across epochs and runs."""
    noise = cfg.data.box_noise
    generator = torch.Generator().manual_seed(cfg.evaluation.noise_seed)
    return jitter_boxes(targets.boxes, targets.extent, noise.center_std, noise.scale_std, noise.max_sigma, generator)


@torch.no_grad()
def evaluate(model: BoxRefinementModule, loader: FeatureBatches, targets: Targets, inputs: torch.Tensor, cfg: Config,
             precision: str) -> dict[str, float]:
    """Loss on every iteration (as in training) and IoU of input vs refined boxes (with early stop)."""
    model.eval()
    device = next(model.parameters()).device
    iou_in, iou_out, losses = [], [], {"loss": 0.0, "l1": 0.0, "giou": 0.0}
    start = time.perf_counter()
    for indices, features in progress(loader, desc="Validating", unit="batch", leave=False):
        gt, extent, boxes = targets.boxes[indices].to(device), targets.extent[indices].to(device), inputs[indices].to(device)
        with autocast_context(device, precision):
            iterations = model(features, boxes, extent)
            refined = model(features, boxes, extent, stop_threshold=cfg.refinement.stop_threshold)[-1]
        loss = refinement_loss(iterations, gt, cfg.loss.l1_weight, cfg.loss.iou_weight)
        for name, value in (("loss", loss.total), ("l1", loss.l1), ("giou", loss.giou)):
            losses[name] += value.item() * len(indices)
        iou_in.append(box_iou(boxes, gt).cpu())
        iou_out.append(box_iou(refined.float(), gt).cpu())
    before, after = torch.cat(iou_in), torch.cat(iou_out)
    n = len(before)
    return {"val_loss": losses["loss"] / n, "val_l1": losses["l1"] / n, "val_giou_loss": losses["giou"] / n,
            "val_iou_input": before.mean().item(), "val_iou_refined": after.mean().item(),
            "val_worse_rate": (after < before - 1e-6).float().mean().item(),
            "val_iou75_input": (before >= 0.75).float().mean().item(),
            "val_iou75_refined": (after >= 0.75).float().mean().item(),
            "val_iou90_input": (before >= 0.9).float().mean().item(),
            "val_iou90_refined": (after >= 0.9).float().mean().item(),
            "val_seconds": time.perf_counter() - start}


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def restore(state: dict, path: str, model, optimizer, scheduler, scaler) -> tuple[int, float, int]:
    """Load a checkpoint's training state; returns (first epoch to run, best val IoU, its epoch)."""
    try:
        model.load_state_dict(state["model_state_dict"])
    except RuntimeError:
        raise CheckpointError(f"--resume {path}: its model does not match this config's model section "
                              f"(checkpoint: {state.get('model_args')})") from None
    optimizer.load_state_dict(state["optimizer_state_dict"])
    if state.get("scheduler_state_dict"):
        scheduler.load_state_dict(state["scheduler_state_dict"])
    if scaler is not None and state.get("scaler_state_dict"):
        scaler.load_state_dict(state["scaler_state_dict"])
    return int(state["epoch"]) + 1, float(state.get("best_val_iou", -1.0)), int(state.get("best_epoch", -1))


def epoch_summary(r: dict, epochs: int, improved: bool) -> str:
    cache = "off" if r["cache_hit_rate"] is None else f"{100 * r['cache_hit_rate']:.0f}%" + (
        f" ({r['cache_healed']} healed)" if r["cache_healed"] else "")
    return (f"epoch {r['epoch']}/{epochs - 1}  loss {r['train_loss']:.4f} (L1 {r['train_l1']:.4f}, GIoU "
            f"{r['train_giou_loss']:.4f})  val loss {r['val_loss']:.4f}  IoU {r['val_iou_input']:.3f} -> "
            f"{r['val_iou_refined']:.3f}  worse {100 * r['val_worse_rate']:.0f}%  {r['epoch_seconds']:.1f}s train "
            f"({r['samples_per_second']:.0f} samples/s, {r['data_seconds']:.1f}s waiting for features), "
            f"{r['val_seconds']:.1f}s val, cache {cache}" + ("  *best*" if improved else ""))


def train(cfg: Config, device: torch.device, resume: str | None = None, debug: bool = False) -> list[dict]:
    """Run (or continue) training; returns the metrics of the epochs run now."""
    resumed = load_checkpoint(resume) if resume else None  # a bad file fails before any slow work
    train_split, val_split = prepare_splits(cfg, debug)
    seed_everything(cfg.training.seed)
    model = build_model(cfg).to(device)  # before feature extraction, which must not shift its initialisation
    precision = amp_precision(device, cfg.training.use_amp)
    log.info("device %s; training precision %s%s", device, precision,
             " (training.use_amp: true)" if cfg.training.use_amp else " (training.use_amp: false)")
    sources = FeatureSources(cfg, device, train_split, val_split, precision)
    train_targets, val_targets = Targets.of(train_split.samples), Targets.of(val_split.samples)
    val_inputs = validation_inputs(cfg, val_targets)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate,
                                  weight_decay=cfg.training.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(cfg, len(sources.train)))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    log.info("model: %d trainable parameters, %d iterations, batch size %d, %d steps per epoch",
             sum(p.numel() for p in model.parameters()), cfg.refinement.max_iter, cfg.training.batch_size,
             len(sources.train))

    ckpt_dir, metrics_path = Path(cfg.output.checkpoint_dir), Path(cfg.output.save_dir) / "metrics.jsonl"
    start_epoch, best_iou, best_epoch = 0, -1.0, -1
    if resumed is not None:
        start_epoch, best_iou, best_epoch = restore(resumed, resume, model, optimizer, scheduler, scaler)
        log.info("resumed from %s: continuing at epoch %d of %d", resume, start_epoch, cfg.training.epochs)
    else:
        if (ckpt_dir / LAST).exists():
            log.warning("%s exists from an earlier run and will be replaced (use --resume to continue it)", ckpt_dir / LAST)
        metrics_path.unlink(missing_ok=True)

    history = []
    for epoch in range(start_epoch, cfg.training.epochs):
        sources.train_sampler.set_epoch(epoch)
        record = {"epoch": epoch}
        record.update(train_one_epoch(model, sources.train, train_targets, optimizer, scheduler, scaler, cfg,
                                      precision, epoch))
        record.update(evaluate(model, sources.val, val_targets, val_inputs, cfg, precision))
        record["lr"] = optimizer.param_groups[0]["lr"]
        improved = record["val_iou_refined"] > best_iou
        if improved:
            best_iou, best_epoch = record["val_iou_refined"], epoch
        log.info(epoch_summary(record, cfg.training.epochs, improved))
        _append_jsonl(metrics_path, record)
        history.append(record)
        state = {"epoch": epoch, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                 "scheduler_state_dict": scheduler.state_dict(),
                 "scaler_state_dict": scaler.state_dict() if scaler is not None else None,
                 "train_loss": record["train_loss"], "val_loss": record["val_loss"],
                 "val_iou_refined": record["val_iou_refined"], "best_val_iou": best_iou, "best_epoch": best_epoch,
                 "config": cfg.to_dict(), "model_args": model_arguments(cfg),
                 "encoder": dataclasses.asdict(sources.identity), "version": __version__}
        save_checkpoint(state, ckpt_dir / LAST)
        if improved:
            save_checkpoint(state, ckpt_dir / BEST)
    if cfg.cache_enabled:
        stats = sources.get_cache_stats()
        log.info("feature cache: %d hits, %d misses (extracted), hit rate %.1f%%, %d healed, %.1f MiB read from disk",
                 stats["hits"], stats["misses"], 100 * stats["hit_rate"], stats["healed"], stats["bytes_read"] / 2**20)
    if history:
        log.info("done: best val IoU %.3f at epoch %d; checkpoints in %s, metrics in %s", best_iou, best_epoch,
                 ckpt_dir, metrics_path)
    return history
