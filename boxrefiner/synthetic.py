"""Deterministic synthetic data in FungiTastic's own layout, so demos and tests run the real loader.

Each image shows one mushroom (cap + stem, varied colours, sizes and positions) on a textured
background with leaf-like distractors. The image and its part masks are drawn at a "full" size; the
JPEG is saved at `<size>p` (longest side), and the masks go into a CVAT-RLE parquet in full-size
coordinates, exactly like the published dataset.

    python -m boxrefiner.synthetic --out data/synthetic_fungitastic --train 96 --val 32 --seed 0
"""

from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from .fileio import atomic_write, write_json
from .rle import encode_cvat_rle

SUBSET = "FungiTastic-Mini"
FULL_LONG_SIDE = 960
_ASPECTS = ((4, 3), (3, 4), (1, 1), (3, 2))
_SPLIT_FILES = {"train": ("Train", "TrainMasks"), "val": ("ClosedSet-Val", "ValidationMasks")}


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))  # type: ignore[return-value]


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Earthy low-frequency texture with fine grain and a few leaf-like blobs."""
    base = np.array([_hsv(rng.uniform(0.05, 0.30), rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.6)) for _ in range(2)], float)
    coarse = rng.random((rng.integers(6, 14), rng.integers(6, 14)))
    blend = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC), float) / 255
    img = base[0] * blend[..., None] + base[1] * (1 - blend[..., None])
    img += rng.normal(0, 12, (height, width, 1))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(3, 9)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.02, 0.08) * width, rng.uniform(0.01, 0.04) * height
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry),
                     fill=_hsv(rng.uniform(0.08, 0.35), rng.uniform(0.4, 0.9), rng.uniform(0.2, 0.7)))
    return canvas.filter(ImageFilter.GaussianBlur(1.0))


def draw_mushroom(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """One image and its part masks ({'cap': HxW bool, 'stem': HxW bool}) at full size."""
    image = _background(rng, width, height)
    short = min(width, height)
    cap_w = rng.uniform(0.18, 0.55) * short
    cap_h = cap_w * rng.uniform(0.35, 0.75)
    stem_w = cap_w * rng.uniform(0.15, 0.32)
    stem_h = cap_w * rng.uniform(0.35, 1.0)
    total_h = cap_h * 0.6 + stem_h
    cx = rng.uniform(cap_w / 2 + 2, width - cap_w / 2 - 2)
    top = rng.uniform(2, height - total_h - 2)
    lean = rng.uniform(-0.25, 0.25) * stem_w

    stem_top = top + cap_h * 0.6
    stem = [(cx - stem_w / 2, stem_top), (cx + stem_w / 2, stem_top),
            (cx + stem_w * 0.6 + lean, stem_top + stem_h), (cx - stem_w * 0.6 + lean, stem_top + stem_h)]
    cap = (cx - cap_w / 2, top, cx + cap_w / 2, top + cap_h)

    masks = {}
    for part, shape in (("stem", stem), ("cap", cap)):
        layer = Image.new("L", (width, height), 0)
        (ImageDraw.Draw(layer).polygon if part == "stem" else ImageDraw.Draw(layer).ellipse)(shape, fill=255)
        masks[part] = np.asarray(layer) > 127

    hue = rng.choice([rng.uniform(0.0, 0.12), rng.uniform(0.12, 0.17), rng.uniform(0.55, 0.9)])
    cap_colour = _hsv(hue, rng.uniform(0.3, 0.95), rng.uniform(0.45, 0.95))
    stem_colour = _hsv(hue, rng.uniform(0.05, 0.3), rng.uniform(0.75, 0.98))
    draw = ImageDraw.Draw(image)
    draw.polygon(stem, fill=stem_colour)
    draw.ellipse(cap, fill=cap_colour)
    if rng.random() < 0.5:  # spots, inside the cap
        for _ in range(rng.integers(3, 10)):
            sx, sy = rng.uniform(cap[0] + cap_w * 0.2, cap[2] - cap_w * 0.2), rng.uniform(top + cap_h * 0.15, top + cap_h * 0.6)
            r = cap_w * rng.uniform(0.02, 0.06)
            draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(235, 230, 220))
    return image, masks


def generate(out: str | Path, train: int = 96, val: int = 32, seed: int = 0, sizes: tuple[int, ...] = (300,)) -> Path:
    """Write the dataset under `out`; the same arguments always give the same files."""
    out = Path(out)
    for split, count in (("train", train), ("val", val)):
        csv_suffix, masks_suffix = _SPLIT_FILES[split]
        rows, mask_rows = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
            aw, ah = _ASPECTS[rng.integers(len(_ASPECTS))]
            scale = FULL_LONG_SIDE / max(aw, ah)
            width, height = int(round(aw * scale)), int(round(ah * scale))
            image, masks = draw_mushroom(rng, width, height)
            name = f"{split}-{seed}-{i:05d}.JPG"
            for size in sizes:
                factor = size / max(width, height)
                small = image.resize((int(round(width * factor)), int(round(height * factor))), Image.LANCZOS)
                atomic_write(out / SUBSET / split / f"{size}p" / name, lambda f, im=small: im.save(f, "JPEG", quality=90))
            rows.append({"filename": name, "observationID": 1000 * (seed + 1) + i, "species": "Synthetica fungoides",
                         "category_id": int(i % 5)})
            for label, mask in masks.items():
                mask_rows.append({"file_name": name, "label": label, "width": width, "height": height,
                                  "rle": encode_cvat_rle(mask)})
        atomic_write(out / "metadata" / SUBSET / f"{SUBSET}-{csv_suffix}.csv",
                     lambda f, r=rows: f.write(pd.DataFrame(r).to_csv(index=False).encode()))
        atomic_write(out / "masks" / f"{SUBSET}-{masks_suffix}.parquet",
                     lambda f, r=mask_rows: pd.DataFrame(r).to_parquet(f, index=False))
    return out


def simulated_detections(root: str | Path, split: str = "val", center_std: float = 0.15, scale_std: float = 0.2,
                         seed: int = 0, per_image: int = 1) -> list[dict]:
    """A stand-in for a detector's output on a dataset: every image's ground-truth box (read by the
    real loader) with detector-like noise, a score and an extra field, as refine_boxes.py reads them;
    `per_image` independent detections of each image (rows grouped by image)."""
    import torch

    from .boxes import jitter_draws
    from .config import BoxNoiseConfig, DataConfig
    from .data import load_split

    samples = load_split(DataConfig(data_root=str(root)), split).samples
    longest = torch.tensor([[max(s.width, s.height)] for s in samples], dtype=torch.float64)
    truth = torch.tensor([s.box for s in samples], dtype=torch.float64) / longest
    extent = torch.tensor([(s.width, s.height) for s in samples], dtype=torch.float64) / longest
    max_sigma = BoxNoiseConfig().max_sigma  # draws clipped as in training
    generator = torch.Generator().manual_seed(seed)
    noisy = jitter_draws(truth, extent, center_std, scale_std, max_sigma, per_image, generator) * longest[:, None]
    scores = np.random.default_rng(seed).uniform(0.3, 0.99, (len(samples), per_image))
    return [{"file_name": s.file_name, "bbox": [round(float(v), 2) for v in box], "score": round(float(score), 3),
             "label": "fungus"} for s, boxes, row in zip(samples, noisy, scores) for box, score in zip(boxes, row)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic dataset in FungiTastic-Mini's layout.")
    parser.add_argument("--out", required=True, help="dataset root to write (metadata/, FungiTastic-Mini/, masks/)")
    parser.add_argument("--train", type=int, default=96, help="number of training images")
    parser.add_argument("--val", type=int, default=32, help="number of validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[300], help="image folders to write, e.g. 300 500")
    parser.add_argument("--detections", type=Path,
                        help="also write simulated detections (noisy xyxy boxes) of the val images to this JSON")
    parser.add_argument("--center-std", type=float, default=0.15, help="detection noise: centre shift / box size")
    parser.add_argument("--scale-std", type=float, default=0.2, help="detection noise: std of log width/height")
    parser.add_argument("--boxes-per-image", type=int, default=1, help="independent simulated detections per image")
    args = parser.parse_args(argv)
    if args.train < 1 or args.val < 1 or args.boxes_per_image < 1:
        parser.error("--train, --val and --boxes-per-image must be at least 1")
    root = generate(args.out, args.train, args.val, args.seed, tuple(args.sizes))
    print(f"wrote {args.train} train and {args.val} val images to {root}")
    if args.detections:
        rows = simulated_detections(root, "val", args.center_std, args.scale_std, args.seed, args.boxes_per_image)
        write_json(args.detections, rows)
        print(f"wrote {len(rows)} simulated detections to {args.detections}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
