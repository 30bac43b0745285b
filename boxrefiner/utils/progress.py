"""tqdm bars that refresh live in a terminal and only now and then in a log file or CI."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if interactive else 15.0)
    return tqdm(iterable, dynamic_ncols=True, **kwargs)
