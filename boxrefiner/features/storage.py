"""How a cache entry stores one feature map (C, H, W): float16 or float32 as it is, or int8 per
channel: each channel's H*W values mapped linearly onto 256 levels between its minimum and maximum,
followed in the same row by that channel's scale and zero point as two float32 (8 bytes). The entry
file is then a (C, H*W + 8) int8 `.npy`: half of float16's bytes, read and written like the others.

Encoding runs in torch on a batch, on whatever device the encoder left it (`encode_batch`): on a GPU
the maps leave it already in their stored bytes (float16 and int8: half and a quarter of float32's),
and on a CPU the conversion is vectorised and runs with the encoder's threads rather than beside them.

Readers always get the values back (`decode`): float16/float32 maps as stored, int8 maps as
`level * scale + zero` in float16, so an int8 split held in memory takes float16's room, not float32's
(float16's own rounding, at most 0.0039 on values within ±8, adds to the quantisation's half level).
What training and inference see is `round_trip(features)`, the same values a read returns, so a
freshly encoded image and a cached one give the same boxes.
"""

from __future__ import annotations

import numpy as np
import torch

from boxrefiner.utils.device import one_thread_after_fork

STORAGE_DTYPES = ("float16", "float32", "int8")
_PARAMS = 8  # bytes of (scale, zero) per channel, as float32
one_thread_after_fork()  # entries are also encoded in forked processes (writers of a shared cache)


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
        self.limit = float(np.finfo(self.value_dtype).max)  # the largest magnitude a read can hand back

    @property
    def disk_bytes(self) -> int:
        return int(np.prod(self.disk_shape)) * self.disk_dtype.itemsize

    def fits(self, features: torch.Tensor) -> torch.Tensor:
        """Per map of the batch (B, C, H, W): whether it is finite and within what a read can hand back
        (float16, also int8's decoded values, ends at 65504). One reduction: NaN and inf fail it."""
        return features.flatten(1).abs().amax(dim=1) <= self.limit

    def encode_batch(self, features: torch.Tensor) -> torch.Tensor:
        """The arrays the entries of a batch of maps hold, (B, *disk_shape), on the maps' device."""
        if tuple(features.shape[1:]) != self.shape:
            raise ValueError(f"feature maps {tuple(features.shape[1:])} are not the storage's {self.shape}")
        if not self.quantised:
            return features.to(getattr(torch, self.name)).contiguous()
        flat = features.float().reshape(len(features), self.shape[0], self.cells)
        zero = flat.amin(dim=2)
        # divided by a tensor, not a Python number: CUDA would multiply by 1/255 (one bit off) instead
        scale = (flat.amax(dim=2) - zero) / torch.full_like(zero, 255.0)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant channel: any scale decodes it
        levels = (flat - zero[..., None]).div_(scale[..., None]).round_().clamp_(0, 255).sub_(128).to(torch.int8)
        params = torch.stack([scale, zero], dim=2).contiguous().view(torch.int8)  # (B, C, 8): two float32
        return torch.cat([levels, params], dim=2)

    def encode(self, features: np.ndarray) -> np.ndarray:
        """The array an entry holds for one map."""
        return self.encode_batch(torch.from_numpy(np.asarray(features))[None])[0].numpy()

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
