import hashlib

import pandas as pd

from boxrefiner.cli.synth import main
from boxrefiner.config import DataConfig
from boxrefiner.data.splits import load_split
from boxrefiner.data.synthetic import generate


def digest_tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = digest_tree(generate(tmp_path / "a", train=3, val=2, seed=5))
    b = digest_tree(generate(tmp_path / "b", train=3, val=2, seed=5))
    c = digest_tree(generate(tmp_path / "c", train=3, val=2, seed=6))
    assert a == b
    jpegs = [k for k in a if k.endswith(".JPG")]
    assert len(jpegs) == 5 and all(a[k] != c.get(k.replace("-5-", "-6-")) for k in jpegs)


def test_layout_loads_with_parts_drawn_at_full_size(tmp_path):
    root = tmp_path / "ds"
    assert main(["--out", str(root), "--train", "4", "--val", "2", "--seed", "1"]) == 0
    masks = pd.read_parquet(root / "masks" / "FungiTastic-Mini-TrainMasks.parquet")
    assert set(masks["label"]) == {"cap", "stem"} and masks["width"].max() == 960
    split = load_split(DataConfig(data_root=str(root)), "train")
    assert len(split.images) == len(split.objects) == 4 and not split.skipped
    for s, o in zip(split.images, split.objects):
        assert max(s.width, s.height) == 300
        x0, y0, x1, y1 = o.box
        assert 0 <= x0 < x1 <= s.width and 0 <= y0 < y1 <= s.height
        assert (x1 - x0) * (y1 - y0) > 0.01 * s.width * s.height
