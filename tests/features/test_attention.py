"""The SDPA attention path computes what HQ-SAM's own attention computes (within float rounding), for
the ViT encoders (relative-position bias as the mask) and TinyViT (its bias table as the mask), from
the same weights; and it does not enter the cache key."""

import copy
import dataclasses
import functools

import pytest
import torch

from boxrefiner.config import HQSAMConfig
from boxrefiner.features.attention import use_sdpa
from boxrefiner.features.encoder import build_image_encoder, encoder_identity, hq_modeling, random_init_rng


def perturbed(model_type):
    """A random build with every tensor moved (zero-initialised relative positions would hide the bias)."""
    return copy.deepcopy(_perturbed(model_type))


@functools.cache
def _perturbed(model_type):
    with random_init_rng():
        encoder = build_image_encoder(model_type, 256)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    encoder.train(False)  # TinyViT derives its bias table from the moved weights
    return encoder


@pytest.mark.parametrize("model_type, attention_modules", [("vit_b", 12), ("vit_tiny", 10)])
def test_sdpa_attention_equals_the_original(model_type, attention_modules):
    encoder = perturbed(model_type)
    keys = list(encoder.state_dict())
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        embedding, interm = encoder(images)
        assert use_sdpa(encoder, hq_modeling()) == attention_modules
        fused, fused_interm = encoder(images)
    assert list(encoder.state_dict()) == keys  # the same weights load either way
    assert (embedding - fused).abs().max() < 1e-4 * embedding.abs().max()
    assert (interm[0] - fused_interm[0]).abs().max() < 1e-4 * interm[0].abs().max()


def test_sdpa_under_bf16_stays_as_close_to_fp32_as_the_original():
    """A small ViT of the same blocks (windowed and global attention, relative positions): bf16 is slow
    on some CPUs."""
    with random_init_rng():
        encoder = hq_modeling().ImageEncoderViT(
            depth=2, embed_dim=96, img_size=128, mlp_ratio=4, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=3, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=3,
            out_chans=32).eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = encoder(images)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            original = encoder(images)[0].float()
        use_sdpa(encoder, hq_modeling())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = encoder(images)[0].float()
    assert (fused - reference).abs().mean() < 2 * (original - reference).abs().mean() + 1e-3


def test_how_the_encoder_computes_is_not_part_of_the_cache_key():
    base = HQSAMConfig(model_type="vit_tiny", allow_random_init=True, input_size=256)
    keys = {encoder_identity(dataclasses.replace(base, attention=a, compile=c, channels_last=m)).key
            for a in ("sdpa", "original") for c in (False, True) for m in (False, True)}
    assert len(keys) == 1
    assert encoder_identity(dataclasses.replace(base, precision="bf16")).key not in keys  # what it computes is


def test_an_encoder_that_cannot_compile_runs_eagerly_with_one_line(caplog):
    """Where torch.compile fails (no compiler, an unsupported op), the features are the eager ones and
    the log says why, once."""
    from boxrefiner.features.encoder import ImageEncoder
    identity = encoder_identity(HQSAMConfig(model_type="vit_tiny", allow_random_init=True, input_size=256))
    eager = ImageEncoder(perturbed("vit_tiny"), identity, torch.device("cpu"))
    compiled = ImageEncoder(perturbed("vit_tiny"), identity, torch.device("cpu"), channels_last=True, compiled=True)
    calls = []

    def broken(images):
        calls.append(images.shape)
        raise RuntimeError("InductorError: no C++ compiler found\nmore detail")

    compiled.run = broken  # what torch.compile's wrapper raises on its first call where it cannot build
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with caplog.at_level("WARNING", logger="boxrefiner"):
        first, second = compiled.encode(images), compiled.encode(images)
    assert len(calls) == 1 and compiled.run is None
    lines = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert lines == ["hqsam.compile: torch.compile cannot compile the encoder here (RuntimeError: InductorError: no C++ "
                     "compiler found); it runs eagerly"]
    reference = eager.encode(images)
    assert torch.equal(first, second)
    assert (first - reference).abs().max() < 1e-4 * reference.abs().max()  # channels-last: the same within rounding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model_type", ["vit_b", "vit_tiny"])
def test_sdpa_on_cuda_equals_the_original_and_bf16_stays_close(model_type):
    """On a GPU SDPA takes the fused (flash / memory-efficient) kernels: the same features within
    float rounding, and bf16 within bf16's own distance from fp32."""
    encoder = perturbed(model_type).cuda()
    images = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        reference = encoder(images)[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            original_bf16 = encoder(images)[0].float()
        use_sdpa(encoder, hq_modeling())
        fused = encoder(images)[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused_bf16 = encoder(images)[0].float()
    assert (fused - reference).abs().max() < 1e-3 * reference.abs().max()  # TF32 matmuls may be on
    assert (fused_bf16 - reference).abs().mean() < 2 * (original_bf16 - reference).abs().mean() + 1e-3
