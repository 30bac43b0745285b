"""One training epoch: the step inputs drawn from the epoch's own generator, the loss, the optimizer
step, and the running totals an interrupted epoch resumes from."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from boxrefiner.boxes import (
    hflip_boxes,
    hflip_extent,
    jitter_with_levels,
)
from boxrefiner.config import Config
from boxrefiner.data.targets import Targets, detection_inputs, noise_table
from boxrefiner.errors import TrainingError
from boxrefiner.features.encoder import EMBED_DIM, PATCH, autocast_context
from boxrefiner.features.sources import FeatureBatch, FeatureBatches
from boxrefiner.modeling.losses import LossParts, refinement_loss
from boxrefiner.utils import distributed
from boxrefiner.utils.progress import progress
from boxrefiner.utils.signals import StopRequest, stop_requested

log = logging.getLogger(__name__)


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

    def add(self, loss: LossParts, objects: int) -> None:
        """Count a finite step's losses, weighted by its objects."""
        self.seen += objects
        for name, value in loss.named():
            self.totals[name] += value.item() * objects

    def postfix(self, loader: FeatureBatches, reads_before: int) -> dict[str, str]:
        """The progress bar's running means and cache hit rate."""
        seen = max(1, self.seen)
        reads = self.cache_reads + loader.cache_reads - reads_before
        cache = f"{100.0 * reads / self.fetched:.1f}%" if loader.from_cache else "off"
        return {"Loss": f"{self.totals['loss'] / seen:.4f}", "L1": f"{self.totals['l1'] / seen:.4f}",
                "IoU": f"{self.totals['giou'] / seen:.4f}", "Cache": cache}

    def metrics(self, from_cache: bool) -> dict:
        """The finished epoch's line of metrics.jsonl (training part)."""
        seen = max(1, self.seen)
        return {"train_loss": self.totals["loss"] / seen, "train_l1": self.totals["l1"] / seen,
                "train_giou_loss": self.totals["giou"] / seen, "train_quality_error": self.totals["quality"] / seen,
                "epoch_seconds": self.seconds, "data_seconds": self.data_seconds,
                "samples_per_second": self.seen / self.seconds,
                "cache_hit_rate": self.cache_reads / max(1, self.fetched) if from_cache else None,
                "cache_healed": self.healed, "nonfinite_steps": self.nonfinite_steps}


def train_one_epoch(model: torch.nn.Module, loader: FeatureBatches, targets: Targets,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                    scaler: torch.amp.GradScaler | None, cfg: Config, precision: str, epoch: int,
                    resume: EpochProgress | None = None, stop: StopRequest | None = None) -> tuple[dict | None, EpochProgress]:
    """One pass over the training split. Returns (metrics, progress); metrics is None when a stop
    request ended the epoch early, and progress then says where to continue."""
    model.train()
    device = next(model.parameters()).device
    state = resume or EpochProgress(epoch)
    # fresh jitter each epoch, and on each rank of a torchrun world its own (rank 0 draws as one process)
    generator = torch.Generator().manual_seed(cfg.training.seed * 100_003 + epoch + 1_000_003_000 * distributed.rank())
    if state.jitter_state is not None:
        generator.set_state(state.jitter_state)
    reads_before, healed_before = loader.cache_reads, loader.healed
    guard = NonFiniteGuard(cfg.training.max_nonfinite_steps)
    stopped = False
    start = fetch = time.perf_counter()
    bar = progress(loader, desc=f"Epoch {epoch}", unit="batch", leave=False, initial=state.step, total=len(loader))
    for batch in bar:
        state.data_seconds += time.perf_counter() - fetch  # waiting for features: reading, or the encoder
        objects = len(batch)
        if not objects and distributed.world() == 1:  # every object was left out: the schedule still counts the step
            scheduler.step()
            state.step += 1
            fetch = time.perf_counter()
            continue
        state.fetched += objects
        # under torchrun a rank whose objects were all left out still takes the step (zero weight), or
        # the others would wait for its gradients
        step = training_inputs(batch, targets, cfg, generator, device) if objects else null_inputs(cfg, device)
        with autocast_context(device, precision):
            trajectory = model(step.features, step.inputs, step.extent, image_index=step.image_index)
        loss = training_loss(trajectory, step.truth, cfg)
        optimizer.zero_grad(set_to_none=True)
        finite, weight = agree(loss.total, objects)
        if guard.finite(finite, epoch, state):
            optimizer_step(model, optimizer, scaler, loss.total * weight if weight != 1.0 else loss.total,
                           cfg.training.grad_clip)
            state.add(loss, objects)
        if objects:
            bar.set_postfix(refresh=False, **state.postfix(loader, reads_before))
        scheduler.step()
        state.step += 1
        stopped = distributed.any_rank(stop_requested(stop)) and state.step < len(loader)  # every rank at this step
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
    return (None if stopped else world_metrics(state, loader.from_cache)), state


def world_metrics(state: EpochProgress, from_cache: bool) -> dict:
    """The epoch's metrics over every rank's objects (one process: its own)."""
    if distributed.world() == 1:
        return state.metrics(from_cache)
    names = list(state.totals)
    summed = distributed.sum_all([state.totals[n] for n in names] + [state.seen, state.fetched, state.cache_reads,
                                                                    state.healed])
    seen, fetched, reads, healed = (int(v) for v in summed[len(names):])
    merged = dataclasses.replace(state, totals=dict(zip(names, summed[:len(names)])), seen=seen, fetched=fetched,
                                 cache_reads=reads, healed=healed)
    return merged.metrics(from_cache)


@dataclass
class StepInputs:
    """One training step's tensors on the model's device: the objects' maps, their jittered input boxes
    (boxes_per_object rows per object), the truth and image extent per row, and which map each row reads."""
    features: torch.Tensor
    inputs: torch.Tensor
    truth: torch.Tensor
    extent: torch.Tensor
    image_index: torch.Tensor | None


def training_inputs(batch: FeatureBatch, targets: Targets, cfg: Config, generator: torch.Generator,
                    device: torch.device) -> StepInputs:
    """The step's inputs, every random draw from the epoch's own generator in a fixed order (flip,
    channel dropout, jitter, detections), so a resumed epoch draws what the uninterrupted one did."""
    indices, features = batch.objects, batch.features
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
    inputs = jitter_with_levels(gt, extent, noise_table(cfg.data.noise_levels), generator)  # fresh boxes per copy
    if found is not None and targets.has_detection is not None:
        boxes, use = detection_inputs(found, targets.has_detection[indices], copies, extent, cfg, generator)
        inputs = torch.where(use[:, None], boxes, inputs)
    per_image = None if batch.one_per_image and copies == 1 else batch.image_index.repeat_interleave(copies).to(device)
    return StepInputs(features, inputs.to(device), gt.to(device), extent.to(device), per_image)


def agree(loss: torch.Tensor, objects: int) -> tuple[bool, float]:
    """(whether every rank's loss is finite, this rank's loss weight). DDP averages the ranks'
    gradients; weighting each rank's mean loss by its share of the step's objects makes that the
    gradient of the mean over all of them, as one process computes it. One process: (finite, 1)."""
    finite = bool(torch.isfinite(loss))
    if distributed.world() == 1:
        return finite, 1.0
    bad, total = distributed.sum_all([float(not finite), float(objects)])
    return bad == 0, objects * distributed.world() / total if total else 0.0


def null_inputs(cfg: Config, device: torch.device) -> StepInputs:
    """One zero map and one box: a step that changes nothing (its loss is weighted 0)."""
    grid = cfg.hqsam.input_size // PATCH
    box = torch.tensor([[0.25, 0.25, 0.75, 0.75]], device=device)
    return StepInputs(torch.zeros((1, EMBED_DIM, grid, grid), device=device), box, box.clone(),
                      torch.ones((1, 2), device=device), None)


class NonFiniteGuard:
    """Skips steps whose loss is NaN/inf (they would poison the weights) and stops the run after
    `limit` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def finite(self, finite: bool, epoch: int, state: EpochProgress) -> bool:
        """`finite`: the step's loss is finite (on every rank: they skip the same steps)."""
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        state.nonfinite_steps += 1
        log.warning("epoch %d step %d: non-finite loss, step skipped (%d in a row)", epoch, state.step, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise TrainingError(f"the loss was not finite for {self.in_a_row} consecutive steps (epoch {epoch}, step "
                                f"{state.step}); lower training.learning_rate, keep training.grad_clip > 0 or set "
                                "training.use_amp: false. The last good checkpoint was kept")
        return False


def drop_channels(features: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Dropout2d drawn from the epoch's own generator, not the global RNG: a run with the cache off, or
    resumed inside an epoch, draws the same channels as one that was not."""
    keep = torch.rand(features.shape[0], features.shape[1], 1, 1, generator=generator) >= rate
    return features.float() * (keep.to(features.device, torch.float32) / (1 - rate))


def training_loss(trajectory, target: torch.Tensor, cfg: Config):
    c = cfg.loss
    return refinement_loss(trajectory, target, c.l1_weight, c.iou_weight, c.quality_weight, c.quality_pair_weight)


def optimizer_step(model: torch.nn.Module, optimizer, scaler, loss: torch.Tensor, grad_clip: float) -> None:
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
