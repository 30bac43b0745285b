"""Training and evaluation: data and features prepared once, then a plain epoch loop.

    prepare_splits -> build_model -> FeatureSources (cache warm-up, or encoder in the loop)
    -> for each epoch: train_one_epoch, evaluate, log metrics, save last/best checkpoints
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from . import __version__
from .boxes import (
    box_iou,
    clip_boxes,
    hflip_boxes,
    hflip_extent,
    iou_summary,
    jitter_boxes,
    jitter_draws,
    jitter_with_levels,
)
from .checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    config_changes,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import DETECTIONS_LEVEL, BoxNoiseConfig, Config
from .data import DataError, SplitData, describe_layout, load_split
from .encoder import EMBED_DIM, EncoderIdentity, autocast_context, encoder_identity
from .features import FeatureBatches, FeatureSources
from .fileio import append_jsonl, first_line, write_jsonl
from .losses import refinement_loss
from .model import BoxRefinementModule
from .progress import progress
from .runlock import RunLock
from .signals import Interrupted, StopRequest, stop_requested

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX-512 and newer). Without them CPU autocast
    emulates bf16: a `vit_tiny` forward at 512 took 11.5 s instead of 0.8 s in float32 (2 cores of an
    AVX2-only AMD EPYC, torch 2.14)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else True
    except RuntimeError:
        return True


def amp_precision(device: torch.device, use_amp: bool) -> str:
    """The autocast dtype for training: bf16 where the hardware has it, else fp16 (CUDA) or fp32 (CPU)."""
    if not use_amp:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if cpu_has_bf16():
        return "bf16"
    log.warning("training.use_amp: this CPU (%s) has no bfloat16 kernels, where autocast runs many times slower "
                "than float32; training in fp32", torch.backends.cpu.get_cpu_capability())
    return "fp32"


@dataclass
class Targets:
    """Per-object ground truth in the normalised frame (pixels / longest side of the object's image)."""
    boxes: torch.Tensor  # (N, 4)
    extent: torch.Tensor  # (N, 2) the image's width, height
    detections: torch.Tensor | None = None  # (N, 4) the matched detector box (the truth where there is none)
    has_detection: torch.Tensor | None = None  # (N,) bool

    @classmethod
    def of(cls, split: SplitData) -> Targets:
        images = [split.images[o.image] for o in split.objects]
        longest = split.longest_sides()[:, None]
        boxes = torch.tensor([o.box for o in split.objects], dtype=torch.float64).reshape(-1, 4) / longest
        extent = torch.tensor([(i.width, i.height) for i in images], dtype=torch.float64).reshape(-1, 2) / longest
        if not split.detections:
            return cls(boxes.float(), extent.float())
        matched = sorted(split.detections)
        has = torch.zeros(len(split.objects), dtype=torch.bool)
        has[matched] = True
        found = boxes.clone()
        found[matched] = torch.tensor([split.detections[k] for k in matched], dtype=torch.float64) / longest[matched]
        return cls(boxes.float(), extent.float(), clip_boxes(found, extent).float(), has)


def prepare_splits(cfg: Config, debug: bool = False) -> tuple[SplitData, SplitData]:
    """Index both splits; train is sampled by data.sample_ratio, both capped by --debug (counting images)."""
    cap = cfg.debug.max_samples if debug else None
    train = load_split(cfg.data, cfg.data.train_split, sample_ratio=cfg.data.sample_ratio, max_samples=cap,
                       seed=cfg.training.seed, detections=cfg.data.train_detections)
    val = load_split(cfg.data, cfg.data.val_split, max_samples=cap, seed=cfg.training.seed,
                     detections=cfg.data.val_detections)
    for split in (train, val):
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(split.skipped.items())) or "none"
        log.info("%s split: %d objects on %d images used; skipped: %s", split.split, len(split.objects),
                 len(split.images), reasons)
        if not split.objects:
            raise DataError(f"split '{split.split}' has no usable objects (skipped: {reasons}); "
                            f"{describe_layout(cfg.data)}")
    if cfg.data.sample_ratio is not None:
        log.info("data.sample_ratio=%g: training on a seeded random %d-image subset", cfg.data.sample_ratio,
                 len(train.images))
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


def build_optimization(cfg: Config, model: BoxRefinementModule, steps_per_epoch: int, precision: str):
    """AdamW, the per-step LR schedule, and a GradScaler for fp16 autocast (None otherwise)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate,
                                  weight_decay=cfg.training.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return optimizer, scheduler, scaler


def model_arguments(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return {"embed_dim": EMBED_DIM, "hidden_dim": m.hidden_dim, "num_heads": m.num_heads, "max_offset": m.max_offset,
            "max_iter": cfg.refinement.max_iter, "roi_size": m.roi_size, "context_scale": m.context_scale,
            "quality_head": True, "dropout": m.dropout, "context_layers": m.context_layers, "context_dim": m.context_dim}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); one-line message."""


@dataclass
class EpochProgress:
    """How far an epoch has got; saved in an interrupted checkpoint so the epoch continues exactly."""
    epoch: int
    step: int = 0
    fetched: int = 0  # samples taken from the loader
    seen: int = 0  # samples that contributed a finite loss
    totals: dict = field(default_factory=lambda: {"loss": 0.0, "l1": 0.0, "giou": 0.0, "quality": 0.0})
    seconds: float = 0.0
    data_seconds: float = 0.0
    cache_reads: int = 0
    healed: int = 0
    nonfinite_steps: int = 0
    jitter_state: torch.Tensor | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_one_epoch(model: BoxRefinementModule, loader: FeatureBatches, targets: Targets, optimizer, scheduler,
                    scaler: torch.amp.GradScaler | None, cfg: Config, precision: str, epoch: int,
                    resume: EpochProgress | None = None, stop: StopRequest | None = None) -> tuple[dict | None, EpochProgress]:
    """One pass over the training split. Returns (metrics, progress); metrics is None when a stop
    request ended the epoch early, and progress then says where to continue."""
    model.train()
    device = next(model.parameters()).device
    levels = noise_table(cfg.data.noise_levels)
    state = resume or EpochProgress(epoch)
    generator = torch.Generator().manual_seed(cfg.training.seed * 100_003 + epoch)  # fresh jitter each epoch
    if state.jitter_state is not None:
        generator.set_state(state.jitter_state)
    reads_before, healed_before = loader.cache_reads, loader.healed
    consecutive_nonfinite = 0
    stopped = False
    start = fetch = time.perf_counter()
    bar = progress(loader, desc=f"Epoch {epoch}", unit="batch", leave=False, initial=state.step, total=len(loader))
    for batch in bar:
        state.data_seconds += time.perf_counter() - fetch  # waiting for features: reading, or the encoder
        if not len(batch):  # every object of this batch was left out: the schedule still counts the step
            scheduler.step()
            state.step += 1
            fetch = time.perf_counter()
            continue
        indices, features = batch.objects, batch.features
        state.fetched += len(indices)
        copies = cfg.training.boxes_per_object
        gt, extent = targets.boxes[indices], targets.extent[indices]
        found = targets.detections[indices] if targets.detections is not None else None
        if cfg.training.hflip:  # one draw per image: its objects (and their detections) mirror with it
            flip_image = torch.rand(len(features), generator=generator) < 0.5
            flip = flip_image[batch.image_index]
            gt, extent = hflip_boxes(gt, flip), hflip_extent(extent, flip)
            found = hflip_boxes(found, flip) if found is not None else None
            features = torch.where(flip_image.to(device)[:, None, None, None], features.flip(-1), features)
        if cfg.training.feature_dropout > 0:
            features = drop_channels(features, cfg.training.feature_dropout, generator)
        gt, extent = gt.repeat_interleave(copies, 0), extent.repeat_interleave(copies, 0)
        inputs = jitter_with_levels(gt, extent, levels, generator)  # fresh, independent boxes for every copy
        if found is not None and targets.has_detection is not None:
            boxes, use = detection_inputs(found, targets.has_detection[indices], copies, extent, cfg, generator)
            inputs = torch.where(use[:, None], boxes, inputs)
        per_image = None if batch.one_per_image and copies == 1 else batch.image_index.repeat_interleave(copies).to(device)
        gt, extent, inputs = gt.to(device), extent.to(device), inputs.to(device)
        with autocast_context(device, precision):
            trajectory = model(features, inputs, extent, image_index=per_image)
        loss = training_loss(trajectory, gt, cfg)
        optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss.total):
            consecutive_nonfinite = 0
            optimizer_step(model, optimizer, scaler, loss.total, cfg.training.grad_clip)
            n = len(indices)
            state.seen += n
            for name, value in (("loss", loss.total), ("l1", loss.l1), ("giou", loss.giou), ("quality", loss.quality)):
                state.totals[name] += value.item() * n
        else:  # skip the step: a NaN/inf loss would poison the weights
            consecutive_nonfinite += 1
            state.nonfinite_steps += 1
            log.warning("epoch %d step %d: non-finite loss, step skipped (%d in a row)", epoch, state.step,
                        consecutive_nonfinite)
            if consecutive_nonfinite >= cfg.training.max_nonfinite_steps:
                raise TrainingError(f"the loss was not finite for {consecutive_nonfinite} consecutive steps (epoch "
                                    f"{epoch}, step {state.step}); lower training.learning_rate, keep "
                                    "training.grad_clip > 0 or set training.use_amp: false. The last good "
                                    "checkpoint was kept")
        scheduler.step()
        state.step += 1
        seen = max(1, state.seen)
        reads = state.cache_reads + loader.cache_reads - reads_before
        cache = f"{100.0 * reads / state.fetched:.1f}%" if loader.from_cache else "off"
        bar.set_postfix(refresh=False, Loss=f"{state.totals['loss'] / seen:.4f}", L1=f"{state.totals['l1'] / seen:.4f}",
                        IoU=f"{state.totals['giou'] / seen:.4f}", Cache=cache)
        stopped = stop_requested(stop) and state.step < len(loader)
        if stopped:
            break
        fetch = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    bar.close()
    state.seconds += time.perf_counter() - start
    state.cache_reads += loader.cache_reads - reads_before
    state.healed += loader.healed - healed_before
    state.jitter_state = generator.get_state()
    if stopped:
        return None, state
    seen = max(1, state.seen)
    return {"train_loss": state.totals["loss"] / seen, "train_l1": state.totals["l1"] / seen,
            "train_giou_loss": state.totals["giou"] / seen, "train_quality_error": state.totals["quality"] / seen,
            "epoch_seconds": state.seconds,
            "data_seconds": state.data_seconds, "samples_per_second": state.seen / state.seconds,
            "cache_hit_rate": state.cache_reads / max(1, state.fetched) if loader.from_cache else None,
            "cache_healed": state.healed, "nonfinite_steps": state.nonfinite_steps}, state


def detection_inputs(found: torch.Tensor, has: torch.Tensor, copies: int, extent: torch.Tensor, cfg: Config,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Detector boxes as training inputs: (boxes (N * copies, 4), which rows take them), from the
    objects' matched detections `found` (N, 4) and which objects have one, `has` (N,). Each copy of an
    object with a detection takes it with probability data.detection_mix, with data.detection_noise
    jitter on top; the other rows keep their jittered truth."""
    boxes = found.repeat_interleave(copies, 0)
    use = (torch.rand(len(boxes), generator=generator) < cfg.data.detection_mix) & has.repeat_interleave(copies)
    noise = cfg.data.detection_noise
    if noise is not None:
        boxes = jitter_boxes(boxes, extent, noise.center_std, noise.scale_std, noise.max_sigma, generator)
    return boxes, use


def drop_channels(features: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Dropout2d drawn from the epoch's own generator, not the global RNG: a run with the cache off, or
    resumed inside an epoch, draws the same channels as one that was not."""
    keep = torch.rand(features.shape[0], features.shape[1], 1, 1, generator=generator) >= rate
    return features.float() * (keep.to(features.device, torch.float32) / (1 - rate))


def training_loss(trajectory, target: torch.Tensor, cfg: Config):
    c = cfg.loss
    return refinement_loss(trajectory, target, c.l1_weight, c.iou_weight, c.quality_weight, c.quality_pair_weight)


def optimizer_step(model: BoxRefinementModule, optimizer, scaler, loss: torch.Tensor, grad_clip: float) -> None:
    """Backward, optional gradient clipping, step; under fp16 AMP the GradScaler skips inf/NaN gradients."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def noise_table(levels) -> list[tuple[float, float, float, float]]:
    return [(n.center_std, n.scale_std, n.max_sigma, n.weight) for n in levels]


@dataclass
class InputSet:
    """Validation input boxes of a split's objects: (M, 4) normalised boxes ordered by their object
    (`owner`), any number per object (none, for an object without a detection)."""
    boxes: torch.Tensor
    owner: torch.Tensor  # (M,) object index, non-decreasing
    offsets: torch.Tensor  # (N + 1,) rows of object k: offsets[k]:offsets[k + 1]

    @classmethod
    def per_object(cls, boxes: torch.Tensor) -> InputSet:
        """From (N, J, 4): J boxes of every object."""
        n, j = boxes.shape[:2]
        return cls(boxes.reshape(-1, 4), torch.arange(n).repeat_interleave(j), torch.arange(n + 1) * j)

    @classmethod
    def of_some(cls, boxes: torch.Tensor, owner: torch.Tensor, objects: int) -> InputSet:
        """From one (M, 4) box per listed (increasing) object."""
        counts = torch.bincount(owner, minlength=objects)
        return cls(boxes, owner, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))

    def rows(self, objects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the given objects' boxes, and each row's position in `objects`."""
        starts, counts = self.offsets[objects], self.offsets[objects + 1] - self.offsets[objects]
        position = torch.arange(len(objects)).repeat_interleave(counts)
        first = (counts.cumsum(0) - counts).repeat_interleave(counts)
        return starts.repeat_interleave(counts) + torch.arange(int(counts.sum())) - first, position


def validation_inputs(cfg: Config, targets: Targets) -> dict[str, InputSet]:
    """Fixed, seeded noisy validation boxes, so numbers compare across epochs and runs. The run's own
    (`evaluation.box_noise`, name "", one per object: as earlier versions),
    `evaluation.boxes_per_level` per object for each `evaluation.levels` entry (seeded by its name),
    so that a level's numbers rest on several hundred boxes, not one per image, and the matched
    detector boxes ("detections", with data.val_detections)."""
    own = cfg.evaluation.own_noise(cfg.data)
    sets = {"": (own.center_std, own.scale_std, own.max_sigma, 1)}
    sets.update({name: (center, scale, BoxNoiseConfig().max_sigma, cfg.evaluation.boxes_per_level)
                 for name, (center, scale) in cfg.evaluation.levels.items()})
    inputs = {}
    for name, (center, scale, sigma, count) in sets.items():
        seed = cfg.evaluation.noise_seed if not name else cfg.evaluation.noise_seed * 1000 + zlib.crc32(name.encode()) % 1000
        generator = torch.Generator().manual_seed(seed)
        inputs[name] = InputSet.per_object(jitter_draws(targets.boxes, targets.extent, center, scale, sigma, count,
                                                        generator))
    if targets.has_detection is not None and targets.detections is not None:
        owner = targets.has_detection.nonzero().flatten()
        inputs[DETECTIONS_LEVEL] = InputSet.of_some(targets.detections[owner], owner, len(targets.boxes))
    return inputs


def metric_name(key: str, level: str) -> str:
    return f"val_{key}_{level}" if level else f"val_{key}"


@torch.no_grad()
def evaluate(model: BoxRefinementModule, loader: FeatureBatches, targets: Targets, inputs: dict[str, InputSet],
             cfg: Config, precision: str) -> dict[str, float | None]:
    """The loss on every iteration of the run's own validation boxes (as in training), then, for each
    set of input boxes, what inference returns (early stop, gate) against the input: IoUs, share
    made worse, and how well the predicted IoU ranks the boxes. Counts objects (boxes), not images."""
    model.eval()
    device = next(model.parameters()).device
    names = list(inputs)
    found: dict[str, list[list[torch.Tensor]]] = {name: [[], [], []] for name in names}  # before, after, predicted
    losses = {"loss": 0.0, "l1": 0.0, "giou": 0.0, "quality": 0.0}
    start, n = time.perf_counter(), 0
    for batch in progress(loader, desc="Validating", unit="batch", leave=False):
        if not len(batch):
            continue
        objects = batch.objects
        gt, extent = targets.boxes[objects].to(device), targets.extent[objects].to(device)
        image_index = batch.image_index.to(device)
        rows = [inputs[name].rows(objects) for name in names]
        # every set's boxes of one object side by side, objects in batch order: J boxes per image in a
        # row is what lets the head read each map once (and gives the same boxes as one set at a time)
        position = torch.cat([p for _, p in rows])
        order = torch.argsort(position, stable=True)
        boxes = torch.cat([inputs[name].boxes[r] for name, (r, _) in zip(names, rows)])[order].to(device)
        which = torch.cat([torch.full((len(r),), k) for k, (r, _) in enumerate(rows)])[order]
        position = position[order].to(device)
        with autocast_context(device, precision):
            maps = model.context_maps(batch.features)  # once for both passes
            own = inputs[""].boxes[objects].to(device)
            trajectory = model(maps, own, extent, widened=True, image_index=None if batch.one_per_image else image_index)
            loss = training_loss(trajectory, gt, cfg)
            result = model(maps, boxes, extent[position], stop_threshold=cfg.refinement.stop_threshold,
                           image_index=image_index[position], widened=True)
        chosen, predicted, _ = result.select(cfg.refinement.gate, cfg.refinement.keep_margin)
        truth = gt[position]
        before, after = box_iou(boxes, truth).cpu(), box_iou(chosen, truth).cpu()
        predicted = predicted.float().cpu() if predicted is not None else None
        for k, name in enumerate(names):
            mine = which == k
            found[name][0].append(before[mine])
            found[name][1].append(after[mine])
            if predicted is not None:
                found[name][2].append(predicted[mine])
        for name, value in (("loss", loss.total), ("l1", loss.l1), ("giou", loss.giou), ("quality", loss.quality)):
            losses[name] += value.item() * len(objects)
        n += len(objects)
    if not n:
        raise DataError("no validation object is left (every image was excluded); see skipped.jsonl")
    record: dict[str, float | None] = {"val_loss": losses["loss"] / n, "val_l1": losses["l1"] / n,
                                       "val_giou_loss": losses["giou"] / n, "val_quality_error": losses["quality"] / n}
    for name, (before_parts, after_parts, predicted_parts) in found.items():
        summary = iou_summary(torch.cat(before_parts), torch.cat(after_parts),
                              torch.cat(predicted_parts) if predicted_parts else None)
        record.update({metric_name(key, name): value for key, value in summary.items()})
    # the selection metric: the levels' mean, with the detector's own boxes as one more level
    levels = [cast(float, record[metric_name("iou_refined", name)]) for name in names if name]  # a mean: never None
    record["val_iou_refined_levels"] = sum(levels) / len(levels) if levels else record["val_iou_refined"]
    record["val_seconds"] = time.perf_counter() - start
    return record


RESUME_KEYS = {"scheduler_state_dict": dict, "rng": dict, "history": list, "best_val_iou": float, "best_epoch": int,
               "encoder": dict, "config": dict, "samples": dict}


def check_resume(state: dict, path: str, cfg: Config, device: torch.device) -> None:
    """Refuse a checkpoint this tool cannot continue, and config changes that make a different model
    or data (before any slow work); log the allowed changes."""
    for key, kind in RESUME_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"--resume {path}: not a resumable checkpoint of this tool (no valid '{key}')")
    if isinstance(state.get("model_args"), dict) and set(state["model_args"]) != set(model_arguments(cfg)):
        raise CheckpointError(f"--resume {path}: written by an earlier version of the tool whose model differs "
                              "(e.g. no quality head); it can still refine boxes, but training cannot continue from "
                              "it: start a new run")
    allowed, refused = config_changes(state["config"], cfg.to_dict())
    if refused:
        key, change = refused[0].split(": ", 1)
        raise CheckpointError(f"--resume {path}: config key '{key}' changed ({change}); that changes the model or "
                              "the data, so the run cannot continue: restore it, or start a new run without --resume")
    partial = state.get("partial_epoch")
    if partial and state["config"]["training"]["batch_size"] != cfg.training.batch_size:
        raise CheckpointError(f"--resume {path}: the run was interrupted inside epoch {partial['epoch']}; keep "
                              f"training.batch_size {state['config']['training']['batch_size']} to finish that epoch")
    identity = encoder_identity(cfg.hqsam, memo_dir=cfg.optimization.feature_cache.cache_dir)
    if state["encoder"].get("weights") != identity.weights:
        raise CheckpointError(f"--resume {path}: hqsam.checkpoint has other content than the run was trained with")
    try:
        trained = EncoderIdentity(**state["encoder"])
    except TypeError:
        raise CheckpointError(f"--resume {path}: its encoder identity is not one this version knows") from None
    if trained.key != identity.key:
        raise CheckpointError(f"--resume {path}: this version of the tool computes other features for "
                              f"{trained.model_type} than the run was trained on ({trained.short()}, preprocessing "
                              f"'{trained.preprocess}', revision '{trained.revision or 'none'}'); start a new run")
    for change in allowed:
        log.info("resume: %s (allowed)", change)
    if state.get("device") and state["device"] != str(device):
        log.info("resume: device %s -> %s (allowed)", state["device"], device)


def restore(state: dict, path: str, model, optimizer, scheduler, scaler) -> tuple[int, float, int, list[dict], EpochProgress | None]:
    """Load a checkpoint's training state; returns (first epoch to run, best val IoU, its epoch,
    metrics history, progress inside an interrupted epoch)."""
    try:
        model.load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer_state_dict"])
        scheduler.load_state_dict(state["scheduler_state_dict"])
        if scaler is not None and state.get("scaler_state_dict"):
            scaler.load_state_dict(state["scaler_state_dict"])
        set_rng_state(state["rng"])
        partial = EpochProgress(**state["partial_epoch"]) if state.get("partial_epoch") else None
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:  # weights of another shape, another version
        raise CheckpointError(f"--resume {path}: its saved state does not fit this model and version of the tool "
                              f"({first_line(exc, 300)})") from None
    return (int(state["epoch"]) + 1, float(state["best_val_iou"]), int(state["best_epoch"]), list(state["history"]),
            partial)


def realign_schedule(cfg: Config, optimizer, scheduler, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> None:
    """After a resume: the config's learning rate and weight decay, and the schedule's position counted
    in this run's steps per epoch (a changed batch size changes it), rule from here on."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.training.learning_rate
        group["weight_decay"] = cfg.training.weight_decay
    scheduler.base_lrs = [cfg.training.learning_rate] * len(optimizer.param_groups)
    scheduler.last_epoch = epoch * steps_per_epoch + step_in_epoch
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = cfg.training.learning_rate * factor(scheduler.last_epoch)


def all_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


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


def check_rollback(state: dict, path: str, cfg: Config, allow: bool) -> None:
    """Refuse to resume from a checkpoint older than the run folder's newest work (e.g. --resume
    best_model.pth while last.pth is further on): that would replace last.pth and cut metrics.jsonl."""
    ckpt_dir = Path(cfg.output.checkpoint_dir)
    last = ckpt_dir / LAST
    done = int(state["epoch"])
    later: list[str] = []
    if last.is_file() and last.resolve() != Path(path).resolve():
        newest = load_checkpoint(last)
        if int(newest.get("global_step", -1)) > int(state.get("global_step", -1)):
            later.append(f"{last} (epoch {int(newest['epoch'])})")
    extra = [r for r in read_metrics(Path(cfg.output.save_dir) / "metrics.jsonl")
             if isinstance(r.get("epoch"), int) and r["epoch"] > done]
    if extra:
        later.append(f"epochs {extra[0]['epoch']}-{extra[-1]['epoch']} of metrics.jsonl")
    if not later:
        return
    what = " and ".join(later)
    if not allow:
        raise CheckpointError(f"--resume {path} goes back to epoch {done}: it would replace {what}; pass "
                              f"--allow-rollback to do that, or resume from {last}")
    log.warning("--allow-rollback: resuming from epoch %d of %s replaces %s", done, path, what)


def start_run(cfg: Config, device: torch.device, resume: str | None, allow_rollback: bool) -> dict | None:
    """Checks before any slow work: the checkpoint to resume (readable, resumable, no lost work)."""
    resumed = load_checkpoint(resume) if resume else None
    if resumed is not None:
        assert resume is not None
        check_resume(resumed, resume, cfg, device)
        check_rollback(resumed, resume, cfg, allow_rollback)
    return resumed


def train(cfg: Config, device: torch.device, resume: str | None = None, debug: bool = False,
          stop: StopRequest | None = None, allow_rollback: bool = False) -> RunHistory:
    """Run (or continue) training; returns the metrics of the epochs run now.

    Raises Interrupted after saving when `stop` was requested, TrainingError when it cannot go on."""
    resumed = start_run(cfg, device, resume, allow_rollback)  # a bad file fails before any slow work
    if resumed is not None and not resumed.get("partial_epoch"):
        done = int(resumed["epoch"])
        if done + 1 >= cfg.training.epochs:
            log.info("%s: this run already finished its %d epochs; pass --epochs N (N > %d) to train further",
                     resume, done + 1, done + 1)
            return RunHistory()
        if out_of_patience(cfg, done, int(resumed["best_epoch"])):
            log.info("%s: this run stopped early at epoch %d, %d epochs after its best (training.patience %d); "
                     "raise training.patience (0: never stop early) to train further", resume, done,
                     done - int(resumed["best_epoch"]), cfg.training.patience)
            return RunHistory()
    with RunLock(cfg.output.checkpoint_dir, cfg.output.save_dir):
        if stop is not None:
            stop.arm()  # from here on a signal stops at the next safe point: an extraction batch, a training step
        return _train_locked(cfg, device, resumed, resume, debug, stop)


def _train_locked(cfg: Config, device: torch.device, resumed: dict | None, resume: str | None, debug: bool,
                  stop: StopRequest | None) -> RunHistory:
    train_split, val_split = prepare_splits(cfg, debug)
    samples = {split.split: sample_digest(split) for split in (train_split, val_split)}
    if resumed is not None and resumed["samples"] != samples:
        raise CheckpointError(f"--resume {resume}: the images, objects or detections of the splits differ from the "
                              "run's (--debug, data files or skipped images changed; or it was trained before 0.4, "
                              "which kept FungiTastic's CSV order where images now follow their file names), so it "
                              "cannot continue exactly; start a new run")
    seed_everything(cfg.training.seed)
    model = build_model(cfg).to(device)  # before feature extraction, which must not shift its initialisation
    precision = amp_precision(device, cfg.training.use_amp)
    log.info("device %s; training precision %s%s", device, precision,
             " (training.use_amp: true)" if cfg.training.use_amp else " (training.use_amp: false)")
    skipped_path = Path(cfg.output.save_dir) / "skipped.jsonl"
    sources = FeatureSources(cfg, device, train_split, val_split, precision, stop)  # may exclude samples
    write_skipped(skipped_path, train_split, val_split)
    for split in (train_split, val_split):
        if not split.usable:
            raise DataError(f"split '{split.split}' has no usable images left (see {skipped_path})")
    train_targets, val_targets = Targets.of(train_split), Targets.of(val_split)
    val_inputs = validation_inputs(cfg, val_targets)

    optimizer, scheduler, scaler = build_optimization(cfg, model, len(sources.train), precision)
    log.info("model: %d trainable parameters, %d iterations, batch size %d, %d steps per epoch",
             sum(p.numel() for p in model.parameters()), cfg.refinement.max_iter, cfg.training.batch_size,
             len(sources.train))

    ckpt_dir, metrics_path = Path(cfg.output.checkpoint_dir), Path(cfg.output.save_dir) / "metrics.jsonl"
    start_epoch, best_iou, best_epoch, partial = 0, -1.0, -1, None
    history: list[dict] = []
    if resumed is not None:
        start_epoch, best_iou, best_epoch, history, partial = restore(resumed, str(resume), model, optimizer,
                                                                      scheduler, scaler)
        realign_schedule(cfg, optimizer, scheduler, partial.epoch if partial else start_epoch,
                         partial.step if partial else 0, len(sources.train))
        where = f"epoch {partial.epoch}, step {partial.step}" if partial else f"epoch {start_epoch}"
        log.info("resumed from %s: continuing at %s of %d epochs", resume, where, cfg.training.epochs)
    elif (ckpt_dir / LAST).exists():
        log.warning("%s exists from an earlier run and will be replaced (use --resume to continue it)", ckpt_dir / LAST)
    write_jsonl(metrics_path, history)  # metrics.jsonl always equals the checkpoint's history, then grows

    def snapshot(last_done: int, progress_state: EpochProgress | None = None, interrupted: bool = False) -> dict:
        last = history[-1] if history else {}
        return {"epoch": last_done, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict(),
                "scaler_state_dict": scaler.state_dict() if scaler is not None else None,
                "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"),
                "val_iou_refined": last.get("val_iou_refined"), "best_val_iou": best_iou, "best_epoch": best_epoch,
                "global_step": scheduler.last_epoch, "history": history, "config": cfg.to_dict(),
                "model_args": model_arguments(cfg), "encoder": dataclasses.asdict(sources.identity),
                "rng": rng_state(), "device": str(device), "samples": samples, "version": __version__,
                "interrupted": interrupted or progress_state is not None,
                "partial_epoch": progress_state.as_dict() if progress_state is not None else None}

    def save(state: dict, *names: str) -> None:
        if not all_finite(model):  # never replace a good checkpoint with NaN weights
            raise TrainingError("the model's weights are no longer finite; the last good checkpoint was kept")
        for name in names:
            save_checkpoint(state, ckpt_dir / name)

    run_now = RunHistory()
    for epoch in range(start_epoch, cfg.training.epochs):
        continuing = partial if partial is not None and partial.epoch == epoch else None
        sources.train_sampler.set_epoch(epoch, skip=continuing.step * cfg.training.batch_size if continuing else 0)
        excluded = len(train_split.excluded) + len(val_split.excluded)
        metrics, progress_state = train_one_epoch(model, sources.train, train_targets, optimizer, scheduler, scaler,
                                                  cfg, precision, epoch, resume=continuing, stop=stop)
        partial = None
        if metrics is None:  # stopped inside the epoch
            save(snapshot(epoch - 1, progress_state), LAST)
            assert stop is not None and stop.signum is not None
            raise Interrupted(stop.signum, ckpt_dir / LAST)
        record = {"epoch": epoch, **metrics, **evaluate(model, sources.val, val_targets, val_inputs, cfg, precision)}
        record["lr"] = optimizer.param_groups[0]["lr"]
        improved = improves(record["val_iou_refined_levels"], best_iou, best_epoch)
        if improved:
            best_iou, best_epoch = record["val_iou_refined_levels"], epoch
        log.info(epoch_summary(record, cfg.training.epochs, improved))
        history.append(record)
        run_now.append(record)
        stopping = stop_requested(stop) and epoch + 1 < cfg.training.epochs
        state = snapshot(epoch, interrupted=stopping)
        save(state, BEST, LAST) if improved else save(state, LAST)  # best first: a kill between leaves it current
        append_jsonl(metrics_path, record)
        if len(train_split.excluded) + len(val_split.excluded) > excluded:
            write_skipped(skipped_path, train_split, val_split)
        if stopping:
            assert stop is not None and stop.signum is not None
            raise Interrupted(stop.signum, ckpt_dir / LAST)
        if out_of_patience(cfg, epoch, best_epoch):
            log.info("stopping after epoch %d: no better validation (refined IoU averaged over the levels) for %d "
                     "epochs (training.patience); the best, %.3f, is epoch %d", epoch, cfg.training.patience,
                     best_iou, best_epoch)
            break
    if cfg.cache_enabled:
        stats = run_now.cache_stats = sources.get_cache_stats()
        rate = "-" if stats["hit_rate"] is None else f"{100 * stats['hit_rate']:.1f}%"
        log.info("feature cache: warm-up found %d entries and extracted %d; training read %d features from the cache "
                 "and encoded %d (hit rate %s), %d healed, %.1f MiB read from disk", stats["found"], stats["extracted"],
                 stats["served"], stats["encoded"], rate, stats["healed"], stats["bytes_read"] / 2**20)
    run_now.best = next((r for r in history if r.get("epoch") == best_epoch), None)
    if run_now:
        log.info("done: best val IoU %.3f at epoch %d; checkpoints in %s, metrics in %s", best_iou, best_epoch,
                 ckpt_dir, metrics_path)
    return run_now


def sample_digest(split: SplitData) -> str:
    """Names the exact images, objects and matched detections a split trains or validates on (for one
    object per image and no detections, the list of image names, as versions before 0.4 did)."""
    lines = [s.file_name for s in split.images]
    if len(split.objects) != len(split.images) or split.detections:
        lines += [f"{o.image} {o.box}" for o in split.objects]
        lines += [f"{k} {box}" for k, box in sorted(split.detections.items())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def write_skipped(path: Path, *splits: SplitData) -> None:
    """<save_dir>/skipped.jsonl: one line per image, object or detection left out (file name, split,
    reason, and the annotation, line or row where there is one)."""
    records = [{"file_name": r["file_name"], "split": split.split, **{k: v for k, v in r.items() if k != "file_name"}}
               for split in splits for r in split.skipped_files]
    write_jsonl(path, records)
    if records:
        log.info("%d skipped images, objects or detections listed in %s", len(records), path)
