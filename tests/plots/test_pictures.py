"""The pictures themselves: results.csv and the curves, boxes in their three colours, grids, masks,
and the evaluation histograms."""

import csv

import numpy as np
import pytest
from PIL import Image

from boxrefiner.plots import Thumbnail, box_tile, boxes_grid, plot_gain, plot_results, refine_picture, write_results_csv
from boxrefiner.plots.boxes import CELL
from boxrefiner.plots.curves import results_figure
from boxrefiner.plots.draw import INPUT, REFINED, TRUTH, overlay_masks


def history(epochs=4):
    records = []
    for e in range(epochs):
        r = {"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1), "lr": 1e-3 * (epochs - e) / epochs,
             "val_iou_input": 0.6, "val_iou_refined": 0.6 + 0.02 * e, "val_worse_rate_tol": 0.1 - 0.02 * e,
             "val_iou_input_small": 0.9, "val_iou_refined_small": 0.88 + 0.005 * e, "val_worse_rate_tol_small": 0.05,
             "val_iou_refined_levels": 0.7 + 0.01 * min(e, 2), "cache_hit_rate": None}
        records.append(r)
    records[1]["val_loss"] = float("nan")  # a diverged validation: an empty cell, no point
    del records[2]["lr"]  # a key an older version did not write
    return records


def test_results_csv_has_a_row_per_epoch_and_a_column_per_number(tmp_path):
    h = history()
    write_results_csv(h, tmp_path / "results.csv")
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert next(iter(rows[0])) == "epoch" and set(rows[0]) == set(h[0])
    assert float(rows[3]["val_iou_refined"]) == pytest.approx(h[3]["val_iou_refined"], rel=1e-5)
    assert rows[1]["val_loss"] == "" and rows[2]["lr"] == "" and rows[0]["cache_hit_rate"] == ""


def test_results_figure_plots_every_level_input_and_refined(tmp_path):
    h = history()
    axes = results_figure(h).axes
    assert len(axes) == 6
    iou = {line.get_label(): line for line in axes[2].get_lines()}
    assert set(iou) == {"own input", "own refined", "small input", "small refined"}
    assert list(iou["small refined"].get_ydata()) == pytest.approx([r["val_iou_refined_small"] for r in h])
    assert iou["own input"].get_linestyle() == "--" and iou["own refined"].get_linestyle() == "-"
    worse = {line.get_label(): line for line in axes[3].get_lines()}
    assert list(worse["own"].get_ydata()) == pytest.approx([100 * r["val_worse_rate_tol"] for r in h])
    val = next(line for line in axes[0].get_lines() if line.get_label() == "val")
    assert list(val.get_xdata()) == [0, 2, 3]  # the NaN epoch is left out, not drawn as 0
    lr = axes[5].get_lines()[0]
    assert list(lr.get_xdata()) == [0, 1, 3]
    best = [t.get_text() for t in axes[4].texts]
    assert best == ["best 0.720 (epoch 2)"]  # the first epoch of the highest value, as best_model.pth
    plot_results(h, tmp_path / "results.png", "run")
    with Image.open(tmp_path / "results.png") as png:
        assert png.format == "PNG" and png.size == (1350, 765)


def colour_near(picture, x, y, colour, tolerance=30, radius=1):
    pixels = np.asarray(picture.convert("RGB")).astype(int)
    patch = pixels[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1].reshape(-1, 3)
    return bool((np.abs(patch - np.array(colour)).max(1) <= tolerance).any())


def test_box_tile_draws_truth_input_and_refined_in_their_colours():
    image = Image.new("RGB", (400, 200), (128, 128, 128))
    thumb = Thumbnail("a/b.jpg", image.resize((200, 100)), 0.5, [0, 1])
    truth = np.array([[40.0, 40, 200, 160], [250, 20, 380, 180]])
    inputs = np.array([[20.0, 30, 240, 190], [270, 10, 390, 190]])
    refined = np.array([[44.0, 42, 204, 164], [np.nan] * 4])  # the second object was not validated
    tile = box_tile(thumb, truth, inputs, refined)
    assert tile.size == (200, 100)
    assert colour_near(tile, 20, 40, TRUTH)  # left edge of the truth box (40 px at half scale)
    assert colour_near(tile, 102, 60, REFINED)  # right edge of the refined box
    dashes = [colour_near(tile, 10, y, INPUT, radius=0) for y in range(20, 90)]
    assert 0.2 < np.mean(dashes) < 0.9  # dashed, not solid
    assert not any(colour_near(tile, 135, y, INPUT, radius=0) for y in range(10, 90))  # no box for object 1's input
    assert colour_near(tile, 125, 50, TRUTH)  # its truth is drawn


def test_grid_lays_tiles_under_the_legend():
    tiles = [Image.new("RGB", (300, 200), (k * 40, 0, 0)) for k in range(5)]
    picture = boxes_grid(tiles, "epoch 3", columns=4)
    header = picture.height - 2 * CELL
    assert picture.width == 4 * CELL and 20 < header < 60
    assert picture.getpixel((CELL + CELL // 2, header + CELL // 2)) == (40, 0, 0)  # second tile, first row
    assert picture.getpixel((CELL // 2, header + CELL + CELL // 2)) == (160, 0, 0)  # fifth tile, second row


def test_masks_are_tinted_only_where_they_are():
    image = Image.new("RGB", (50, 40), (100, 100, 100))
    mask = np.zeros((40, 50), bool)
    mask[10:20, 5:15] = True
    out = np.asarray(overlay_masks(image, [mask]))
    assert (out[~mask] == 100).all() and (out[mask] != 100).any(axis=1).all()
    with pytest.raises(ValueError, match="mask 0 is 50x40"):
        overlay_masks(Image.new("RGB", (40, 50)), [mask])


def test_refine_picture_enlarges_small_images_and_greys_unrefined_rows():
    image = Image.new("RGB", (320, 160), (128, 128, 128))
    rows = [{"iou_pred": 0.8}, {"refine_error": "outside_image: ..."}]
    boxes = [(np.array([10.0, 10, 100, 100]), np.array([20.0, 20, 90, 90])), (np.array([200.0, 20, 300, 150]), None)]
    picture = refine_picture(image, rows, boxes)
    assert picture.size == (640, 320)  # labels read at 640 pixels
    assert colour_near(picture, 180, 100, REFINED)  # right edge of the refined box, at twice the size
    assert colour_near(picture, 400, 200, (160, 160, 160))  # the unrefined row's box, grey


def test_gain_plots_one_panel_per_set(tmp_path):
    rng = np.random.default_rng(0)
    before = rng.uniform(0.3, 0.9, 50)
    groups = {"": (before, np.clip(before + rng.normal(0.05, 0.05, 50), 0, 1)), "small": (before, before),
              "empty": (np.zeros(0), np.zeros(0))}
    paths = plot_gain(groups, tmp_path, "evaluate_val")
    assert [p.name for p in paths] == ["evaluate_val_iou_gain.png", "evaluate_val_iou_before_after.png"]
    for path in paths:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.width == round(4.2 * 2 * 90)  # the empty set has no panel
