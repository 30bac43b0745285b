"""The run's state and the saver that writes it: `last.pth` every epoch (and on a stop), `best_model.pth`
when validation improves, each atomically (temp file + os.replace), never with non-finite weights.

Each file keeps the keys the original tool wrote (`epoch`, `model_state_dict`, `optimizer_state_dict`,
`train_loss`, `val_loss`) plus everything an exact resume and applying the refiner need: scheduler
and scaler state, global step, best metric, metrics history, resolved config, model arguments,
encoder identity, every RNG's state and, for an interrupted run, its position inside the epoch.
Everything is tensors and plain Python types, so files load with `weights_only=True` and a
downloaded file cannot run code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from boxrefiner.config import Config
from boxrefiner.errors import TrainingError
from boxrefiner.features.encoder import EncoderIdentity
from boxrefiner.modeling.build import model_arguments
from boxrefiner.modeling.checkpoint import BEST, LAST, save_checkpoint
from boxrefiner.training.history import improves
from boxrefiner.training.loop import EpochProgress
from boxrefiner.training.rng import rng_state
from boxrefiner.utils import distributed
from boxrefiner.version import __version__


@dataclass
class RunState:
    """Where a run stands: the epochs done (their metrics), the best one, and the position inside an
    interrupted epoch. A resume restores it; every checkpoint records it."""
    start_epoch: int = 0
    best_iou: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)
    partial: EpochProgress | None = None

    def record(self, metrics: dict) -> bool:
        """Add an epoch's metrics; returns whether it is the best so far (refined IoU over the levels)."""
        self.history.append(metrics)
        improved = improves(metrics["val_iou_refined_levels"], self.best_iou, self.best_epoch)
        if improved:
            self.best_iou, self.best_epoch = metrics["val_iou_refined_levels"], metrics["epoch"]
        return improved

    def best_record(self) -> dict | None:
        return next((r for r in self.history if r.get("epoch") == self.best_epoch), None)


def all_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


class CheckpointSaver:
    """Writes the run's checkpoints into `output.checkpoint_dir`."""

    def __init__(self, cfg: Config, device: torch.device, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler | None,
                 identity: EncoderIdentity, samples: dict[str, str]):
        self.cfg, self.device, self.identity, self.samples = cfg, device, identity, samples
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.folder = Path(cfg.output.checkpoint_dir)

    def state(self, run: RunState, last_done: int, progress: EpochProgress | None = None,
              interrupted: bool = False) -> dict[str, Any]:
        """The checkpoint of the run after epoch `last_done` (inside the next one with `progress`). Under
        torchrun every rank calls it: the file also holds each rank's RNGs and epoch progress, so that
        the same number of ranks continues exactly."""
        last = run.history[-1] if run.history else {}
        ranks = distributed.gather({"rng": rng_state(), "partial_epoch": progress.as_dict() if progress else None})
        return {"epoch": last_done, "model_state_dict": self.model.state_dict(),
                "optimizer_state_dict": self.optimizer.state_dict(), "scheduler_state_dict": self.scheduler.state_dict(),
                "scaler_state_dict": self.scaler.state_dict() if self.scaler is not None else None,
                "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"),
                "val_iou_refined": last.get("val_iou_refined"), "best_val_iou": run.best_iou,
                "best_epoch": run.best_epoch, "global_step": self.scheduler.last_epoch, "history": run.history,
                "config": self.cfg.to_dict(), "model_args": model_arguments(self.cfg),
                "encoder": dataclasses.asdict(self.identity), "rng": rng_state(), "device": str(self.device),
                "samples": self.samples, "version": __version__, "interrupted": interrupted or progress is not None,
                "partial_epoch": progress.as_dict() if progress is not None else None,
                "world_size": distributed.world(), "ranks": ranks if len(ranks) > 1 else None}

    def save_epoch(self, run: RunState, epoch: int, improved: bool, interrupted: bool = False) -> None:
        """After a finished epoch: best first, so a kill between the two writes leaves it current."""
        self._write(self.state(run, epoch, interrupted=interrupted), BEST, LAST) if improved else \
            self._write(self.state(run, epoch, interrupted=interrupted), LAST)

    def save_partial(self, run: RunState, progress: EpochProgress) -> Path:
        """A stop inside epoch `progress.epoch`: last.pth says where to continue."""
        self._write(self.state(run, progress.epoch - 1, progress), LAST)
        return self.folder / LAST

    def _write(self, state: dict[str, Any], *names: str) -> None:
        if not all_finite(self.model):  # never replace a good checkpoint with NaN weights
            raise TrainingError("the model's weights are no longer finite; the last good checkpoint was kept")
        if not distributed.is_main():
            return
        for name in names:
            save_checkpoint(state, self.folder / name)
