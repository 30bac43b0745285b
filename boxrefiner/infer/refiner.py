"""Apply a trained refiner: load it from its checkpoint alone and refine pixel boxes on images.

    refiner = BoxRefiner.from_checkpoint("checkpoints/best_model.pth")
    result = refiner.refine("photo.jpg", [[x0, y0, x1, y1], ...])   # xyxy pixels in and out
    result.boxes, result.iterations, result.steps

Everything comes from the checkpoint: model arguments and weights, the identity of the encoder the
features came from, `refinement.stop_threshold`, and where the feature cache was. An image's features
are read from that cache when an entry for its bytes and this encoder exists (in any split folder:
keys name content, not place); otherwise the encoder runs. Either way the head sees the embedding in
the cache's storage dtype, exactly as in training, so a cached and a fresh image give the same boxes.
The encoder is built only when a feature is missing, and only after checking that its weights are the
ones the refiner was trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from boxrefiner.boxes import normalise_boxes, pixel_boxes
from boxrefiner.config import Config, ConfigError, HQSAMConfig, ModelType, Precision, config_from_dict
from boxrefiner.data.images import DECODE_ERRORS, oriented_size
from boxrefiner.features.cache import FeatureCache
from boxrefiner.features.decode import image_batches
from boxrefiner.features.encoder import (
    EMBED_DIM,
    ENCODER_REVISIONS,
    PATCH,
    PREPROCESS_VERSION,
    EncoderError,
    EncoderIdentity,
    ImageEncoder,
    build_encoder,
    encoder_identity,
    file_sha256,
)
from boxrefiner.features.sam import BoxPrompter, load_sam_hq
from boxrefiner.features.storage import Storage
from boxrefiner.modeling.checkpoint import CheckpointError, load_checkpoint
from boxrefiner.modeling.head import BoxRefinementModule
from boxrefiner.utils.device import resolve_device
from boxrefiner.utils.files import sha256_file

log = logging.getLogger(__name__)
STORE_SPLIT = "inference"  # cache folder for features computed while refining (with store_features)
_BOX_CHUNK = 64  # boxes refined together on one image's features


@dataclass
class Refinement:
    """Refined boxes of one image, `xyxy` pixels."""
    boxes: np.ndarray  # (N, 4) the answer: with the gate, the candidate of highest predicted IoU
    iterations: np.ndarray  # (K, N, 4) the boxes after each iteration; a box that stopped early repeats
    steps: np.ndarray  # (N,) iterations that moved each box before it stopped
    iou_pred: np.ndarray | None  # (N,) predicted IoU of each returned box; None: a refiner without quality head
    chosen: np.ndarray  # (N,) which candidate was returned: 0 the input box, k the k-th iteration's

    @property
    def applied_steps(self) -> np.ndarray:
        """(N,) iterations that moved the returned box: 0 where the input was kept; a box frozen by the
        stop threshold counts the steps it took, not the iterations it sat through."""
        return np.minimum(self.chosen, self.steps)


@dataclass
class ImageFeatures:
    """One image's embedding for the refiner (and, for masks, the HQ decoder's early-layer features),
    or why there is none (`error`: missing_image, unreadable_image)."""
    index: int  # position in the list of paths asked for
    path: Path
    width: int = 0
    height: int = 0
    embedding: torch.Tensor | None = None  # (256, g, g) float32, values as stored in the cache dtype
    sam_features: tuple[torch.Tensor, torch.Tensor] | None = None  # encoder output as is, for HQ-SAM's decoder
    error: str | None = None

    @property
    def map(self) -> torch.Tensor:
        """The embedding of an image that decoded (callers check `error` first)."""
        if self.embedding is None:
            raise ValueError(f"{self.path}: no features ({self.error or 'not computed'})")
        return self.embedding

    @property
    def decoder_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What HQ-SAM's mask decoder reads: the embedding and the early-layer features."""
        if self.sam_features is None:
            raise ValueError(f"{self.path}: no decoder features ({self.error or 'masks were not asked for'})")
        return self.sam_features


class BoxRefiner:
    """A trained BoxRefinementModule with the encoder and feature cache it was trained with."""

    def __init__(self, model: BoxRefinementModule, identity: EncoderIdentity, cfg: Config, device: torch.device,
                 hqsam_checkpoint: str | None = None, cache_dir: str | Path | None = None, read_cache: bool = True,
                 store_features: bool = False, with_masks: bool = False, batch_size: int | None = None,
                 num_workers: int = 2, gate: bool | None = None, keep_margin: float | None = None):
        self.model = model.to(device).eval()
        self.gate = cfg.refinement.gate if gate is None else gate
        self.keep_margin = cfg.refinement.keep_margin if keep_margin is None else keep_margin
        if self.gate and not model.quality_head:
            log.info("this refiner has no quality head (trained before version 0.3): boxes are refined without the "
                     "gate, every box taking its last iteration's result")
            self.gate = False
        self.identity = identity
        self.cfg = cfg
        self.device = device
        self.stop_threshold = cfg.refinement.stop_threshold
        self.hqsam_checkpoint = hqsam_checkpoint or cfg.hqsam.checkpoint
        self.with_masks = with_masks
        self.batch_size = batch_size or cfg.hqsam.batch_size
        self.num_workers = num_workers
        self.read_cache = read_cache
        self.store_features = store_features
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.storage_dtype = cfg.optimization.feature_cache.storage_dtype
        self._encoder: ImageEncoder | None = None
        self._prompter: BoxPrompter | None = None
        self.encoded = 0  # images that went through the encoder
        self.cache_hits = 0  # images whose features came from the cache

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str | torch.device = "auto",
                        hqsam_checkpoint: str | None = None, cache_dir: str | Path | None = None,
                        read_cache: bool = True, store_features: bool = False, with_masks: bool = False,
                        batch_size: int | None = None, num_workers: int = 2, gate: bool | None = None,
                        keep_margin: float | None = None) -> BoxRefiner:
        """Load from a trainer checkpoint (`best_model.pth` or `last.pth`); no config file needed.

        `cache_dir` defaults to the training run's (relative paths from the current folder);
        `hqsam_checkpoint` to the run's `hqsam.checkpoint`, needed only for images whose features are
        not cached, and for masks. `read_cache=False` always encodes; `store_features` keeps what was
        encoded in the cache. `gate` and `keep_margin` override the run's `refinement.gate` and
        `refinement.keep_margin`."""
        state = load_checkpoint(path)
        for key in ("model_args", "encoder"):
            if not isinstance(state.get(key), dict):
                raise CheckpointError(f"checkpoint '{path}' has no '{key}': written before this tool could apply "
                                      "refiners; train again (or resume it for one more epoch) to get one")
        try:
            cfg = config_from_dict(state["config"])
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint '{path}': its saved config is not valid here ({exc})") from None
        try:
            model = BoxRefinementModule(**{"quality_head": False, **state["model_args"]})  # before 0.3: none
            model.load_state_dict(state["model_state_dict"])
            identity = EncoderIdentity(**state["encoder"])
        except (TypeError, RuntimeError) as exc:  # another version's keys, or weights of another shape
            raise CheckpointError(f"checkpoint '{path}': model_args, weights and encoder identity do not fit this "
                                  f"version of the tool ({str(exc).splitlines()[0][:200]})") from None
        device = device if isinstance(device, torch.device) else resolve_device(device)
        val = state.get("val_iou_refined")
        log.info("refiner %s: epoch %s%s, features of %s, stop threshold %g, on %s", path, state["epoch"],
                 f", val IoU {val:.3f}" if isinstance(val, float) else "", identity.short(),
                 cfg.refinement.stop_threshold, device)
        cache_dir = Path(cache_dir if cache_dir is not None else cfg.optimization.feature_cache.cache_dir)
        if read_cache or store_features:
            log.info("feature cache %s%s", cache_dir.resolve(), "" if cache_dir.is_dir() else
                     " does not exist: every image will be encoded")
        return cls(model, identity, cfg, device, hqsam_checkpoint, cache_dir, read_cache, store_features, with_masks,
                   batch_size, num_workers, gate, keep_margin)

    # --- features ---------------------------------------------------------------------------------

    def _caches(self) -> list[FeatureCache]:
        if not self.read_cache or self.cache_dir is None or not self.cache_dir.is_dir():
            return []
        return [FeatureCache(self.cache_dir, folder.name, self.identity, self.storage_dtype)
                for folder in sorted(self.cache_dir.iterdir()) if folder.is_dir() and not folder.name.startswith(".")]

    def image_features(self, paths: Sequence[str | Path], for_masks: bool = False) -> Iterator[ImageFeatures]:
        """Features of each image, cached ones first, then the rest encoded in batches; every path is
        answered once, in that order (use `.index`). `for_masks` runs the encoder on every image: HQ-SAM's
        decoder needs its early-layer features too, which the cache does not hold."""
        caches = [] if for_masks else self._caches()
        store = (FeatureCache(self.cache_dir, STORE_SPLIT, self.identity, self.storage_dtype)
                 if self.store_features and self.cache_dir is not None else None)
        keyer = store or (caches[0] if caches else None)  # every one of them computes the same key
        pending: list[ImageFeatures] = []
        keys: dict[int, str] = {}
        for index, raw in enumerate(paths):
            item = ImageFeatures(index, Path(raw))
            item.error = _unreadable(item)
            if item.error is None and keyer is not None:
                keys[index] = keyer.key_for(sha256_file(item.path))
                stored = next((s for s in (c.load(keys[index]) for c in caches) if s is not None), None)
                if stored is not None:
                    item.embedding = torch.from_numpy(stored).float()
                    self.cache_hits += 1
            if item.error is not None or item.embedding is not None:
                yield item
            else:
                pending.append(item)
        if pending:
            yield from self._encode(pending, keys, store, for_masks)
        if store is not None:
            store.manifest.close()

    def _encode(self, pending: list[ImageFeatures], keys: dict[int, str], store: FeatureCache | None,
                for_masks: bool) -> Iterator[ImageFeatures]:
        """Encode the images no cache holds, in batches (decoded ahead by threads when there are many)."""
        threads = self.num_workers if len(pending) > self.batch_size else 0  # a few images: decoded in turn
        encoder = self.encoder
        grid = self.identity.input_size // PATCH
        codec = Storage(self.storage_dtype, (EMBED_DIM, grid, grid))  # without a store: what a read would give
        for batch in image_batches([p.path for p in pending], self.identity.input_size, self.batch_size, threads,
                                   pin=self.device.type == "cuda"):
            for position in batch.bad:
                pending[position].error = "unreadable_image"
                yield pending[position]
            if not batch.positions:
                continue
            embeddings, interms = encoder.encode_with_interm(batch.normalised(self.device))
            done = []
            for position, embedding, interm in zip(batch.positions, embeddings, interms):
                item = pending[position]
                raw = embedding.cpu().numpy()
                stored: np.ndarray | None = None  # what training saw: the storage dtype's values, as a cached read gives
                if store is not None:  # (None when they do not fit the storage)
                    stored = store.save(keys[item.index], raw, {"file": str(item.path), "width": item.width,
                                                                 "height": item.height})
                elif bool(codec.fits(embedding[None])):
                    stored = codec.round_trip(raw)
                if stored is None:
                    item.error = "nonfinite_features"
                    yield item
                    continue
                item.embedding = torch.from_numpy(stored).float()
                item.sam_features = (embedding, interm) if for_masks else None
                self.encoded += 1
                done.append(item)
            yield from done

    @property
    def encoder(self) -> ImageEncoder:
        """The HQ-SAM image encoder, built on first need, with the weights the refiner was trained on."""
        if self._encoder is None:
            checkpoint = self._verified_hqsam_checkpoint()
            if self.with_masks:
                sam = load_sam_hq(self.identity.model_type, self.identity.input_size, checkpoint)
                self._prompter = BoxPrompter(sam, self.device)
                self._encoder = ImageEncoder(sam.image_encoder, self.identity, self.device)
            else:
                cfg = HQSAMConfig(checkpoint=checkpoint, model_type=cast(ModelType, self.identity.model_type),
                                  allow_random_init=checkpoint is None, input_size=self.identity.input_size,
                                  precision=cast(Precision, self.identity.precision),
                                  attention=self.cfg.hqsam.attention, channels_last=self.cfg.hqsam.channels_last)
                self._encoder = build_encoder(cfg, self.device, self.identity)
        return self._encoder

    def enable_masks(self) -> None:
        """Build the whole HQ-SAM model (not the encoder alone) when the encoder is first needed."""
        if self._encoder is not None and self._prompter is None:
            raise RuntimeError("enable_masks() must come before the first image is encoded")
        self.with_masks = True

    @property
    def prompter(self) -> BoxPrompter:
        """HQ-SAM's mask decoder on the same encoder (needs `with_masks=True`)."""
        if not self.with_masks:
            raise RuntimeError("create the refiner with with_masks=True to prompt HQ-SAM")
        _ = self.encoder
        assert self._prompter is not None
        return self._prompter

    def _verified_hqsam_checkpoint(self) -> str | None:
        """The HQ-SAM checkpoint whose encoder made the training features (None: the seeded random
        weights of a demo run), or a one-line error when it cannot be had."""
        trained = self.identity
        if not trained.current:
            raise EncoderError(f"the refiner was trained on {trained.model_type} features made by an earlier version "
                               f"of this tool (preprocessing '{trained.preprocess}', encoder revision "
                               f"'{trained.revision or 'none'}'); this version's features differ ('{PREPROCESS_VERSION}', "
                               f"'{ENCODER_REVISIONS.get(trained.model_type, '') or 'none'}'): use cached features only, "
                               "or train again")
        if trained.weights.startswith("random-init"):
            here = encoder_identity(HQSAMConfig(model_type=cast(ModelType, trained.model_type), allow_random_init=True))
            if here.weights != trained.weights:
                raise EncoderError(f"the refiner was trained on random-weight features ({trained.weights}); this "
                                   f"machine draws other random weights ({here.weights}); train the demo again here")
            return None
        if not self.hqsam_checkpoint:
            need = "HQ-SAM masks need it" if self.with_masks else "features of some images are not cached"
            raise EncoderError(f"{need}, and the refiner's HQ-SAM checkpoint is unknown: give the HQ-SAM checkpoint "
                               f"(the {trained.model_type} file with sha256 {trained.weights[:12]}...)")
        if not Path(self.hqsam_checkpoint).is_file():
            raise EncoderError(f"hqsam checkpoint '{self.hqsam_checkpoint}' does not exist (give the right file)")
        memo = self.cache_dir if self.cache_dir is not None and self.cache_dir.is_dir() else None
        digest = file_sha256(self.hqsam_checkpoint, memo)
        if digest != trained.weights:
            raise EncoderError(f"hqsam checkpoint '{self.hqsam_checkpoint}' (sha256 {digest[:12]}...) is not the one the "
                               f"refiner was trained with (sha256 {trained.weights[:12]}...)")
        return self.hqsam_checkpoint

    # --- refinement -------------------------------------------------------------------------------

    @staticmethod
    def boxes_fit(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """Which boxes ((N, 4) xyxy pixels) the head can take: finite in its float32 frame (a detector's
        [0, 0, 1e300, 1e300] is not), with x1 > x0 and y1 > y0."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        normalised = normalise_boxes(torch.from_numpy(boxes), width, height)[0].float()  # as the head gets them
        sizes = normalised[:, 2:] - normalised[:, :2]
        return (torch.isfinite(normalised).all(dim=1) & torch.isfinite(sizes).all(dim=1) & (sizes > 0).all(dim=1)).numpy()

    @torch.inference_mode()
    def refine_features(self, embedding: torch.Tensor, width: int, height: int, boxes: np.ndarray | list) -> Refinement:
        """Refine `boxes` ((N, 4) xyxy pixels of a `width` x `height` image) on its embedding; each box
        stops on its own once its largest correction falls below `stop_threshold`."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if not self.boxes_fit(boxes, width, height).all():
            raise ValueError("boxes must be finite xyxy with x1 > x0 and y1 > y0, within float32 range")
        frame, extent = normalise_boxes(torch.from_numpy(boxes), width, height)
        normalised, extent = frame.float(), extent.float()[None]
        maps = self.model.context_maps(embedding.to(self.device, torch.float32)[None])  # once for every chunk
        paths, answers, predicted, chosen = [], [], [], []
        for chunk in normalised.split(_BOX_CHUNK):
            n = len(chunk)
            result = self.model(maps, chunk.to(self.device), extent.expand(n, 2).to(self.device),
                                stop_threshold=self.stop_threshold,
                                image_index=torch.zeros(n, dtype=torch.long, device=self.device), widened=True)
            answer, iou, pick = result.select(self.gate, self.keep_margin)
            paths.append(torch.stack(result.boxes).cpu())
            answers.append(answer.cpu())
            chosen.append(pick.cpu())
            if iou is not None:
                predicted.append(iou.cpu())
        trajectory = pixel_boxes(torch.cat(paths, dim=1), width, height)
        before = torch.cat([torch.from_numpy(boxes)[None], trajectory[:-1]])
        moved = (trajectory != before).any(dim=-1).sum(dim=0)
        picks = torch.cat(chosen)
        final = pixel_boxes(torch.cat(answers), width, height)
        final[picks == 0] = torch.from_numpy(boxes)[picks == 0]  # the input itself, not its float32 round trip
        return Refinement(final.numpy(), trajectory.numpy(), moved.numpy(),
                          torch.cat(predicted).double().numpy() if predicted else None, picks.numpy())

    def refine(self, image: str | Path, boxes: np.ndarray | list) -> Refinement:
        """Refine boxes (xyxy pixels, after EXIF orientation) on one image file."""
        item = next(self.image_features([image]))
        if item.error == "missing_image":
            raise FileNotFoundError(f"{image}: no such image file")
        if item.error:
            raise ValueError(f"{image}: the image does not decode")
        return self.refine_features(item.map, item.width, item.height, boxes)


def _unreadable(item: ImageFeatures) -> str | None:
    """Why an image cannot be used (missing_image, unreadable_image), else None; sets its oriented size."""
    try:
        found = item.path.is_file()
    except OSError:  # a name too long for the file system, a folder without permission
        found = False
    if not found:
        return "missing_image"
    try:
        item.width, item.height = oriented_size(item.path)
    except DECODE_ERRORS:
        return "unreadable_image"
    return None
