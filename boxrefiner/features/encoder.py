"""HQ-SAM's frozen image encoder: building it, loading its weights safely, and feeding it exactly
what `SamPredictor.set_image` would.

The builders of `segment-anything-hq` load checkpoints with `strict=False` and no `map_location`, so a
wrapped or wrong file silently leaves random weights. Here the encoder is built empty and its
weights are loaded and checked key by key; random weights only on explicit opt-in.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from boxrefiner.config import Config, HQSAMConfig, replace
from boxrefiner.errors import UserError
from boxrefiner.features.attention import use_sdpa
from boxrefiner.utils.device import cpu_has_bf16
from boxrefiner.utils.files import load_torch_file, sha256_file
from boxrefiner.utils.memo import FileMemo

log = logging.getLogger(__name__)

MODEL_TYPES = ("vit_tiny", "vit_b", "vit_l", "vit_h")
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
EMBED_DIM = 256
PATCH = 16
# Bump when preprocessing changes: it is part of every cache key.
PREPROCESS_VERSION = "pil-bilinear-longest-side-v1"
# Bump for a model type when this tool's features of it change (part of every cache key of that type).
# vit_tiny: before 0.3, TinyViT's attention biases were derived before the weights were loaded, so
# features from a vit_tiny checkpoint were not the checkpoint's; entries from then are never served.
ENCODER_REVISIONS = {"vit_tiny": "tinyvit-biases-after-load"}
# Revisions this version knows to be older than ENCODER_REVISIONS: their entries are never served
# again (`--clear-cache orphans` deletes them). An identity neither current nor retired may be a newer
# version's, sharing the cache: it is left alone.
RETIRED_REVISIONS = {"vit_tiny": ("",)}
RANDOM_INIT_SEED = 0
VIT_ARGS = {  # embed_dim, depth, num_heads, global_attn_indexes (segment_anything_hq.build_sam)
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


class EncoderError(UserError):
    """The encoder cannot be built as configured (missing or wrong checkpoint); one-line message."""


def hq_modeling():
    """Import segment_anything_hq's modeling quietly (timm prints deprecation and registry warnings)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Importing from timm")
        warnings.filterwarnings("ignore", message="Overwriting tiny_vit")
        warnings.filterwarnings("ignore", category=FutureWarning)
        from segment_anything_hq import modeling
    return modeling


def _tiny_vit_class():
    class TinyViTAnySize(hq_modeling().TinyViT):  # type: ignore[misc]  # known once segment_anything_hq loads
        """TinyViT whose `forward_features` uses its own grid size instead of the hard-coded 64."""

        def forward_features(self, x):
            grid = self.img_size // PATCH
            x = self.layers[0](self.patch_embed(x))
            interm_embeddings = []
            for i in range(1, len(self.layers)):
                x = self.layers[i](x)
                if i == 1:
                    interm_embeddings.append(x.view(x.shape[0], grid, grid, -1))
            x = x.view(x.shape[0], grid, grid, x.shape[-1]).permute(0, 3, 1, 2)
            return self.neck(x), interm_embeddings

    return TinyViTAnySize


def build_image_encoder(model_type: str, input_size: int = 1024) -> nn.Module:
    """The image encoder alone (no prompt encoder or mask decoder), in eval mode, random weights."""
    if model_type == "vit_tiny":
        encoder = _tiny_vit_class()(
            img_size=input_size, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
            use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)
    elif model_type in VIT_ARGS:
        dim, depth, heads, global_idx = VIT_ARGS[model_type]
        encoder = hq_modeling().ImageEncoderViT(
            depth=depth, embed_dim=dim, img_size=input_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=PATCH, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=global_idx, window_size=14, out_chans=EMBED_DIM)
    else:
        raise EncoderError(f"hqsam.model_type '{model_type}' is not one of {', '.join(MODEL_TYPES)}")
    encoder.eval()  # TinyViT builds its attention-bias buffers here
    encoder.requires_grad_(False)
    return encoder


def read_sam_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an (HQ-)SAM checkpoint, unwrapped from `{'model': ...}`-style wrappers, loaded
    safely on CPU."""
    state = load_torch_file(path, EncoderError, "hqsam.checkpoint")
    for wrapper in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and not any(
                str(k).startswith("image_encoder.") for k in state):
            log.info("hqsam.checkpoint: using the state dict stored under '%s'", wrapper)
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise EncoderError(f"hqsam.checkpoint '{path}' holds a {type(state).__name__}, not a state dict")
    if not any(isinstance(k, str) and k.startswith("image_encoder.") for k in state):
        raise EncoderError(f"hqsam.checkpoint '{path}' has no 'image_encoder.*' weights: not a SAM/HQ-SAM checkpoint")
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def submodule_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix.` with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def read_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The `image_encoder.*` tensors of an (HQ-)SAM checkpoint, prefix removed, loaded safely on CPU."""
    return submodule_state(read_sam_state(path), "image_encoder")


def load_strictly(module: nn.Module, state: dict[str, torch.Tensor], model_type: str, source: str,
                  part: str = "encoder") -> None:
    """Load every parameter, present with the right shape and nothing else, or raise a clear error."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    extra = [k for k in state if k not in expected]
    if missing or wrong or extra:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in
                 ((missing, "missing"), (wrong, "with another shape"), (extra, "unexpected")) if v]
        raise EncoderError(f"hqsam.checkpoint '{source}' does not fit hqsam.model_type '{model_type}': "
                           f"{part} keys {', '.join(parts)}")
    module.load_state_dict(state, strict=True)
    # TinyViT's attention derives its bias table (`ab`) from the weights when it is switched to eval;
    # a table derived before loading would keep the old weights' biases. Derive it again now.
    module.train(False)


def file_sha256(path: str | Path, memo_dir: str | Path | None = None) -> str:
    """Content hash of a (large) file, remembered by path, size and mtime in `memo_dir`'s memo."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = FileMemo.in_cache(memo_dir, part="checkpoints") if memo_dir else FileMemo(None)
    digest = memo.get("sha256", path, stat)
    if not isinstance(digest, str):
        started = time.time_ns()
        digest = sha256_file(path)
        memo.put("sha256", path, stat, digest, read_at=started)
        memo.close()
    return digest


@dataclass(frozen=True)
class EncoderIdentity:
    """Everything that changes an embedding; a cache entry is valid only for the same identity."""
    model_type: str
    weights: str  # sha256 of the checkpoint file, or the random-init recipe
    input_size: int
    precision: str
    preprocess: str = PREPROCESS_VERSION
    revision: str = ""  # ENCODER_REVISIONS at the time; "" for identities saved before revisions existed

    @property
    def key(self) -> str:
        parts = [self.model_type, self.weights, str(self.input_size), self.precision, self.preprocess]
        return "|".join(parts + ([self.revision] if self.revision else []))

    @property
    def current(self) -> bool:
        """Whether this version of the tool makes these features (preprocessing and encoder code alike)."""
        return (self.preprocess == PREPROCESS_VERSION
                and self.revision == ENCODER_REVISIONS.get(self.model_type, ""))

    @property
    def retired(self) -> bool:
        """Whether an older version of the tool made these features, which this one never serves."""
        return self.preprocess == PREPROCESS_VERSION and self.revision in RETIRED_REVISIONS.get(self.model_type, ())

    def short(self) -> str:
        weights = "random-init" if self.weights.startswith("random-init") else self.weights[:10]
        return f"{self.model_type}@{weights}/{self.input_size}/{self.precision}"


def native_precision(device: torch.device) -> tuple[str, str]:
    """The extraction precision `auto` stands for on this device, and why."""
    if device.type == "cuda":  # native bfloat16 from compute capability 8 (Ampere) on; older GPUs emulate it
        name, (major, minor) = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bf16", f"{name} (compute capability {major}.{minor}) computes bfloat16"
        return "fp32", f"{name} (compute capability {major}.{minor}) has no native bfloat16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16", f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has bfloat16 kernels"
    return "fp32", f"{device.type} has no native bfloat16 here ({torch.backends.cpu.get_cpu_capability()})"


def resolved_precision(cfg: Config, device: torch.device) -> Config:
    """The config with `hqsam.precision: auto` made concrete for `device` (logged once); any other
    value is kept as set. A run resolves it before anything names its encoder: the cache key, the
    checkpoint and resume all see the precision the features really have."""
    if cfg.hqsam.precision != "auto":
        return cfg
    precision, why = native_precision(device)
    log.info("hqsam.precision auto: extracting in %s (%s)", precision, why)
    return replace(cfg, "hqsam", precision=precision)


def encoder_identity(cfg: HQSAMConfig, memo_dir: str | Path | None = None) -> EncoderIdentity:
    """Identify the encoder without building it (the checkpoint is hashed, not loaded)."""
    if cfg.precision == "auto":
        raise ValueError("hqsam.precision auto must be resolved against the device first (resolved_precision)")
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        if not path.is_file():
            raise EncoderError(f"hqsam.checkpoint '{path}' does not exist")
        weights = file_sha256(path, memo_dir)
    elif cfg.allow_random_init:
        weights = f"random-init-seed{RANDOM_INIT_SEED}-torch{torch.__version__}"
    else:
        raise EncoderError("hqsam.checkpoint is not set: point it at an HQ-SAM checkpoint "
                           "(e.g. sam_hq_vit_h.pth), or set hqsam.allow_random_init: true for demos and tests")
    return EncoderIdentity(cfg.model_type, weights, cfg.input_size, cfg.precision,
                           revision=ENCODER_REVISIONS.get(cfg.model_type, ""))


@contextlib.contextmanager
def random_init_rng() -> Iterator[None]:
    """The seeded RNG of every random-weight build: the same recipe always draws the same weights, and
    the caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        yield


def autocast_context(device: torch.device, precision: str):
    """autocast for 'bf16'/'fp16', nothing for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class ImageEncoder:
    """A frozen HQ-SAM image encoder on a device: (B, 3, S, S) normalised images -> (B, 256, S/16, S/16).

    `channels_last` and `compiled` change how it computes, not what (within float rounding)."""

    def __init__(self, module: nn.Module, identity: EncoderIdentity, device: torch.device,
                 channels_last: bool = False, compiled: bool = False):
        self.module = module.to(device)
        self.identity = identity
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.module.to(memory_format=torch.channels_last)
        self.run: nn.Module | None = None
        if compiled:
            try:
                self.run = torch.compile(self.module)  # type: ignore[assignment]
            except Exception as exc:  # e.g. a Python this torch's compiler does not support
                self._cannot_compile(exc)

    @staticmethod
    def _cannot_compile(exc: Exception) -> None:
        log.warning("hqsam.compile: torch.compile cannot compile the encoder here (%s: %s); it runs eagerly",
                    type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")

    def _forward(self, images: torch.Tensor):
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        if self.run is not None:
            try:
                return self.run(images)
            except Exception as exc:  # no compiler toolchain, an unsupported op: eager gives the same features
                self._cannot_compile(exc)
                self.run = None
        return self.module(images)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """Embeddings as float32; `precision` overrides the identity's (the cache-off AMP path)."""
        return self.encode_with_interm(images, precision)[0]

    @torch.inference_mode()
    def encode_with_interm(self, images: torch.Tensor, precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, 256, g, g) and the early-layer features (B, g, g, D) that HQ-SAM's mask decoder
        also reads (its `interm_embeddings[0]`), both float32."""
        with autocast_context(self.device, precision or self.identity.precision):
            embedding, interm = self._forward(images)
        return embedding.float(), interm[0].float()


def warn_slow_cpu_precision(precision: str) -> None:
    """Half precisions this CPU emulates run many times slower than fp32: say so, and what to set."""
    if precision == "fp16":
        log.warning("hqsam.precision fp16 on a CPU: most CPUs have no float16 arithmetic and run it many times "
                    "slower than fp32 (24x for vit_tiny on 2 AMD EPYC cores); bf16 is the fast half precision there")
    elif precision == "bf16" and not cpu_has_bf16():
        log.warning("hqsam.precision bf16: this CPU (%s) has no bfloat16 kernels and emulates it, many times slower "
                    "than fp32 (14x for vit_tiny on an AVX2-only AMD EPYC); set hqsam.precision: fp32 here",
                    torch.backends.cpu.get_cpu_capability())


def build_encoder(cfg: HQSAMConfig, device: torch.device, identity: EncoderIdentity) -> ImageEncoder:
    """Build and load the encoder. Random weights only with hqsam.allow_random_init, and loudly."""
    if cfg.checkpoint:
        state = read_encoder_state(cfg.checkpoint)
        with torch.random.fork_rng(devices=[]):  # its throw-away init must not shift the head's dropout draws
            module = build_image_encoder(cfg.model_type, cfg.input_size)
        load_strictly(module, state, cfg.model_type, cfg.checkpoint)
        log.info("HQ-SAM %s encoder loaded from %s (sha256 %s)", cfg.model_type, cfg.checkpoint, identity.weights[:12])
    else:
        with random_init_rng():
            module = build_image_encoder(cfg.model_type, cfg.input_size)
        log.warning("!" * 72)
        log.warning("HQ-SAM %s encoder has RANDOM, UNTRAINED weights (hqsam.allow_random_init: true).", cfg.model_type)
        log.warning("Its features are not HQ-SAM's: use this for demos and tests only, never for real results.")
        log.warning("!" * 72)
    if cfg.attention == "sdpa":
        use_sdpa(module, hq_modeling())
    log.info("encoder computes with %s attention%s%s", cfg.attention, ", channels-last" if cfg.channels_last else "",
             ", torch.compile" if cfg.compile else "")
    if device.type == "cpu":
        warn_slow_cpu_precision(identity.precision)
    return ImageEncoder(module, identity, device, cfg.channels_last, cfg.compile)


def resized_shape(height: int, width: int, input_size: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide: scale the longest side to input_size, round half up."""
    scale = input_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess(image: np.ndarray, input_size: int) -> torch.Tensor:
    """RGB uint8 HxWx3 -> normalised, zero-padded (3, S, S) float32, as SamPredictor.set_image does."""
    pixels, size = resized_pixels(image, input_size)
    return normalise(pixels[None], [size])[0]


def resized_pixels(image: np.ndarray, input_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The first half of `preprocess`: the image resized as SamPredictor does (longest side to S, PIL
    bilinear), zero-padded to (3, S, S) uint8, and its (height, width) before padding."""
    new_h, new_w = resized_shape(image.shape[0], image.shape[1], input_size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    # numpy, not torch: this runs in decoding threads, and a torch operation there would start an OpenMP
    # team of its own beside the encoder's, whose spinning threads take the encoder's cores
    pixels = np.zeros((3, input_size, input_size), dtype=np.uint8)
    pixels[:, :new_h, :new_w] = resized.transpose(2, 0, 1)
    return torch.from_numpy(pixels), (new_h, new_w)


def normalise(pixels: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The second half, for a batch on any device: (B, 3, S, S) uint8 -> float32 `(x - mean) / std`
    inside each image and zeros in its padding, the same float32 operations as SamPredictor's."""
    mean, std = _pixel_constants(pixels.device)
    out = torch.zeros(pixels.shape, dtype=torch.float32, device=pixels.device)
    for k, (height, width) in enumerate(sizes):
        view = out[k, :, :height, :width]
        view.copy_(pixels[k, :, :height, :width])
        view.sub_(mean).div_(std)
    return out


@functools.cache
def _pixel_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(PIXEL_MEAN, device=device).view(3, 1, 1),
            torch.tensor(PIXEL_STD, device=device).view(3, 1, 1))
