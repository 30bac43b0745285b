"""What the head is trained and judged on, in its normalised frame: each object's truth box, image
extent and matched detection; detector boxes as training inputs; the fixed, seeded validation boxes."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from boxrefiner.boxes import (
    clip_boxes,
    jitter_boxes,
    jitter_draws,
    normalise_boxes,
)
from boxrefiner.config import DETECTIONS_LEVEL, BoxNoiseConfig, Config
from boxrefiner.data.splits import SplitData


@dataclass
class Targets:
    """Per-object ground truth in the normalised frame (pixels / longest side of the object's image)."""
    boxes: torch.Tensor  # (N, 4)
    extent: torch.Tensor  # (N, 2) the image's width, height
    detections: torch.Tensor | None = None  # (N, 4) the matched detector box (the truth where there is none)
    has_detection: torch.Tensor | None = None  # (N,) bool

    @classmethod
    def of(cls, split: SplitData) -> Targets:
        width, height = split.image_sizes()
        boxes, extent = normalise_boxes(torch.tensor([o.box for o in split.objects], dtype=torch.float64).reshape(-1, 4),
                                        width, height)
        if not split.detections:
            return cls(boxes.float(), extent.float())
        matched = sorted(split.detections)
        has = torch.zeros(len(split.objects), dtype=torch.bool)
        has[matched] = True
        found = boxes.clone()
        found[matched] = normalise_boxes(torch.tensor([split.detections[k] for k in matched], dtype=torch.float64),
                                         width[matched], height[matched])[0]
        return cls(boxes.float(), extent.float(), clip_boxes(found, extent).float(), has)


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
