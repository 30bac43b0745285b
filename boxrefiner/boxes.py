"""Box maths on (N, 4) `xyxy` tensors: overlap measures, deltas and detector-like jitter.

Boxes inside the package live in the *normalised frame*: pixel coordinates divided by the image's
longest side. That is exactly the frame of HQ-SAM's padded square input (the image is scaled by
input_size / max(h, w) and padded right and bottom), so [0, 1] spans the whole embedding grid.
"""

from __future__ import annotations

import torch

EPS = 1e-7


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _intersection_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    return inter, box_area(a) + box_area(b) - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of each pair (a[i], b[i])."""
    inter, union = _intersection_union(a, b)
    return inter / union.clamp(min=EPS)


WORSE_TOLERANCE = 0.005  # "made worse" in the tolerant sense: IoU lower by more than this






def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of each pair: IoU minus the share of the enclosing box that neither box covers."""
    inter, union = _intersection_union(a, b)
    iou = inter / union.clamp(min=EPS)
    enclose = box_area(torch.cat([torch.minimum(a[:, :2], b[:, :2]), torch.maximum(a[:, 2:], b[:, 2:])], dim=1))
    return iou - (enclose - union) / enclose.clamp(min=EPS)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def clip_boxes(boxes: torch.Tensor, extent: torch.Tensor, min_size: float = 1e-3) -> torch.Tensor:
    """Clip to [0, extent] (extent (N, 2) = image width, height in the same frame), keep a minimum size."""
    w, h = extent[:, 0], extent[:, 1]
    x0 = torch.minimum(boxes[:, 0].clamp(min=0), w - min_size)
    y0 = torch.minimum(boxes[:, 1].clamp(min=0), h - min_size)
    x1 = torch.maximum(torch.minimum(boxes[:, 2], w), x0 + min_size)
    y1 = torch.maximum(torch.minimum(boxes[:, 3], h), y0 + min_size)
    return torch.stack([x0, y0, x1, y1], dim=1)


def apply_deltas(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Shift the centre by (dx*w, dy*h) and scale the size by exp(dw), exp(dh)."""
    cx, cy, w, h = xyxy_to_cxcywh(boxes).unbind(-1)
    dx, dy, dw, dh = deltas.unbind(-1)
    return cxcywh_to_xyxy(torch.stack([cx + dx * w, cy + dy * h, w * dw.exp(), h * dh.exp()], dim=-1))


def jitter_boxes(boxes: torch.Tensor, extent: torch.Tensor, center_std: float | torch.Tensor,
                 scale_std: float | torch.Tensor, max_sigma: float | torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """Imitate detector error: centre shift and log-scale change relative to each box's own size.

    The stds are numbers or (N,) tensors (one level per box). Draws are clipped at `max_sigma`
    standard deviations so that no box leaves the image entirely.
    """
    n = boxes.shape[0]
    sigma = _column(max_sigma)
    noise = torch.maximum(torch.minimum(torch.randn(n, 4, generator=generator, dtype=torch.float64), sigma), -sigma)
    center, scale = _column(center_std), _column(scale_std)
    deltas = noise * torch.cat([center, center, scale, scale], dim=1)
    jittered = apply_deltas(boxes.double(), deltas)
    return clip_boxes(jittered, extent.double()).to(boxes.dtype)


def jitter_draws(boxes: torch.Tensor, extent: torch.Tensor, center_std: float, scale_std: float, max_sigma: float,
                 count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` independent jitters of every box, (N, count, 4), drawn one after the other from `generator`."""
    return torch.stack([jitter_boxes(boxes, extent, center_std, scale_std, max_sigma, generator)
                        for _ in range(count)], dim=1)


def _column(value: float | torch.Tensor) -> torch.Tensor:
    """A number or (N,) tensor as a float64 column that broadcasts over (N, 4)."""
    return torch.as_tensor(value, dtype=torch.float64).reshape(-1, 1)


def jitter_with_levels(boxes: torch.Tensor, extent: torch.Tensor, levels: list[tuple[float, float, float, float]],
                       generator: torch.Generator) -> torch.Tensor:
    """`jitter_boxes` with one noise level drawn per box from `levels` ((center_std, scale_std,
    max_sigma, weight) each, drawn in proportion to weight). One level draws nothing extra."""
    if len(levels) == 1:
        center, scale, sigma, _ = levels[0]
        return jitter_boxes(boxes, extent, center, scale, sigma, generator)
    table = torch.tensor(levels, dtype=torch.float64)
    pick = torch.multinomial(table[:, 3], boxes.shape[0], replacement=True, generator=generator)
    chosen = table[pick]
    return jitter_boxes(boxes, extent, chosen[:, 0], chosen[:, 1], chosen[:, 2], generator)


def hflip_boxes(boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the rows where `flip` is set about the padded square's centre (x -> 1 - x)."""
    mirrored = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=1)
    return torch.where(flip[:, None], mirrored, boxes)


def hflip_extent(extent: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """After mirroring the padded square, the image lies at [1 - w, 1]: clip to the full square width."""
    return torch.where(flip[:, None], torch.stack([torch.ones_like(extent[:, 0]), extent[:, 1]], dim=1), extent)


def _longest(width: float | torch.Tensor, height: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(width, height) stacked on the last axis and the longest side, per image, float64."""
    sides = torch.stack([torch.as_tensor(width, dtype=torch.float64), torch.as_tensor(height, dtype=torch.float64)], -1)
    return sides, sides.max(dim=-1).values


def _per_row(longest: torch.Tensor, dims: int) -> torch.Tensor:
    """`longest` shaped to divide a tensor of `dims` dimensions whose leading axes are its own."""
    return longest.reshape(longest.shape + (1,) * (dims - longest.dim()))


def normalise_boxes(boxes: torch.Tensor, width: float | torch.Tensor,
                    height: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel xyxy boxes -> the head's frame (pixels / the image's longest side), and the image's extent
    (width, height) in that frame. `width`/`height`: one image's, or one per row of `boxes`. float64."""
    boxes = boxes.double()
    sides, longest = _longest(width, height)
    return boxes / _per_row(longest, boxes.dim()), sides / _per_row(longest, sides.dim())


def pixel_boxes(boxes: torch.Tensor, width: float | torch.Tensor, height: float | torch.Tensor) -> torch.Tensor:
    """The head's frame -> pixel xyxy boxes (float64), the inverse of normalise_boxes."""
    boxes = boxes.double()
    return boxes * _per_row(_longest(width, height)[1], boxes.dim())
