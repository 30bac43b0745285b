"""tqdm bars that refresh live in a terminal and only now and then in a log file or CI."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

from boxrefiner.utils import distributed


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if interactive else 15.0)
    if distributed.rank_from_environment() != 0:  # under torchrun, rank 0 alone draws the bars
        kwargs["disable"] = True
    return tqdm(iterable, dynamic_ncols=True, **kwargs)
