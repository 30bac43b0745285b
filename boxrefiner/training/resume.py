"""What a checkpoint must satisfy before a run continues from it: a resumable file of this tool, the
same model, data and encoder features, no newer work replaced; and loading its state back."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from boxrefiner.config import Config, fold_aliases
from boxrefiner.data.splits import SplitData
from boxrefiner.features.encoder import (
    EncoderIdentity,
    encoder_identity,
)
from boxrefiner.modeling.build import model_arguments
from boxrefiner.modeling.checkpoint import (
    LAST,
    CheckpointError,
    load_checkpoint,
)
from boxrefiner.training.checkpoint import RunState
from boxrefiner.training.history import read_metrics
from boxrefiner.training.loop import EpochProgress
from boxrefiner.training.rng import set_rng_state
from boxrefiner.utils import distributed
from boxrefiner.utils.files import first_line

log = logging.getLogger(__name__)


class RollbackRefused(CheckpointError):
    """Resuming would replace newer work of the run folder (allowed only when asked for)."""


RESUME_KEYS = {"scheduler_state_dict": dict, "rng": dict, "history": list, "best_val_iou": float, "best_epoch": int,
               "encoder": dict, "config": dict, "samples": dict}


def check_resume(state: dict, path: str, cfg: Config, device: torch.device) -> None:
    """Refuse a checkpoint this tool cannot continue, and config changes that make a different model
    or data (before any slow work); log the allowed changes."""
    for key, kind in RESUME_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"resuming from {path}: not a resumable checkpoint of this tool (no valid '{key}')")
    if isinstance(state.get("model_args"), dict) and set(state["model_args"]) != set(model_arguments(cfg)):
        raise CheckpointError(f"resuming from {path}: written by an earlier version of the tool whose model differs "
                              "(e.g. no quality head); it can still refine boxes, but training cannot continue from "
                              "it: start a new run")
    allowed, refused = config_changes(state["config"], cfg.to_dict())
    if refused:
        key, change = refused[0].split(": ", 1)
        hint = (" (hqsam.precision auto chooses by the device: set the run's precision explicitly to continue it here)"
                if key == "hqsam.precision" else "")
        raise CheckpointError(f"resuming from {path}: config key '{key}' changed ({change}){hint}; that changes the model "
                              "or the data, so the run cannot continue: restore it, or start a new run")
    partial = state.get("partial_epoch")
    same_world = int(state.get("world_size") or 1) == distributed.world()
    if partial and same_world and state["config"]["training"]["batch_size"] != cfg.training.batch_size:
        raise CheckpointError(f"resuming from {path}: the run was interrupted inside epoch {partial['epoch']}; keep "
                              f"training.batch_size {state['config']['training']['batch_size']} to finish that epoch")
    identity = encoder_identity(cfg.hqsam, memo_dir=cfg.optimization.feature_cache.cache_dir)
    if state["encoder"].get("weights") != identity.weights:
        raise CheckpointError(f"resuming from {path}: hqsam.checkpoint has other content than the run was trained with")
    try:
        trained = EncoderIdentity(**state["encoder"])
    except TypeError:
        raise CheckpointError(f"resuming from {path}: its encoder identity is not one this version knows") from None
    if trained.key != identity.key:
        raise CheckpointError(f"resuming from {path}: this version of the tool computes other features for "
                              f"{trained.model_type} than the run was trained on ({trained.short()}, preprocessing "
                              f"'{trained.preprocess}', revision '{trained.revision or 'none'}'); start a new run")
    for change in allowed:
        log.info("resume: %s (allowed)", change)
    if state.get("device") and state["device"] != str(device):
        log.info("resume: device %s -> %s (allowed)", state["device"], device)


def restore(state: dict, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler | None) -> RunState:
    """Load a checkpoint's training state into the run's objects and RNGs; returns where the run stands."""
    try:
        model.load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer_state_dict"])
        scheduler.load_state_dict(state["scheduler_state_dict"])
        if scaler is not None and state.get("scaler_state_dict"):
            scaler.load_state_dict(state["scaler_state_dict"])
        partial = restore_rank_state(state, path)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:  # weights of another shape, another version
        raise CheckpointError(f"resuming from {path}: its saved state does not fit this model and version of the "
                              f"tool ({first_line(exc, 300)})") from None
    return RunState(int(state["epoch"]) + 1, float(state["best_val_iou"]), int(state["best_epoch"]),
                    list(state["history"]), partial)


def restore_rank_state(state: dict, path: str) -> EpochProgress | None:
    """This rank's RNGs and position inside an interrupted epoch. The same number of processes as
    wrote the checkpoint continues exactly; another number continues from the epoch boundary (the
    interrupted epoch from its start, with the saved weights), as the log says."""
    written_by, now = int(state.get("world_size") or 1), distributed.world()
    if written_by == now:
        mine = state["ranks"][distributed.rank()] if state.get("ranks") else state
        set_rng_state(mine["rng"])
        return EpochProgress(**mine["partial_epoch"]) if mine.get("partial_epoch") else None
    if distributed.is_main():
        set_rng_state(state["rng"])
    where = (f"epoch {int(state['epoch']) + 1} from its start (it was interrupted inside; not bit-exact)"
             if state.get("partial_epoch") else f"epoch {int(state['epoch']) + 1}")
    log.info("resume: %s was written by %d process(es), this run has %d: it continues at the epoch boundary, %s",
             path, written_by, now, where)
    return None


def check_rollback(state: dict, path: str, cfg: Config, allow: bool) -> None:
    """Refuse to resume from a checkpoint older than the run folder's newest work (e.g. from
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
        raise RollbackRefused(f"resuming from {path} goes back to epoch {done}: it would replace {what}; allow the "
                              f"rollback to do that, or resume from {last}")
    log.warning("rollback allowed: resuming from epoch %d of %s replaces %s", done, path, what)


def start_run(cfg: Config, device: torch.device, resume: str | None, allow_rollback: bool) -> dict | None:
    """Checks before any slow work: the checkpoint to resume (readable, resumable, no lost work)."""
    resumed = load_checkpoint(resume) if resume else None
    if resumed is not None:
        assert resume is not None
        check_resume(resumed, resume, cfg, device)
        check_rollback(resumed, resume, cfg, allow_rollback)
    return resumed


def sample_digest(split: SplitData) -> str:
    """Names the exact images, objects and matched detections a split trains or validates on (for one
    object per image and no detections, the list of image names, as versions before 0.4 did)."""
    lines = [s.file_name for s in split.images]
    if len(split.objects) != len(split.images) or split.detections:
        lines += [f"{o.image} {o.box}" for o in split.objects]
        lines += [f"{k} {box}" for k, box in sorted(split.detections.items())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


# Keys whose change would make a resumed run a different model or different data, or judge its epochs
# differently (the gate decides the validation IoU that picks best_model.pth): refused.
PROTECTED_KEYS = ("model.", "refinement.max_iter", "refinement.gate", "refinement.keep_margin", "refinement.stop_threshold", "hqsam.model_type", "hqsam.input_size", "hqsam.precision",
                  "data.data_subset", "data.train_split", "data.val_split", "data.image_size", "data.masks_file",
                  "data.sample_ratio", "data.box_noise.", "data.format", "data.min_box_size",
                  "data.detection_box_format", "data.detection_match_iou", "data.detection_mix", "data.detection_noise.",
                  "training.seed", "evaluation.noise_seed",
                  "evaluation.box_noise.", "evaluation.levels.", "evaluation.boxes_per_level",
                  "optimization.feature_cache.storage_dtype")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Differences between a checkpoint's resolved config and the current one: (allowed, refused),
    each as 'key: old -> new'. A key the checkpoint's version did not have counts as its default then."""
    old, new = {**_flatten(Config().to_dict()), **_flatten(fold_aliases(saved))}, _flatten(current)
    allowed: list[str] = []
    refused: list[str] = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            change = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            protected = any(key == p.rstrip(".") or (p.endswith(".") and key.startswith(p)) for p in PROTECTED_KEYS)
            (refused if protected else allowed).append(change)
    return allowed, refused
