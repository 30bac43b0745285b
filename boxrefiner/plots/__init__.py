"""Pictures: training curves, boxes on images, evaluation histograms (headless, written atomically)."""

from boxrefiner.plots.boxes import Thumbnail, box_tile, boxes_grid, refine_picture
from boxrefiner.plots.curves import plot_results, write_results_csv
from boxrefiner.plots.draw import save_picture
from boxrefiner.plots.gain import plot_gain

__all__ = ["Thumbnail", "box_tile", "boxes_grid", "plot_gain", "plot_results", "refine_picture", "save_picture",
           "write_results_csv"]
