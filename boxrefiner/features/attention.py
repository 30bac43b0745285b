"""HQ-SAM's encoder attention through `torch.nn.functional.scaled_dot_product_attention`: the same
weights and the same result within float rounding, computed by PyTorch's fused kernels instead of an
explicit softmax(q k^T) v, as segment-anything-fast does for SAM.

- ViT (vit_b/l/h): the decomposed relative-position terms, computed from the unscaled queries as the
  original does, become the additive attention mask.
- TinyViT (vit_tiny): its per-head attention-bias table (`ab`, derived in eval mode) is the mask.

`use_sdpa(encoder)` switches every attention module of a built encoder in place (their class, not
their parameters), so a state dict loads the same either way.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _vit_attention_class(image_encoder: Any) -> type[nn.Module]:

    class SDPAAttention(image_encoder.Attention):
        """ViT attention with the relative-position bias as the additive SDPA mask."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, h, w, _ = x.shape
            qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
            bias = None
            if self.use_rel_pos:
                rh = image_encoder.get_rel_pos(h, h, self.rel_pos_h)
                rw = image_encoder.get_rel_pos(w, w, self.rel_pos_w)
                r_q = q.reshape(b * self.num_heads, h, w, -1)
                rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
                rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
                bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b, self.num_heads, h * w, h * w)
            shape = (b, self.num_heads, h * w, -1)
            out = F.scaled_dot_product_attention(q.view(shape), k.view(shape), v.view(shape), attn_mask=bias)
            out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
            return self.proj(out)

    return SDPAAttention


@functools.cache
def _tiny_attention_class(tiny: Any) -> type[nn.Module]:

    class SDPATinyAttention(tiny.Attention):
        """TinyViT attention with its attention-bias table as the additive SDPA mask."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q, k, v = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d],
                                                                                  dim=3)
            bias = self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=bias.to(q.dtype), scale=self.scale)
            return self.proj(out.transpose(1, 2).reshape(b, n, self.dh))

    return SDPATinyAttention


def use_sdpa(encoder: nn.Module, modeling: Any) -> int:
    """Switch every attention module of an HQ-SAM image encoder (built from `modeling`,
    segment_anything_hq.modeling) to its SDPA form; returns how many."""
    swaps = ((modeling.image_encoder.Attention, _vit_attention_class(modeling.image_encoder)),
             (modeling.tiny_vit_sam.Attention, _tiny_attention_class(modeling.tiny_vit_sam)))
    switched = 0
    for module in encoder.modules():
        for original, fused in swaps:
            if type(module) is original:
                module.__class__ = fused
                switched += 1
    return switched
