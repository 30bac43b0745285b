"""Training: data and features prepared once, then a plain epoch loop.

    prepare_splits -> build_model -> FeatureSources (cache warm-up, or encoder in the loop)
    -> for each epoch: train_one_epoch, evaluate, log, save last/best, stop early on patience
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from boxrefiner.config import Config, ConfigError
from boxrefiner.data.layout import DataError
from boxrefiner.data.splits import SplitData, describe_layout, load_split
from boxrefiner.data.targets import InputSet, Targets, validation_inputs
from boxrefiner.features.encoder import resolved_precision
from boxrefiner.features.sources import FeatureSources
from boxrefiner.modeling.build import build_model
from boxrefiner.modeling.checkpoint import LAST, CheckpointError
from boxrefiner.modeling.head import BoxRefinementModule
from boxrefiner.training.checkpoint import CheckpointSaver, RunState
from boxrefiner.training.history import (
    RunHistory,
    epoch_summary,
    out_of_patience,
    write_skipped,
)
from boxrefiner.training.loop import train_one_epoch
from boxrefiner.training.precision import amp_precision
from boxrefiner.training.resume import restore, sample_digest, start_run
from boxrefiner.training.rng import seed_everything
from boxrefiner.training.runlock import RunLock
from boxrefiner.training.schedule import build_optimization, realign_schedule
from boxrefiner.training.validate import evaluate
from boxrefiner.training.visuals import RunVisuals
from boxrefiner.utils import distributed
from boxrefiner.utils.allocator import gc_paused
from boxrefiner.utils.files import append_jsonl, write_jsonl
from boxrefiner.utils.memo import FileMemo
from boxrefiner.utils.signals import Interrupted, StopRequest, stop_requested

log = logging.getLogger(__name__)


def train(cfg: Config, device: torch.device, resume: str | None = None, debug: bool = False,
          stop: StopRequest | None = None, allow_rollback: bool = False) -> RunHistory:
    """Run (or continue) training; returns the metrics of the epochs run now.

    Under torchrun every rank calls this: each trains on its share of every global batch
    (`training.batch_size` stays the global batch) through DistributedDataParallel, validates its
    shard, and rank 0 alone logs, writes metrics and checkpoints and holds the run folder's lock.

    Raises Interrupted after saving when `stop` was requested, TrainingError when it cannot go on."""
    device = distributed.init(device)
    cfg = resolved_precision(cfg, device)
    if cfg.training.batch_size % distributed.world():
        raise ConfigError(f"config key 'training.batch_size': {cfg.training.batch_size} is the global batch and must "
                          f"divide by the {distributed.world()} processes of this run")
    resumed = start_run(cfg, device, resume, allow_rollback)  # a bad file fails before any slow work
    if resumed is not None and already_done(cfg, resumed, str(resume)):
        return RunHistory()
    lock = RunLock(cfg.output.checkpoint_dir, cfg.output.save_dir) if distributed.is_main() else nullcontext()
    with lock:
        if stop is not None:
            stop.arm()  # from here on a signal stops at the next safe point: an extraction batch, a training step
        return _train_locked(cfg, device, resumed, resume, debug, stop)


def _train_locked(cfg: Config, device: torch.device, resumed: dict | None, resume: str | None, debug: bool,
                  stop: StopRequest | None) -> RunHistory:
    r = setup(cfg, device, resumed, resume, debug, stop)
    try:
        return _epochs(cfg, r, stop)
    finally:
        r.visuals.close()


def _epochs(cfg: Config, r: Run, stop: StopRequest | None) -> RunHistory:
    run, run_now = r.state, RunHistory()
    for epoch in range(run.start_epoch, cfg.training.epochs):
        continuing = run.partial if run.partial is not None and run.partial.epoch == epoch else None
        r.sources.train_sampler.set_epoch(epoch, skip=continuing.step * cfg.training.batch_size if continuing else 0)
        excluded = r.excluded()
        metrics, progress = train_one_epoch(r.net, r.sources.train, r.train_targets, r.optimizer, r.scheduler,
                                            r.scaler, cfg, r.precision, epoch, resume=continuing, stop=stop)
        run.partial = None
        if metrics is None:  # stopped inside the epoch
            raise Interrupted(stopped_by(stop), r.saver.save_partial(run, progress))
        record = {"epoch": epoch, **metrics,
                  **evaluate(r.model, r.sources.val, r.val_targets, r.val_inputs, cfg, r.precision,
                             r.visuals.pictured),
                  "lr": r.optimizer.param_groups[0]["lr"]}
        improved = run.record(record)
        log.info(epoch_summary(record, cfg.training.epochs, improved))
        run_now.append(record)
        stopping = distributed.any_rank(stop_requested(stop)) and epoch + 1 < cfg.training.epochs
        r.saver.save_epoch(run, epoch, improved, interrupted=stopping)
        if distributed.is_main():
            append_jsonl(r.metrics_path, record)
            if r.excluded() > excluded:  # a broken cache entry left an image out during the epoch
                write_skipped(r.skipped_path, r.train_split, r.val_split)
        r.visuals.epoch_done(run.history, record)
        if stopping:
            raise Interrupted(stopped_by(stop), r.saver.folder / LAST)
        if out_of_patience(cfg, epoch, run.best_epoch):
            log.info("stopping after epoch %d: no better validation (refined IoU averaged over the levels) for %d "
                     "epochs (training.patience); the best, %.3f, is epoch %d", epoch, cfg.training.patience,
                     run.best_iou, run.best_epoch)
            break
    finish(cfg, r, run_now)
    return run_now


@dataclass
class Run:
    """Everything a run builds before its first epoch."""
    train_split: SplitData
    val_split: SplitData
    model: BoxRefinementModule
    net: torch.nn.Module  # what trains: the model, or under torchrun its DistributedDataParallel wrapper
    precision: str
    sources: FeatureSources
    train_targets: Targets
    val_targets: Targets
    val_inputs: dict[str, InputSet]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    saver: CheckpointSaver
    state: RunState
    skipped_path: Path
    metrics_path: Path
    visuals: RunVisuals

    def excluded(self) -> int:
        return len(self.train_split.excluded) + len(self.val_split.excluded)


def setup(cfg: Config, device: torch.device, resumed: dict | None, resume: str | None, debug: bool,
          stop: StopRequest | None) -> Run:
    """Data, model, features, optimizer and (when resuming) the saved state, in the order that keeps a
    run's random draws the same cold or warm, resumed or not."""
    with gc_paused():  # linear in the images: see gc_paused
        train_split, val_split = prepare_splits(cfg, debug)
    samples = {split.split: sample_digest(split) for split in (train_split, val_split)}
    if resumed is not None and resumed["samples"] != samples:
        raise CheckpointError(f"resuming from {resume}: the images, objects or detections of the splits differ from "
                              "the run's (the debug image cap, data files or skipped images changed; or it was trained "
                              "before 0.4, which kept FungiTastic's CSV order where images now follow their file "
                              "names), so it cannot continue exactly; start a new run")
    seed_everything(cfg.training.seed)
    model = build_model(cfg).to(device)  # before feature extraction, which must not shift its initialisation
    net = wrap_for_ranks(model, device, cfg.training.seed)
    precision = amp_precision(device, cfg.training.use_amp)
    log.info("device %s; training precision %s (training.use_amp: %s)", device, precision,
             str(cfg.training.use_amp).lower())
    skipped_path = Path(cfg.output.save_dir) / "skipped.jsonl"
    sources = FeatureSources(cfg, device, train_split, val_split, precision, stop)  # may exclude samples
    if distributed.is_main():
        write_skipped(skipped_path, train_split, val_split)
    for split in (train_split, val_split):
        if not split.usable:
            raise DataError(f"split '{split.split}' has no usable images left (see {skipped_path})")
    train_targets, val_targets = Targets.of(train_split), Targets.of(val_split)
    optimizer, scheduler, scaler = build_optimization(cfg, model, len(sources.train), precision)
    log.info("model: %d trainable parameters, %d iterations, batch size %d, %d steps per epoch",
             sum(p.numel() for p in model.parameters()), cfg.refinement.max_iter, cfg.training.batch_size,
             len(sources.train))
    state = resume_state(cfg, resumed, str(resume), model, optimizer, scheduler, scaler, len(sources.train))
    metrics_path = Path(cfg.output.save_dir) / "metrics.jsonl"
    if distributed.is_main():
        write_jsonl(metrics_path, state.history)  # metrics.jsonl always equals the checkpoint's history, then grows
    saver = CheckpointSaver(cfg, device, model, optimizer, scheduler, scaler, sources.identity, samples)
    val_inputs = validation_inputs(cfg, val_targets)
    visuals = RunVisuals(cfg, val_split, val_inputs[""], state.start_epoch)
    return Run(train_split, val_split, model, net, precision, sources, train_targets, val_targets, val_inputs,
               optimizer, scheduler, scaler, saver, state, skipped_path, metrics_path, visuals)


def resume_state(cfg: Config, resumed: dict | None, resume: str, model: BoxRefinementModule,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                 scaler: torch.amp.GradScaler | None, steps_per_epoch: int) -> RunState:
    """A fresh run's state, or the checkpoint's restored into model, optimizer and schedule."""
    if resumed is None:
        last = Path(cfg.output.checkpoint_dir) / LAST
        if last.exists():
            log.warning("%s exists from an earlier run and will be replaced (resume from it to continue that run)",
                        last)
        return RunState()
    state = restore(resumed, resume, model, optimizer, scheduler, scaler)
    partial = state.partial
    realign_schedule(cfg, optimizer, scheduler, partial.epoch if partial else state.start_epoch,
                     partial.step if partial else 0, steps_per_epoch)
    where = f"epoch {partial.epoch}, step {partial.step}" if partial else f"epoch {state.start_epoch}"
    log.info("resumed from %s: continuing at %s of %d epochs", resume, where, cfg.training.epochs)
    return state


def extract_features(cfg: Config, device: torch.device, debug: bool = False,
                     stop: StopRequest | None = None) -> dict[str, int]:
    """Fill the feature cache for both splits and return (found, extracted): what training would do
    before its first epoch, alone or sharded across the ranks of a torchrun world."""
    device = distributed.init(device)
    cfg = resolved_precision(cfg, device)
    if not cfg.cache_enabled:
        raise ConfigError("extracting features needs the feature cache: set optimization.feature_cache.enabled: true")
    train_split, val_split = prepare_splits(cfg, debug)
    if stop is not None:
        stop.arm()
    sources = FeatureSources(cfg, device, train_split, val_split, "fp32", stop, extract_only=True)
    if distributed.is_main():
        write_skipped(Path(cfg.output.save_dir) / "skipped.jsonl", train_split, val_split)
    distributed.barrier()
    log.info("feature cache filled: %d entries were there, %d extracted (%d process(es)), in %s", sources.found,
             sources.extracted, distributed.world(), cfg.optimization.feature_cache.cache_dir)
    return {"found": sources.found, "extracted": sources.extracted}


def wrap_for_ranks(model: BoxRefinementModule, device: torch.device, seed: int) -> torch.nn.Module:
    """Under torchrun: DistributedDataParallel (rank 0's initial weights broadcast, gradients averaged),
    and each rank's own global RNG for dropout from here on (rank 0 keeps one process's)."""
    if distributed.world() == 1:
        return model
    if distributed.rank():
        seed_everything(seed + 7919 * distributed.rank())
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def prepare_splits(cfg: Config, debug: bool = False) -> tuple[SplitData, SplitData]:
    """Index both splits; train is sampled by data.sample_ratio, both capped by the debug image count."""
    cap = cfg.debug.max_samples if debug else None
    # what was read of unchanged files comes from the cache folder's memo (rank 0 alone records what it
    # reads); with the cache off every epoch reads the images anyway, and nothing is written there
    folder = cfg.optimization.feature_cache.cache_dir if cfg.cache_enabled else None
    memo = FileMemo.in_cache(folder, write=distributed.is_main()) if folder else FileMemo(None)
    train = load_split(cfg.data, cfg.data.train_split, sample_ratio=cfg.data.sample_ratio, max_samples=cap,
                       seed=cfg.training.seed, detections=cfg.data.train_detections, memo=memo,
                       digests=cfg.cache_enabled)
    val = load_split(cfg.data, cfg.data.val_split, max_samples=cap, seed=cfg.training.seed,
                     detections=cfg.data.val_detections, memo=memo, digests=cfg.cache_enabled)
    memo.close()
    if folder:
        log.info("start-up memo: %d of %d file reads remembered (unchanged since read)", memo.hits,
                 memo.hits + memo.misses)
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


def already_done(cfg: Config, resumed: dict, resume: str) -> bool:
    """Whether the checkpoint's run has nothing left to do under this config (said in the log)."""
    if resumed.get("partial_epoch"):
        return False
    done, best = int(resumed["epoch"]), int(resumed["best_epoch"])
    if done + 1 >= cfg.training.epochs:
        log.info("%s: this run already finished its %d epochs; raise training.epochs above %d to train further",
                 resume, done + 1, done + 1)
        return True
    if out_of_patience(cfg, done, best):
        log.info("%s: this run stopped early at epoch %d, %d epochs after its best (training.patience %d); "
                 "raise training.patience (0: never stop early) to train further", resume, done, done - best,
                 cfg.training.patience)
        return True
    return False


def stopped_by(stop: StopRequest | None) -> int:
    """The signal that stopped the run: this rank's, or under torchrun the one another rank received."""
    signum = distributed.first_set(stop.signum if stop is not None else None)
    assert signum is not None, "a stop was agreed without any rank's signal"
    return signum


def finish(cfg: Config, r: Run, run_now: RunHistory) -> None:
    """The run's last log lines: cache statistics and where the results are."""
    if cfg.cache_enabled:
        stats = run_now.cache_stats = r.sources.get_cache_stats()
        rate = "-" if stats["hit_rate"] is None else f"{100 * stats['hit_rate']:.1f}%"
        log.info("feature cache: warm-up found %d entries and extracted %d; training read %d features from the cache "
                 "and encoded %d (hit rate %s), %d healed, %.1f MiB read from disk", stats["found"], stats["extracted"],
                 stats["served"], stats["encoded"], rate, stats["healed"], stats["bytes_read"] / 2**20)
    run_now.best = r.state.best_record()
    if run_now:
        log.info("done: best val IoU %.3f at epoch %d; checkpoints in %s, metrics in %s", r.state.best_iou,
                 r.state.best_epoch, r.saver.folder, r.metrics_path)
