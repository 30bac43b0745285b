"""BoxRefinementModule: iteratively corrects a box by looking at HQ-SAM's embedding around it, and says
how good each box it looked at is.

First, a small context network (`context_layers` dilated 3x3 convolutions, once per image) lets
every cell of the embedding see its surroundings: a cell's own 256 values tell little about whether
it belongs to the object (on the demo's features a per-cell linear probe of the object mask reached
mask IoU 0.25, two dilated layers 0.46), and the boxes of one image then all sample the same result.
Each iteration samples a `roi_size` x `roi_size` grid of those maps over the box enlarged by
`context_scale` (so the head sees the object's edges and some background). A per-cell projection
turns it into `num_heads` score maps; their maxima along rows and columns give horizontal and
vertical profiles, where an object's edges show up whatever its appearance. A small MLP reads the
profiles and the box geometry and predicts bounded deltas (dx, dy, dw, dh) relative to the box's own
size, and the IoU of the box it looked at with the object (the quality head). The same head runs
every iteration, and looks once more at the last box to predict its IoU too.

At inference the predicted IoUs pick each box's answer among the input and every iteration's box
(`Trajectory.select`): a refined box replaces the input only when it is predicted to be better by a
margin, so a good detector box is kept rather than made worse (IoU-Net's and Alpha-Refine's remedy).

The profile bottleneck is deliberate: a head that flattens the whole RoI memorises a few hundred
training images instead of learning where edges are (measured on the demo data: same training IoU,
lower validation IoU).

Boxes are `xyxy` in the normalised frame (pixels / longest image side), which is the frame of the
padded square encoder input: [0, 1] covers the whole embedding grid, whatever its resolution. Several
boxes may look at one image's embedding (`image_index`), without copying it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from boxrefiner.boxes import apply_deltas, clip_boxes, xyxy_to_cxcywh


@dataclass
class Trajectory:
    """What the head did to a batch of boxes."""
    inputs: torch.Tensor  # (N, 4) the boxes it was given
    boxes: list[torch.Tensor]  # K x (N, 4): the boxes after each iteration
    quality: torch.Tensor | None  # (K + 1, N) IoU logits of inputs, then of each iteration's box; None: no quality head
    steps: torch.Tensor | None = None  # (K, N) each iteration's largest |delta|: where an early stop would end

    @property
    def candidates(self) -> torch.Tensor:
        """(K + 1, N, 4): the input box, then each iteration's."""
        return torch.stack([self.inputs.float(), *(b.float() for b in self.boxes)])

    @property
    def iou_pred(self) -> torch.Tensor | None:
        return None if self.quality is None else torch.sigmoid(self.quality.float())

    def rows(self, keep: torch.Tensor) -> Trajectory:
        """The trajectories of some boxes (a mask or indices over N)."""
        return Trajectory(self.inputs[keep], [b[keep] for b in self.boxes],
                          None if self.quality is None else self.quality[:, keep],
                          None if self.steps is None else self.steps[:, keep])

    def stopped(self, threshold: float) -> Trajectory:
        """The trajectory an early stop at `threshold` gives: a box whose largest delta falls below it
        in iteration k keeps that iteration's box (and its predicted IoU) for the remaining ones.

        The same numbers as stopping inside the loop, where a stopped box is still looked at every
        iteration: each box's computation is independent of the others', so one run serves both the
        loss (every iteration) and inference (stopped)."""
        assert self.steps is not None, "a trajectory without per-iteration steps cannot be stopped"
        count = len(self.boxes)
        small = self.steps < threshold  # (K, N)
        last = torch.where(small.any(dim=0), small.int().argmax(dim=0), count - 1)  # the iteration whose box stays
        keep = torch.minimum(torch.arange(count + 1, device=last.device)[:, None], last[None] + 1)  # (K + 1, N)
        candidates = self.candidates.gather(0, keep[..., None].expand(-1, -1, 4))
        quality = None if self.quality is None else self.quality.gather(0, keep)
        return Trajectory(self.inputs, list(candidates[1:].unbind(0)), quality, self.steps)

    def select(self, gate: bool = True, keep_margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Each box's answer: (boxes (N, 4), their predicted IoU (N,) or None, chosen candidate (N,)).

        With the gate, the refined candidate with the highest predicted IoU replaces the input only
        if it beats the input's predicted IoU by more than `keep_margin`; without it (or without a
        quality head), the last iteration's box."""
        candidates, iou = self.candidates, self.iou_pred
        count = candidates.shape[1]
        if not gate or iou is None:
            last = torch.full((count,), len(self.boxes), dtype=torch.long, device=candidates.device)
            return candidates[-1], None if iou is None else iou[-1], last
        best = iou[1:].argmax(dim=0) + 1
        best_iou = iou.gather(0, best[None])[0]
        chosen = torch.where(best_iou > iou[0] + keep_margin, best, torch.zeros_like(best))
        rows = torch.arange(count, device=candidates.device)
        return candidates[chosen, rows], iou[chosen, rows], chosen


class BoxRefinementModule(nn.Module):
    def __init__(self, embed_dim: int = 256, hidden_dim: int = 256, num_heads: int = 8, max_offset: float = 0.5,
                 max_iter: int = 3, roi_size: int = 14, context_scale: float = 1.6, quality_head: bool = True,
                 dropout: float = 0.0, context_layers: int = 0, context_dim: int = 64):
        super().__init__()
        self.max_offset = max_offset
        self.max_iter = max_iter
        self.roi_size = roi_size
        self.context_scale = context_scale
        self.quality_head = quality_head
        self.context: nn.Module | None = None
        if context_layers:  # dilated convolutions over the whole map, once per image, before any box looks at it
            dense: list[nn.Module] = [nn.Conv2d(embed_dim, context_dim, 1), nn.GroupNorm(math.gcd(8, context_dim), context_dim),
                                      nn.ReLU(inplace=True)]
            for k in range(context_layers):
                dilation = 2 ** (k + 1)
                dense += [nn.Conv2d(context_dim, context_dim, 3, padding=dilation, dilation=dilation),
                          nn.GroupNorm(math.gcd(8, context_dim), context_dim), nn.ReLU(inplace=True)]
            self.context = nn.Sequential(*dense)
            embed_dim = context_dim
        self.project = nn.Sequential(
            nn.Conv2d(embed_dim, hidden_dim, 1), nn.GroupNorm(math.gcd(32, hidden_dim), hidden_dim), nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, num_heads, 1),
        )
        layers: list[nn.Module] = [nn.Linear(2 * num_heads * roi_size + 4, hidden_dim), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        output = nn.Linear(hidden_dim, 4 + int(quality_head))
        nn.init.zeros_(output.weight)  # start as the identity: refined == input
        nn.init.zeros_(output.bias)
        self.head = nn.Sequential(*layers, output)

    def sample_roi(self, features: torch.Tensor, boxes: torch.Tensor,
                   image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Bilinear samples (N, C, R, R), float32, at cell centres of each context-enlarged box; box i
        looks at `features[image_index[i]]` (default: features[i])."""
        return self._sample(features, boxes, image_index, _equal_groups(image_index, features.shape[0]))

    def _sample(self, features: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor | None,
                groups: int | None) -> torch.Tensor:
        """sample_roi, with `groups` (J boxes per image in order, or None) worked out by the caller once."""
        cx, cy, w, h = xyxy_to_cxcywh(boxes).unbind(-1)
        steps = (torch.arange(self.roi_size, device=boxes.device, dtype=boxes.dtype) + 0.5) / self.roi_size - 0.5
        xs = cx[:, None] + steps[None] * w[:, None] * self.context_scale
        ys = cy[:, None] + steps[None] * h[:, None] * self.context_scale
        if features.dtype != torch.float32 or (image_index is not None and groups is None):
            return gather_bilinear(features, xs, ys, image_index)
        # grid_sample with align_corners=False: -1 and 1 are the outer edges of the embedding grid.
        grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1) * 2 - 1  # (N, R, R, 2)
        if groups is None:
            return F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        r = self.roi_size  # J boxes per image side by side in one grid: each map is read once, never copied
        grid = grid.view(features.shape[0], groups * r, r, 2)
        out = F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.view(features.shape[0], -1, groups, r, r).transpose(1, 2).reshape(-1, out.shape[1], r, r)

    def context_maps(self, features: torch.Tensor) -> torch.Tensor:
        """What every box samples: the context network's float32 maps of `features`, or `features` itself
        in a module without one. Several calls on the same images compute it once and pass `widened=True`."""
        return features if self.context is None else self.context(features.float())

    def look(self, features: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor | None = None,
             groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bounded deltas (N, 4) for `boxes`, and the IoU logit (N,) of each box (None without a quality head).
        `features` are `context_maps`' output; `groups` as in `_sample`."""
        maps = self.project(self._sample(features, boxes, image_index, groups))  # (N, heads, R, R)
        profiles = torch.cat([maps.amax(dim=2).flatten(1), maps.amax(dim=3).flatten(1)], dim=1)
        geometry = xyxy_to_cxcywh(boxes).to(profiles.dtype)
        raw = self.head(torch.cat([profiles, geometry], dim=1)).float()
        return self.max_offset * torch.tanh(raw[:, :4]), (raw[:, 4] if self.quality_head else None)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, extent: torch.Tensor,
                num_iter: int | None = None, stop_threshold: float | None = None,
                image_index: torch.Tensor | None = None, widened: bool = False) -> Trajectory:
        """Refine `boxes` (N, 4); `extent` (N, 2) is each box's image width, height in the same frame.

        With `stop_threshold`, a box whose largest delta falls below it keeps its place for the
        remaining iterations (inference, `Trajectory.stopped`); training uses every iteration. `widened`:
        `features` are already `context_maps(features)`."""
        inputs = boxes = boxes.float()
        if not widened:  # the whole map is needed: widen it once, then every box samples the result
            features = self.context_maps(features)
        groups = _equal_groups(image_index, features.shape[0])
        iterations: list[torch.Tensor] = []
        quality: list[torch.Tensor] = []  # filled only with a quality head
        steps: list[torch.Tensor] = []
        for _ in range(num_iter or self.max_iter):
            deltas, q = self.look(features, boxes, image_index, groups)
            refined = clip_boxes(apply_deltas(boxes, deltas), extent.float())
            iterations.append(refined)
            steps.append(deltas.detach().abs().amax(dim=1))
            if q is not None:
                quality.append(q)
            boxes = refined.detach()  # each step learns to correct the previous one, not to steer it
        last = self.look(features, boxes, image_index, groups)[1] if self.quality_head else None
        if last is not None:
            quality.append(last)  # how good the final box is
        trajectory = Trajectory(inputs, iterations, torch.stack(quality) if quality else None, torch.stack(steps))
        return trajectory if stop_threshold is None else trajectory.stopped(stop_threshold)


def _equal_groups(image_index: torch.Tensor | None, images: int) -> int | None:
    """J when `image_index` is [0]*J + [1]*J + ... over every image (or None for one box per image)."""
    if image_index is None or images == 0 or len(image_index) % images:
        return None
    groups = len(image_index) // images
    expected = torch.arange(images, device=image_index.device).repeat_interleave(groups)
    return groups if torch.equal(image_index, expected) else None


def _axis_neighbours(coords: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (N, 2R) of the lower then upper neighbour cells and their weights (0 outside the grid)."""
    pixel = coords.float() * size - 0.5  # cell centres sit at half-integers (align_corners=False)
    low = pixel.floor()
    frac = pixel - low
    index = torch.cat([low, low + 1], dim=1).long()
    weight = torch.cat([1 - frac, frac], dim=1) * ((index >= 0) & (index < size))
    return index.clamp(0, size - 1), weight


def gather_bilinear(features: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor,
                    image_index: torch.Tensor | None = None) -> torch.Tensor:
    """grid_sample's values for a separable grid (columns xs, rows ys; (N, R), normalised) of box i on
    `features[image_index[i]]`. Only the 2R x 2R neighbouring cells are gathered and converted to
    float32, not the whole map (converting a 256x64x64 map costs more than reading it)."""
    b, _, height, width = features.shape
    r = xs.shape[1]
    rows, wy = _axis_neighbours(ys, height)
    cols, wx = _axis_neighbours(xs, width)
    index = image_index if image_index is not None else torch.arange(b, device=features.device)
    batch = index.to(features.device)[:, None, None]
    cells = features.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].float()  # (N, 2R, 2R, C)
    cells = cells.permute(0, 3, 1, 2) * wy[:, None, :, None] * wx[:, None, None, :]
    return cells[:, :, :r, :r] + cells[:, :, :r, r:] + cells[:, :, r:, :r] + cells[:, :, r:, r:]
