"""The encoder sees exactly what SamPredictor.set_image feeds HQ-SAM, and never silently random weights."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from boxrefiner.config import HQSAMConfig
from boxrefiner.features.encoder import (
    EncoderError,
    build_encoder,
    build_image_encoder,
    encoder_identity,
    preprocess,
    resized_shape,
)

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
    sam, _path = sam_tiny_checkpoint
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": sam.state_dict(), "epoch": 3}, wrapped)
    cfg = HQSAMConfig(checkpoint=str(wrapped), model_type="vit_tiny")
    encoder = build_encoder(cfg, CPU, encoder_identity(cfg))
    torch.testing.assert_close(encoder.module.state_dict(), sam.image_encoder.state_dict())


def test_loading_a_checkpoint_draws_nothing_from_the_global_rng(sam_tiny_checkpoint):
    """The encoder is built only on a cache miss: its throw-away init must not move the head's dropout draws."""
    _, path = sam_tiny_checkpoint
    cfg = HQSAMConfig(checkpoint=str(path), model_type="vit_tiny")
    state = torch.get_rng_state()
    build_encoder(cfg, CPU, encoder_identity(cfg))
    assert torch.equal(torch.get_rng_state(), state)


def test_checkpoint_of_another_model_type_is_refused(sam_tiny_checkpoint):
    _, path = sam_tiny_checkpoint
    cfg = HQSAMConfig(checkpoint=str(path), model_type="vit_b")
    with pytest.raises(EncoderError, match="does not fit hqsam.model_type 'vit_b'.*missing"):
        build_encoder(cfg, CPU, encoder_identity(cfg))


@pytest.mark.parametrize("content,match", [
    ({"weights": torch.zeros(3)}, "no 'image_encoder.\\*' weights"),
    (b"not a checkpoint at all", "hqsam.checkpoint .* cannot be read: "),
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


@pytest.mark.parametrize("attention", ["original", "sdpa"])
def test_cached_entry_is_the_predictors_features_in_float16(sam_tiny_checkpoint, synthetic_root, tmp_path, attention):
    """The library's own attention gives the predictor's features to the bit; SDPA within float rounding."""
    from segment_anything_hq import SamPredictor

    from boxrefiner.config import DataConfig
    from boxrefiner.data.images import load_rgb
    from boxrefiner.data.splits import load_split
    from boxrefiner.features.cache import FeatureCache
    from boxrefiner.features.sources import warm_up
    from boxrefiner.utils.files import sha256_file

    sam, path = sam_tiny_checkpoint
    sample = load_split(DataConfig(data_root=str(synthetic_root)), "val").images[0]
    cfg = HQSAMConfig(checkpoint=str(path), model_type="vit_tiny", attention=attention)
    identity = encoder_identity(cfg)
    cache = FeatureCache(tmp_path, "val", identity, "float16")
    key = cache.key_for(sha256_file(sample.image_path))
    warm_up(cache, [sample], [key], lambda: build_encoder(cfg, CPU, identity), batch_size=1, num_workers=0)
    predictor = SamPredictor(sam)
    predictor.set_image(load_rgb(sample.image_path))
    expected = predictor.features[0].numpy()
    if attention == "original":
        assert np.array_equal(cache.load(key), expected.astype(np.float16))
    else:
        assert np.abs(cache.load(key).astype(np.float32) - expected).max() < 2e-3 * np.abs(expected).max()


# --- checkpoints whose every tensor differs from a fresh build (as any trained file's do) -------------

def reference_sam(model_type: str, input_size: int):
    """HQ-SAM built by segment_anything_hq's own classes (vit_tiny: its registry builder at 1024)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from segment_anything_hq import modeling, sam_model_registry
    if model_type == "vit_tiny":
        return sam_model_registry["vit_tiny"](checkpoint=None)
    from functools import partial
    encoder = modeling.ImageEncoderViT(depth=12, embed_dim=768, img_size=input_size, mlp_ratio=4,
                                       norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=12, patch_size=16,
                                       qkv_bias=True, use_rel_pos=True, global_attn_indexes=[2, 5, 8, 11],
                                       window_size=14, out_chans=256)
    grid = input_size // 16
    return modeling.Sam(image_encoder=encoder,
                        prompt_encoder=modeling.PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                                              input_image_size=(input_size, input_size), mask_in_chans=16),
                        mask_decoder=modeling.MaskDecoderHQ(
                            num_multimask_outputs=3, transformer=modeling.TwoWayTransformer(
                                depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256, vit_dim=768),
                        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


@pytest.fixture(scope="module", params=[("vit_tiny", 1024), ("vit_b", 256)], ids=["vit_tiny", "vit_b"])
def perturbed(request, tmp_path_factory, synthetic_root):
    """A checkpoint with every tensor moved off its fresh-build value, and SamPredictor's features and
    masks for one image with those weights (loaded, then switched to eval, as a correct loader does)."""
    from segment_anything_hq import SamPredictor

    from boxrefiner.data.images import load_rgb
    model_type, size = request.param
    torch.manual_seed(5)
    sam = reference_sam(model_type, size)
    generator = torch.Generator().manual_seed(6)

    def moved(name, value):
        if not value.is_floating_point():
            return value + 1  # BatchNorm's num_batches_tracked
        if name.endswith("running_var"):
            return value * (1.1 + torch.rand(value.shape, generator=generator))  # stays positive
        return value + 0.05 * torch.randn(value.shape, generator=generator)

    fresh = sam.state_dict()
    state = {k: moved(k, v) for k, v in fresh.items()}
    assert all(not torch.equal(state[k], fresh[k]) for k in fresh)
    path = tmp_path_factory.mktemp("perturbed") / f"sam_hq_{model_type}.pth"
    torch.save(state, path)
    sam.load_state_dict(state)
    sam.eval()
    image_path = next((synthetic_root / "FungiTastic-Mini" / "val" / "300p").glob("*.JPG"))
    image = load_rgb(image_path)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    box = np.array([20.0, 30.0, 180.0, 200.0])
    masks, _, _ = predictor.predict(box=box, multimask_output=False)
    return {"model_type": model_type, "size": size, "checkpoint": path, "image": image_path,
            "features": predictor.features[0].clone(), "box": box, "mask": masks[0]}


def perturbed_config(perturbed, work, **training):
    from conftest import small_config

    from boxrefiner.config import config_from_dict
    return config_from_dict(small_config(work, work, training=training, hqsam={
        "model_type": perturbed["model_type"], "input_size": perturbed["size"], "allow_random_init": False,
        "checkpoint": str(perturbed["checkpoint"]), "batch_size": 1},
        optimization={"feature_cache": {"cache_dir": str(work / "features"), "storage_dtype": "float32"}}))


def one_sample_split(perturbed):
    from boxrefiner.data.images import oriented_size
    from boxrefiner.data.splits import ImageRecord, ObjectRecord, SplitData
    width, height = oriented_size(perturbed["image"])
    return SplitData("val", [ImageRecord(perturbed["image"].name, perturbed["image"], width, height)],
                     [ObjectRecord(0, (10, 10, 100, 100))])


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "cache_off"])
def test_training_features_are_the_checkpoints(perturbed, tmp_path, cache):
    from boxrefiner.features.sources import FeatureSources
    cfg = perturbed_config(perturbed, tmp_path, feature_cache=cache)
    sources = FeatureSources(cfg, CPU, one_sample_split(perturbed), one_sample_split(perturbed), "fp32")
    [batch] = list(sources.val)
    torch.testing.assert_close(batch.features[0], perturbed["features"], rtol=0, atol=1e-4)


def test_refiner_features_and_masks_are_the_checkpoints(perturbed, tmp_path):
    from boxrefiner.infer.refiner import BoxRefiner
    from boxrefiner.modeling.head import BoxRefinementModule
    cfg = perturbed_config(perturbed, tmp_path)
    identity = encoder_identity(cfg.hqsam)
    refiner = BoxRefiner(BoxRefinementModule(), identity, cfg, CPU, read_cache=False, with_masks=True, num_workers=0)
    [item] = refiner.image_features([perturbed["image"]], for_masks=True)
    torch.testing.assert_close(item.embedding, perturbed["features"], rtol=0, atol=1e-4)  # float32 storage
    masks, _ = refiner.prompter.masks(*item.sam_features, item.width, item.height, perturbed["box"][None])
    assert (masks[0] != perturbed["mask"]).mean() < 1e-3
    plain = BoxRefiner(BoxRefinementModule(), identity, cfg, CPU, read_cache=False, num_workers=0)  # encoder alone
    [item] = plain.image_features([perturbed["image"]])
    torch.testing.assert_close(item.embedding, perturbed["features"], rtol=0, atol=1e-4)


def test_entries_of_the_old_vit_tiny_path_are_never_served(tmp_path):
    from boxrefiner.features.cache import FeatureCache
    from boxrefiner.features.encoder import EncoderIdentity
    cfg = HQSAMConfig(model_type="vit_tiny", allow_random_init=True, input_size=256)
    now = encoder_identity(cfg)
    before = EncoderIdentity(now.model_type, now.weights, now.input_size, now.precision)  # saved by version 0.2
    old = FeatureCache(tmp_path, "train", before)
    old.save(old.key_for("image"), np.ones(old.shape, np.float32), {"file": "x.jpg"})
    current = FeatureCache(tmp_path, "train", now)
    assert current.key_for("image") != old.key_for("image") and current.load(current.key_for("image")) is None
    assert now.current and not before.current
    assert encoder_identity(HQSAMConfig(model_type="vit_b", allow_random_init=True)).revision == ""  # keys kept


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, caplog):
    """`hqsam.precision: auto` (the demo's) becomes bf16 on a CPU with bfloat16 kernels and fp32 on one
    that would emulate it many times slower; the identity, and so the cache key, names the result."""
    from boxrefiner.config import config_from_dict
    from boxrefiner.features import encoder as encoder_module
    from boxrefiner.features.encoder import resolved_precision
    cfg = config_from_dict({"data": {"data_root": "x"},
                            "hqsam": {"model_type": "vit_tiny", "allow_random_init": True, "precision": "auto"}})
    with pytest.raises(ValueError, match="resolved"):
        encoder_identity(cfg.hqsam)  # nothing may name an encoder of unknown precision
    chosen = {}
    for native in (True, False):
        monkeypatch.setattr(encoder_module, "cpu_has_bf16", lambda native=native: native)
        with caplog.at_level("INFO", logger="boxrefiner"):
            chosen[native] = resolved_precision(cfg, CPU).hqsam.precision
    assert chosen == {True: "bf16", False: "fp32"}
    assert sum("hqsam.precision auto: extracting in" in r.getMessage() for r in caplog.records) == 2
    explicit = config_from_dict({"data": {"data_root": "x"}, "hqsam": {"precision": "bf16"}})
    assert resolved_precision(explicit, CPU) is explicit  # an explicit precision is the user's choice
    resolved = resolved_precision(cfg, CPU)
    assert encoder_identity(resolved.hqsam).key == encoder_identity(
        dataclasses.replace(cfg.hqsam, precision=resolved.hqsam.precision)).key


def test_auto_precision_on_a_gpu_takes_bf16_from_ampere_on(monkeypatch):
    """torch.cuda.is_bf16_supported() also says yes where bf16 is emulated (V100, T4): auto must not."""
    from boxrefiner.features.encoder import native_precision
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    for capability, expected in (((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert native_precision(torch.device("cuda", 0))[0] == expected
