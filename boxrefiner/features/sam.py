"""HQ-SAM's whole model (image encoder, prompt encoder, HQ mask decoder), prompted with boxes.

The registry builders of `segment-anything-hq` fix the input at 1024 and load checkpoints leniently
(see encoder.py). Here the model is built at the refiner's input size around the same image encoder
the features come from, and every tensor of the checkpoint is loaded strictly. Masks come from
`SamPredictor.predict_torch` itself: the predictor is only handed embeddings that were computed in
batches instead of one `set_image` call per image (the result is the same; a test checks it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from boxrefiner.features.encoder import (
    EMBED_DIM,
    PATCH,
    PIXEL_MEAN,
    PIXEL_STD,
    VIT_ARGS,
    EncoderError,
    build_image_encoder,
    hq_modeling,
    load_strictly,
    random_init_rng,
    read_sam_state,
    resized_shape,
    submodule_state,
)

if TYPE_CHECKING:
    from segment_anything_hq.modeling import Sam

log = logging.getLogger(__name__)
_BOX_CHUNK = 16  # boxes decoded together: each mask is upsampled to the full image in float32
_TINY_VIT_DIM = 160  # TinyViT's early-layer width, read by the HQ decoder


class MaskDecoderUnavailable(EncoderError):
    """The checkpoint has no HQ-SAM mask decoder (a plain SAM file, say); one-line message."""


def build_sam_hq(model_type: str, input_size: int = 1024) -> Sam:
    """The whole HQ-SAM model, random weights, eval mode; the image encoder is built first, so that under
    a fixed seed it gets exactly the weights `encoder.build_encoder` gives (the refiner's features)."""
    modeling = hq_modeling()
    image_encoder = build_image_encoder(model_type, input_size)
    grid = input_size // PATCH
    vit_dim = _TINY_VIT_DIM if model_type == "vit_tiny" else VIT_ARGS[model_type][0]
    sam = modeling.Sam(
        image_encoder=image_encoder,
        prompt_encoder=modeling.PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(grid, grid),
                                              input_image_size=(input_size, input_size), mask_in_chans=16),
        mask_decoder=modeling.MaskDecoderHQ(
            num_multimask_outputs=3, transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM,
                                                                           mlp_dim=2048, num_heads=8),
            transformer_dim=EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256, vit_dim=vit_dim),
        pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))
    sam.eval()
    sam.requires_grad_(False)
    return sam


def load_sam_hq(model_type: str, input_size: int, checkpoint: str | None) -> Sam:
    """HQ-SAM with every weight from `checkpoint`, or (None) with seeded random weights, loudly."""
    if checkpoint is None:
        with random_init_rng():
            sam = build_sam_hq(model_type, input_size)
        log.warning("HQ-SAM %s (encoder and mask decoder) has RANDOM, UNTRAINED weights: its features and masks mean "
                    "nothing; demos and tests only",
                    model_type)
        return sam
    state = read_sam_state(checkpoint)
    sam = build_sam_hq(model_type, input_size)
    load_strictly(sam.image_encoder, submodule_state(state, "image_encoder"), model_type, checkpoint)
    decoder_state = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    expected = [k for k in sam.state_dict() if k.startswith(("prompt_encoder.", "mask_decoder."))]
    missing = [k for k in expected if k not in decoder_state]
    if missing:
        raise MaskDecoderUnavailable(f"hqsam.checkpoint '{checkpoint}' has no HQ-SAM mask decoder ({len(missing)} keys "
                                     f"missing, e.g. {missing[0]}): masks need an HQ-SAM checkpoint such as "
                                     "sam_hq_vit_h.pth")
    rest = torch.nn.ModuleDict({"prompt_encoder": sam.prompt_encoder, "mask_decoder": sam.mask_decoder})
    load_strictly(rest, decoder_state, model_type, checkpoint, part="prompt encoder / mask decoder")
    log.info("HQ-SAM %s mask decoder loaded from %s", model_type, checkpoint)
    return sam


class BoxPrompter:
    """Masks from HQ-SAM prompted with boxes, on embeddings computed beforehand (in batches)."""

    def __init__(self, sam: Sam, device: torch.device):
        hq_modeling()  # imports the package quietly; the import below then prints nothing
        from segment_anything_hq import SamPredictor
        self.predictor = SamPredictor(sam.to(device))
        self.input_size = sam.image_encoder.img_size

    @torch.inference_mode()
    def masks(self, embedding: torch.Tensor, interm: torch.Tensor, width: int, height: int,
              boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks (N, height, width) and HQ-SAM's predicted IoU (N,) for `boxes` (N, 4) xyxy
        pixels of a `width` x `height` image, exactly as `SamPredictor.set_image` +
        `predict(box=..., multimask_output=False)` (HQ-SAM's default output: SAM's mask + the HQ token's)."""
        p = self.predictor
        p.features = embedding[None].to(p.device)
        p.interm_features = [interm[None].to(p.device)]
        p.original_size = (height, width)
        p.input_size = resized_shape(height, width, self.input_size)
        p.is_image_set = True
        prompts = p.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float, device=p.device),
                                                (height, width))
        masks, scores = [], []
        for chunk in prompts.split(_BOX_CHUNK):
            predicted, iou, _ = p.predict_torch(None, None, boxes=chunk, multimask_output=False)
            masks.append(predicted[:, 0].cpu().numpy())
            scores.append(iou[:, 0].float().cpu().numpy())
        p.reset_image()
        if not masks:
            return np.zeros((0, height, width), dtype=bool), np.zeros(0, dtype=np.float32)
        return np.concatenate(masks), np.concatenate(scores)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of one image (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
