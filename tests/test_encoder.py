"""The encoder sees exactly what SamPredictor.set_image feeds HQ-SAM, and never silently random weights."""

import warnings

import numpy as np
import pytest
import torch

from boxrefiner.config import HQSAMConfig
from boxrefiner.encoder import (EncoderError, build_encoder, build_image_encoder, encoder_identity, preprocess,
                                resized_shape)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sam_tiny_checkpoint(tmp_path_factory):
    """A full HQ-SAM vit_tiny state dict (random weights) saved the way the official files are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from segment_anything_hq import sam_model_registry
    torch.manual_seed(11)
    sam = sam_model_registry["vit_tiny"](checkpoint=None)
    path = tmp_path_factory.mktemp("ckpt") / "sam_hq_vit_tiny.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


def test_features_match_sam_predictor(sam_tiny_checkpoint):
    from segment_anything_hq import SamPredictor
    sam, path = sam_tiny_checkpoint
    image = (np.random.default_rng(0).random((225, 300, 3)) * 255).astype(np.uint8)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    cfg = HQSAMConfig(checkpoint=str(path), model_type="vit_tiny")
    encoder = build_encoder(cfg, CPU, encoder_identity(cfg))
    ours = encoder.encode(preprocess(image, 1024)[None])
    assert ours.shape == (1, 256, 64, 64)
    torch.testing.assert_close(ours, predictor.features, rtol=0, atol=1e-5)


def test_preprocess_scales_longest_side_and_pads_right_bottom():
    image = np.full((225, 300, 3), 200, np.uint8)
    assert resized_shape(225, 300, 1024) == (768, 1024)
    x = preprocess(image, 1024)
    assert x.shape == (3, 1024, 1024)
    assert (x[:, :768, :] != 0).all() and (x[:, 768:, :] == 0).all()


def test_wrapped_checkpoint_is_unwrapped(sam_tiny_checkpoint, tmp_path):
    sam, path = sam_tiny_checkpoint
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": sam.state_dict(), "epoch": 3}, wrapped)
    cfg = HQSAMConfig(checkpoint=str(wrapped), model_type="vit_tiny")
    encoder = build_encoder(cfg, CPU, encoder_identity(cfg))
    torch.testing.assert_close(encoder.module.state_dict(), sam.image_encoder.state_dict())


def test_checkpoint_of_another_model_type_is_refused(sam_tiny_checkpoint):
    _, path = sam_tiny_checkpoint
    cfg = HQSAMConfig(checkpoint=str(path), model_type="vit_b")
    with pytest.raises(EncoderError, match="does not fit hqsam.model_type 'vit_b'.*missing"):
        build_encoder(cfg, CPU, encoder_identity(cfg))


@pytest.mark.parametrize("content,match", [
    ({"weights": torch.zeros(3)}, "no 'image_encoder.\\*' weights"),
    (b"not a checkpoint at all", "cannot be read as a PyTorch checkpoint"),
])
def test_foreign_files_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    cfg = HQSAMConfig(checkpoint=str(path), model_type="vit_tiny")
    with pytest.raises(EncoderError, match=match):
        build_encoder(cfg, CPU, encoder_identity(cfg))


def test_missing_checkpoint_and_random_init_opt_in(tmp_path, caplog):
    with pytest.raises(EncoderError, match="does not exist"):
        encoder_identity(HQSAMConfig(checkpoint=str(tmp_path / "absent.pth")))
    with pytest.raises(EncoderError, match="allow_random_init"):
        encoder_identity(HQSAMConfig(checkpoint=None, allow_random_init=False))
    cfg = HQSAMConfig(model_type="vit_tiny", allow_random_init=True, input_size=256)
    a = build_encoder(cfg, CPU, encoder_identity(cfg))
    assert "RANDOM, UNTRAINED" in caplog.text
    b = build_encoder(cfg, CPU, encoder_identity(cfg))
    torch.testing.assert_close(a.module.state_dict(), b.module.state_dict())  # reproducible random init


def test_identity_changes_with_everything_that_changes_features(sam_tiny_checkpoint, tmp_path):
    _, path = sam_tiny_checkpoint
    base = HQSAMConfig(checkpoint=str(path), model_type="vit_tiny")
    keys = {encoder_identity(base).key,
            encoder_identity(HQSAMConfig(checkpoint=str(path), model_type="vit_tiny", precision="bf16")).key,
            encoder_identity(HQSAMConfig(checkpoint=str(path), model_type="vit_tiny", input_size=512)).key}
    other = tmp_path / "other.pth"
    other.write_bytes(path.read_bytes() + b"\0")
    keys.add(encoder_identity(HQSAMConfig(checkpoint=str(other), model_type="vit_tiny")).key)
    assert len(keys) == 4


@pytest.mark.parametrize("model_type", ["vit_tiny", "vit_b"])
def test_small_input_sizes_give_small_grids(model_type):
    encoder = build_image_encoder(model_type, 256)
    with torch.inference_mode():
        out, _ = encoder(torch.zeros(1, 3, 256, 256))
    assert out.shape == (1, 256, 16, 16)


def test_cached_entry_is_the_predictors_features_in_float16(sam_tiny_checkpoint, synthetic_root, tmp_path):
    from segment_anything_hq import SamPredictor

    from boxrefiner.cache import FeatureCache, file_digest
    from boxrefiner.config import DataConfig
    from boxrefiner.data import load_rgb, load_split
    from boxrefiner.features import warm_up

    sam, path = sam_tiny_checkpoint
    sample = load_split(DataConfig(data_root=str(synthetic_root)), "val").samples[0]
    cfg = HQSAMConfig(checkpoint=str(path), model_type="vit_tiny")
    identity = encoder_identity(cfg)
    cache = FeatureCache(tmp_path, "val", identity, "float16")
    key = cache.key_for(file_digest(sample.image_path))
    warm_up(cache, [sample], [key], lambda: build_encoder(cfg, CPU, identity), batch_size=1, num_workers=0)
    predictor = SamPredictor(sam)
    predictor.set_image(load_rgb(sample.image_path))
    assert np.array_equal(cache.load(key), predictor.features[0].numpy().astype(np.float16))
