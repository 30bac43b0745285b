"""What a run shows after every epoch: `results.csv` and `results.png` from its history,
`val_boxes.jpg` (the same few validation images every epoch, decoded once per run, with the truth,
input and refined box of each object) and, with `logging.tensorboard`, the same scalars and box grid
as TensorBoard events. The pictures are drawn on a background thread while the next epoch trains, one
epoch's at a time; results.png and the TensorBoard grid are skipped for an epoch when drawing them
would cost more than DUTY of the run's time (the last epoch is always drawn). They never stop a run:
a picture that cannot be drawn or written is a log line."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boxrefiner.boxes import pixel_boxes
from boxrefiner.config import Config
from boxrefiner.data.images import DECODE_ERRORS
from boxrefiner.data.splits import SplitData
from boxrefiner.data.targets import InputSet
from boxrefiner.plots import Thumbnail, box_tile, boxes_grid, plot_results, save_picture, write_results_csv
from boxrefiner.training.validate import PicturedBoxes
from boxrefiner.utils import distributed
from boxrefiner.utils.files import first_line

log = logging.getLogger(__name__)
RESULTS_CSV, RESULTS_PNG, VAL_BOXES = "results.csv", "results.png", "val_boxes.jpg"
# results.png (about 0.5 s of matplotlib on 2 CPU cores, and more while training competes for them)
# takes at most this share of the wall time: on epochs of a few seconds it is redrawn every few epochs
DUTY = 0.05


def pictured_images(split: SplitData, count: int) -> list[int]:
    """`count` validation images spread evenly over the split's usable images that have objects:
    the same ones every epoch, every rank and every resumption."""
    candidates = sorted({o.image for o in split.objects} - set(split.excluded))
    if len(candidates) <= count:
        return candidates
    return [candidates[round(k)] for k in np.linspace(0, len(candidates) - 1, count)]


class RunVisuals:
    """The run folder's pictures and TensorBoard events; `epoch_done` after each epoch's record."""

    def __init__(self, cfg: Config, split: SplitData, own: InputSet, start_epoch: int):
        self.folder = Path(cfg.output.save_dir)
        self.main = distributed.is_main()
        self.plots = cfg.logging.plots
        self.title = f"{self.folder.name}: {cfg.data.format} {split.split}, {len(split.objects)} objects"
        self.writer = open_tensorboard(self.folder, start_epoch) if cfg.logging.tensorboard and self.main else None
        # every rank pictures the same objects (from the config alone): evaluate merges them collectively
        wanted = cfg.logging.plots or cfg.logging.tensorboard
        images = pictured_images(split, cfg.logging.val_images) if wanted else []
        by_image = split.objects_by_image()
        objects = sorted(k for i in images for k in by_image[i])
        self.pictured = PicturedBoxes(torch.tensor(objects, dtype=torch.long)) if objects else None
        self.thumbs: list[Thumbnail] = []
        if self.main and objects:
            self.thumbs = decode_thumbnails(split, images, by_image)
            chosen = torch.tensor(objects, dtype=torch.long)
            width, height = (t[chosen] for t in split.image_sizes())
            self.truth = np.array([split.objects[k].box for k in objects], dtype=np.float64)
            self.inputs = pixel_boxes(own.boxes[own.rows(chosen)[0]].double(), width, height).numpy()
            self.width, self.height = width, height
            self.row_of = {k: r for r, k in enumerate(objects)}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pictures") if self.main else None
        self.pending: Future | None = None
        self.latest: tuple[list[dict], dict, torch.Tensor | None] | None = None
        self.full_seconds, self.full_at, self.full_epoch = 0.0, 0.0, -1  # the last results.png: its cost, when, epoch

    def epoch_done(self, history: list[dict], record: dict) -> None:
        """Rewrite results.csv now; in the background (once the previous epoch's are done) this epoch's
        boxes and TensorBoard scalars, and results.png with the TensorBoard grid unless drawing them
        would take more than DUTY of the time since they were last drawn (short epochs; see close)."""
        if self.pool is None:
            return
        self._write(RESULTS_CSV, lambda path: write_results_csv(history, path))
        refined = self.pictured.refined.clone() if self.pictured is not None and self.pictured.refined is not None else None
        self.wait()
        self.latest = (list(history), dict(record), refined)
        full = self.full_seconds <= DUTY * (time.monotonic() - self.full_at)
        self.pending = self.pool.submit(self._draw, *self.latest, full)

    def _draw(self, history: list[dict], record: dict, refined: torch.Tensor | None, full: bool) -> None:
        try:
            grid = self.box_grid(int(record["epoch"]), refined) if self.thumbs and refined is not None else None
            if self.plots and grid is not None:
                self._write(VAL_BOXES, lambda path: save_picture(grid, path))
            if self.writer is not None:
                write_scalars(self.writer, record, grid if full else None)
            if full:
                started = time.monotonic()
                if self.plots:
                    self._write(RESULTS_PNG, lambda path: plot_results(history, path, self.title))
                self.full_seconds, self.full_at = time.monotonic() - started, time.monotonic()
                self.full_epoch = int(record["epoch"])
        except Exception as exc:  # a picture must not end hours of training; the log says what broke
            log.error("the pictures of epoch %s were not drawn: %s: %s", record.get("epoch"), type(exc).__name__,
                      first_line(exc))

    def wait(self) -> None:
        """Until the pictures submitted last are written."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def box_grid(self, epoch: int, normalised: torch.Tensor):
        """An epoch's val_boxes picture from the pictured objects' refined boxes (normalised frame)."""
        refined = pixel_boxes(normalised.double(), self.width, self.height).numpy()
        tiles = []
        for thumb in self.thumbs:
            rows = [self.row_of[k] for k in thumb.objects]
            tiles.append(box_tile(thumb, self.truth[rows], self.inputs[rows], refined[rows]))
        return boxes_grid(tiles, f"epoch {epoch}")

    def _write(self, name: str, write) -> None:
        try:
            write(self.folder / name)
        except (OSError, ValueError) as exc:
            log.warning("%s not written: %s", self.folder / name, first_line(exc))

    def close(self) -> None:
        """Wait for the last pictures (results.png of the last epoch drawn now if it was skipped), then
        close the TensorBoard file."""
        if self.pool is not None:
            self.wait()
            if self.latest is not None and self.full_epoch != self.latest[1]["epoch"]:
                self._draw(*self.latest, full=True)
            self.pool.shutdown()
        if self.writer is not None:
            self.writer.close()


def decode_thumbnails(split: SplitData, images: list[int], by_image: dict[int, list[int]]) -> list[Thumbnail]:
    thumbs = []
    for i in images:
        image = split.images[i]
        try:
            thumbs.append(Thumbnail.of(image.image_path, image.file_name, by_image[i]))
        except DECODE_ERRORS as exc:
            log.warning("val_boxes.jpg leaves out %s: it no longer decodes (%s)", image.file_name, first_line(exc))
    return thumbs


def open_tensorboard(folder: Path, start_epoch: int) -> Any:
    """A SummaryWriter in the run folder (events of epochs >= start_epoch from an earlier try hidden),
    or None with one line saying how to get it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("logging.tensorboard is on but the tensorboard package is not installed (pip install "
                    "tensorboard); training goes on without TensorBoard events (results.csv and results.png "
                    "are written anyway)")
        return None
    try:
        writer = SummaryWriter(log_dir=str(folder), purge_step=start_epoch)
    except Exception as exc:  # a tensorboard/protobuf mismatch, an unwritable folder: the run goes on
        log.warning("TensorBoard events cannot be written to %s (%s: %s); training goes on without them", folder,
                    type(exc).__name__, first_line(exc))
        return None
    log.info("TensorBoard events in %s (tensorboard --logdir %s)", folder, folder.parent)
    return writer


def scalar_tag(key: str) -> str:
    """TensorBoard groups tags by the part before the slash: train/, val/, cache/, run/."""
    for group in ("train", "val", "cache"):
        if key.startswith(group + "_"):
            return f"{group}/{key[len(group) + 1:]}"
    return f"run/{key}"


def write_scalars(writer: Any, record: dict, grid) -> None:
    """Every number of the epoch's record as a scalar at step `epoch`, and the box grid as an image."""
    epoch = int(record["epoch"])
    for key, value in record.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(scalar_tag(key), value, epoch)
    if grid is not None:
        writer.add_image("val_boxes", np.asarray(grid), epoch, dataformats="HWC")
    writer.flush()
