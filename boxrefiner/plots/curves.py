"""A run's epochs as a table and as curves: `results.csv` (one row per epoch, one column per
number of metrics.jsonl) and `results.png` (losses, validation IoU of the input and the refined
boxes per noise level, share made worse, learning rate), as Ultralytics users find them in every
run folder. Both are functions of the history alone, so a resumed run rewrites them whole."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from boxrefiner.utils.files import write_bytes

LEVEL_PREFIX = "val_iou_input_"


def columns(history: Sequence[dict]) -> list[str]:
    """`epoch`, then every key holding a number in any record, in the order first seen."""
    keys: dict[str, None] = {"epoch": None}
    for record in history:
        for key, value in record.items():
            if (isinstance(value, (int, float)) and not isinstance(value, bool)) or value is None:
                keys.setdefault(key, None)
    return list(keys)


def write_results_csv(history: Sequence[dict], path: str | Path) -> None:
    """One row per epoch; a number a record lacks (an older version's) or that is not finite is empty."""
    names = columns(history)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    for record in history:
        writer.writerow([_cell(record.get(name)) for name in names])
    write_bytes(path, out.getvalue().encode())


def _cell(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return str(value)


def levels(history: Sequence[dict]) -> list[str]:
    """The validation sets of the history: "" (the run's own boxes), then the named levels."""
    names = {k[len(LEVEL_PREFIX):] for r in history for k in r if k.startswith(LEVEL_PREFIX)}
    return ["", *sorted(names)]


def series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the records that hold a finite `key`."""
    points = [(int(r["epoch"]), float(r[key])) for r in history
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and isinstance(r.get("epoch"), int)]
    return [e for e, _ in points], [v for _, v in points]


def plot_results(history: Sequence[dict], path: str | Path, title: str = "") -> None:
    """results.png: six panels against the epoch."""
    out = io.BytesIO()
    results_figure(history, title).savefig(out, format="png", dpi=90, pil_kwargs={"compress_level": 1})
    write_bytes(path, out.getvalue())


def results_figure(history: Sequence[dict], title: str = ""):
    """The figure of results.png (headless: matplotlib's Agg canvas, no pyplot state): losses, loss
    terms, validation IoU input vs refined per level, share made worse per level, the selection metric
    with the best epoch, and the learning rate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 8.5))  # fixed margins: a constrained layout doubles the drawing time
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3).ravel()
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.92, wspace=0.22, hspace=0.32)
    names = levels(history)
    colours = {name: f"C{k}" for k, name in enumerate(names)}
    _lines(axes[0], history, [("train_loss", "train", "C0", "-"), ("val_loss", "val", "C1", "-")], "loss (total)")
    _lines(axes[1], history, [(f"{p}_{part}", f"{p} {part}", colour, style)
                              for part, colour in (("l1", "C0"), ("giou_loss", "C1"), ("quality_error", "C2"))
                              for p, style in (("train", "-"), ("val", "--"))], "loss terms")
    _lines(axes[2], history, [(_key("iou_input", n), f"{n or 'own'} input", colours[n], "--") for n in names] +
           [(_key("iou_refined", n), f"{n or 'own'} refined", colours[n], "-") for n in names],
           "val mean IoU: input (dashed) vs refined")
    _lines(axes[3], history, [(_key("worse_rate_tol", n), n or "own", colours[n], "-") for n in names],
           "val share of boxes made worse (by > 0.005)", percent=True)
    _lines(axes[4], history, [("val_iou_refined_levels", "refined, mean of levels", "C3", "-")],
           "selection: refined IoU over the levels")
    epochs, values = series(history, "val_iou_refined_levels")
    if values:  # the first epoch of the highest value: the one best_model.pth holds
        best = values.index(max(values))
        axes[4].axvline(epochs[best], color="0.6", linestyle=":")
        axes[4].annotate(f"best {values[best]:.3f} (epoch {epochs[best]})", (epochs[best], values[best]),
                         textcoords="offset points", xytext=(4, -14), fontsize=9)
    _lines(axes[5], history, [("lr", "learning rate", "C4", "-")], "learning rate")
    if title:
        figure.suptitle(title)
    return figure


def _key(metric: str, level: str) -> str:
    return f"val_{metric}_{level}" if level else f"val_{metric}"


def _lines(ax, history: Sequence[dict], lines: list[tuple[str, str, str, str]], title: str,
           percent: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    drawn = 0
    for key, name, colour, style in lines:
        epochs, values = series(history, key)
        if epochs:
            ax.plot(epochs, [100 * v for v in values] if percent else values, style, color=colour, label=name,
                    marker="." if len(epochs) < 30 else None)
            drawn += 1
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if percent:
        ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, ncols=2 if drawn > 4 else 1)
