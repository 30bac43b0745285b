"""How a cache entry stores one feature map (C, H, W): float16 or float32 as it is, or int8 per
channel: each channel's H*W values mapped linearly onto 256 levels between its minimum and maximum,
followed in the same row by that channel's scale and zero point as two float32 (8 bytes). The entry
file is then a (C, H*W + 8) int8 `.npy`: half of float16's bytes, read and written like the others.

Readers always get the values back (`decode`): float16/float32 maps as stored, int8 maps as
`level * scale + zero` in float16, so an int8 split held in memory takes float16's room, not float32's
(float16's own rounding, at most 0.0039 on values within ±8, adds to the quantisation's half level). What training and inference see is `round_trip(features)`, the same values
a read returns, so a freshly encoded image and a cached one give the same boxes.
"""

from __future__ import annotations

import numpy as np

STORAGE_DTYPES = ("float16", "float32", "int8")
_PARAMS = 8  # bytes of (scale, zero) per channel, as float32


class Storage:
    """The codec of one storage dtype for maps of one shape."""

    def __init__(self, storage_dtype: str, shape: tuple[int, ...]):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype '{storage_dtype}' is not one of {', '.join(STORAGE_DTYPES)}")
        self.name = storage_dtype
        self.shape = tuple(shape)
        self.quantised = storage_dtype == "int8"
        channels, cells = shape[0], int(np.prod(shape[1:]))
        self.cells = cells
        self.value_dtype = np.dtype(np.float16 if self.quantised else storage_dtype)  # what a read hands out
        self.disk_dtype = np.dtype(storage_dtype)
        self.disk_shape = (channels, cells + _PARAMS) if self.quantised else self.shape

    @property
    def disk_bytes(self) -> int:
        return int(np.prod(self.disk_shape)) * self.disk_dtype.itemsize

    def encode(self, features: np.ndarray) -> np.ndarray:
        """The array an entry holds for these features."""
        if not self.quantised:
            return np.ascontiguousarray(features, dtype=self.disk_dtype)
        flat = np.asarray(features, dtype=np.float32).reshape(self.shape[0], self.cells)
        zero = flat.min(axis=1)
        scale = (flat.max(axis=1) - zero) / 255.0
        scale[~(scale > 0)] = 1.0  # a constant channel (or NaN, which the caller refuses): any scale decodes it
        levels = np.clip(np.rint((flat - zero[:, None]) / scale[:, None]), 0, 255) - 128
        out = np.empty(self.disk_shape, np.int8)
        out[:, :self.cells] = levels.astype(np.int8)
        out[:, self.cells:] = np.stack([scale, zero], axis=1).astype(np.float32).view(np.int8)
        return out

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """The values of an entry's array (float16/float32: the array itself)."""
        if not self.quantised:
            return stored
        params = np.ascontiguousarray(stored[:, self.cells:]).view(np.float32)  # (C, 2): scale, zero
        values = (stored[:, :self.cells].astype(np.float32) + 128.0) * params[:, :1] + params[:, 1:]
        return values.astype(self.value_dtype).reshape(self.shape)

    def round_trip(self, features: np.ndarray) -> np.ndarray:
        """What a read of these features would return."""
        return self.decode(self.encode(features))
