"""What `evaluate` measured, per box: a histogram of the IoU gain (refined minus input) and a
before/after scatter, one panel per set of boxes (the main set, then each noise level)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from boxrefiner.utils.files import write_bytes

WORSE = 0.005  # the tolerance of "made worse" in the reports


def plot_gain(groups: dict[str, tuple[np.ndarray, np.ndarray]], folder: str | Path, stem: str) -> list[Path]:
    """`<stem>_iou_gain.png` and `<stem>_iou_before_after.png` in `folder` from each group's (input
    IoU, refined IoU) per box; returns the paths written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = {name: pair for name, pair in groups.items() if len(pair[0])}
    names = list(groups)
    paths = []
    for kind in ("iou_gain", "iou_before_after"):
        figure = Figure(figsize=(4.2 * max(1, len(names)), 4), layout="constrained")
        FigureCanvasAgg(figure)
        axes = np.atleast_1d(figure.subplots(1, max(1, len(names))))
        for ax, name in zip(axes, names):
            before, after = groups[name]
            title = f"{name or 'main set'}: {len(before)} boxes"
            (_histogram if kind == "iou_gain" else _scatter)(ax, before, after, title)
        path = Path(folder) / f"{stem}_{kind}.png"
        out = io.BytesIO()
        figure.savefig(out, format="png", dpi=90)
        write_bytes(path, out.getvalue())
        paths.append(path)
    return paths


def _histogram(ax, before: np.ndarray, after: np.ndarray, title: str) -> None:
    gain = after - before
    span = max(0.05, float(np.abs(gain).max()))
    ax.hist(gain, bins=np.linspace(-span, span, 41), color="C0")
    ax.axvline(0, color="k", linewidth=1)
    worse, better = float((gain < -WORSE).mean()), float((gain > WORSE).mean())
    ax.set_title(f"{title}\nmean gain {gain.mean():+.3f}; better {100 * better:.0f}%, worse {100 * worse:.0f}%",
                 fontsize=9)
    ax.set_xlabel("IoU gain per box (refined - input)")
    ax.set_ylabel("boxes")
    ax.grid(alpha=0.3)


def _scatter(ax, before: np.ndarray, after: np.ndarray, title: str) -> None:
    worse = after < before - WORSE
    ax.scatter(before[~worse], after[~worse], s=6, alpha=0.5, color="C0", label="kept or improved")
    ax.scatter(before[worse], after[worse], s=6, alpha=0.7, color="C3", label="made worse")
    ax.plot([0, 1], [0, 1], color="k", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_title(f"{title}\nmean IoU {before.mean():.3f} -> {after.mean():.3f}", fontsize=9)
    ax.set_xlabel("input box IoU")
    ax.set_ylabel("refined box IoU")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
