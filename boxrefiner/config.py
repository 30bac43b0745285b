"""Typed configuration: YAML in, validated dataclasses out.

Every key is checked once here, at the edge. The rest of the code reads attributes and never has to
guess whether a value is missing, misspelt or out of range. Errors are `ConfigError` with one line
that names the key (and the closest valid key for a typo).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from boxrefiner.errors import ConfigError


def _spec(default: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
          hi_open: bool = False) -> Any:
    """A dataclass field with an allowed numeric range (checked by the loader)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open})


ModelType = Literal["vit_tiny", "vit_b", "vit_l", "vit_h"]  # HQ-SAM's image encoders
Precision = Literal["fp32", "bf16", "fp16"]  # the encoder's compute precision for extraction
# auto: bf16 where the device computes bfloat16 natively, else fp32 (made concrete once a run knows its device)
PrecisionSetting = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class ModelConfig:
    hidden_dim: int = _spec(256, lo=8)  # channels of the per-cell projection and the MLP
    num_heads: int = _spec(8, lo=1)  # score maps whose row/column profiles the MLP reads
    # Largest correction per iteration: centre shift as a fraction of the box's width/height, and
    # log-scale change of width/height.
    max_offset: float = _spec(0.5, lo=0, hi=2.0, lo_open=True)
    roi_size: int = _spec(14, lo=2, hi=64)
    context_scale: float = _spec(1.6, lo=1.0, hi=4.0)
    dropout: float = _spec(0.1, lo=0.0, hi=1.0, hi_open=True)  # before the MLP's last layer
    # Dilated 3x3 convolutions over the whole embedding (dilation 2, 4, ...), computed once per image:
    # each cell then knows its surroundings before a box samples it. 0: sample the embedding itself.
    context_layers: int = _spec(2, lo=0, hi=4)
    context_dim: int = _spec(64, lo=8)


@dataclass(frozen=True)
class RefinementConfig:
    max_iter: int = _spec(3, lo=1, hi=20)
    # Inference only: a box stops once its largest normalised correction falls below this.
    stop_threshold: float = _spec(0.01, lo=0.0)
    # Inference: each box keeps the candidate (input box included) with the highest predicted IoU; a
    # refined candidate must beat the input's predicted IoU by keep_margin. gate: false returns the
    # last iteration's box, as versions before the quality head did.
    gate: bool = True
    keep_margin: float = _spec(0.1, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = _spec(16, lo=1)
    epochs: int = _spec(30, lo=1)
    learning_rate: float = _spec(3e-4, lo=0, lo_open=True)
    weight_decay: float = _spec(0.05, lo=0)
    lr_scheduler: Literal["cosine", "step", "none"] = "cosine"
    warmup_epochs: int = _spec(1, lo=0)
    lr_step_epochs: int = _spec(10, lo=1)
    lr_gamma: float = _spec(0.1, lo=0, hi=1, lo_open=True)
    grad_clip: float = _spec(1.0, lo=0)
    max_nonfinite_steps: int = _spec(10, lo=1)  # consecutive NaN/inf losses (each step skipped) before stopping
    patience: int = _spec(10, lo=0)  # stop after this many epochs without a better best_model.pth; 0: never
    use_amp: bool = False
    # Mirror feature map and boxes together at random: the only augmentation that works on cached
    # features (image-space augmentation cannot). Off by default: on the demo it did not help
    # (val IoU 0.663 vs 0.666 and 0.680 vs 0.667 over two seeds) and cost 40% of a warm epoch.
    hflip: bool = False
    # Input boxes drawn per object and step: each object's map is read once and looked at from this
    # many independently jittered boxes (more box variety per image at little cost).
    boxes_per_object: int = _spec(4, lo=1, hi=64)
    # Zero whole embedding channels at random during training (dropout2d), so that the head cannot
    # memorise a few images' feature values.
    feature_dropout: float = _spec(0.2, lo=0.0, hi=0.9)
    seed: int = _spec(42, lo=0)


@dataclass(frozen=True)
class LossConfig:
    l1_weight: float = _spec(5.0, lo=0)
    iou_weight: float = _spec(2.0, lo=0)
    quality_weight: float = _spec(1.0, lo=0)  # the predicted IoU of every box the head looks at
    # Within that term: each refined box's predicted IoU gain over the input box, what the gate compares.
    quality_pair_weight: float = _spec(3.0, lo=0)


@dataclass(frozen=True)
class BoxNoiseConfig:
    """Detector-like error applied to ground-truth boxes to make the refiner's inputs."""
    center_std: float = _spec(0.1, lo=0, hi=1)  # centre shift, fraction of the box's width/height
    scale_std: float = _spec(0.15, lo=0, hi=1)  # std of log(width) and log(height) jitter
    max_sigma: float = _spec(2.5, lo=0, lo_open=True)  # draws are clipped at this many stds
    weight: float = _spec(1.0, lo=0, lo_open=True)  # in a list of levels: how often this one is drawn


@dataclass(frozen=True)
class SyntheticDataConfig:
    """When set and `data.data_root` is missing, the CLI generates a synthetic dataset there."""
    train_images: int = _spec(96, lo=1)
    val_images: int = _spec(32, lo=1)
    seed: int = _spec(0, lo=0)


@dataclass(frozen=True)
class DataConfig:
    # fungitastic: data_root in FungiTastic's published layout; coco: <split>_images + <split>_annotations
    # (COCO instances JSON); yolo: yolo_data (an Ultralytics data.yaml).
    format: Literal["fungitastic", "coco", "yolo"] = "fungitastic"
    data_root: str = ""
    data_subset: str = "Mini"
    train_split: str = "train"
    val_split: str = "val"
    image_size: int | str = 300  # folder `<image_size>p`, or "fullsize"
    masks_file: str | None = None
    sample_ratio: float | None = _spec(None, lo=0, hi=1, lo_open=True)
    num_workers: int = _spec(2, lo=0)
    # One level, or a list of levels drawn per object (e.g. near-exact boxes and loose ones, so that
    # the head learns to leave good boxes alone).
    box_noise: BoxNoiseConfig | tuple[BoxNoiseConfig, ...] = field(default_factory=lambda: (
        BoxNoiseConfig(0.02, 0.03), BoxNoiseConfig(0.1, 0.15), BoxNoiseConfig(0.2, 0.3)))
    synthetic: SyntheticDataConfig | None = None
    train_images: str | None = None  # coco: image folders and instances JSONs of both splits
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    yolo_data: str | None = None  # yolo: data.yaml
    min_box_size: float = _spec(1.0, lo=0)  # objects narrower or lower than this (pixels) are skipped
    # A detector's boxes (refine_boxes.py's input format) as training inputs and validation boxes: each
    # detection is matched one-to-one to an object of its image (highest IoU first, at least
    # detection_match_iou); detection_mix is the share of training boxes of matched objects taken
    # from the detection (with detection_noise jitter on top), the rest being jittered truth.
    train_detections: str | None = None
    val_detections: str | None = None
    detection_box_format: Literal["xyxy", "xywh"] = "xyxy"
    detection_match_iou: float = _spec(0.3, lo=0, hi=1, lo_open=True)
    detection_mix: float = _spec(0.5, lo=0, hi=1)
    detection_noise: BoxNoiseConfig | None = None

    @property
    def noise_levels(self) -> tuple[BoxNoiseConfig, ...]:
        return self.box_noise if isinstance(self.box_noise, tuple) else (self.box_noise,)


@dataclass(frozen=True)
class HQSAMConfig:
    checkpoint: str | None = None
    model_type: ModelType = "vit_h"
    allow_random_init: bool = False
    # Encoder input side. Real checkpoints need 1024; smaller sizes are for random-weight tests.
    input_size: int = _spec(1024, lo=64)
    # Precision of cache extraction; part of the cache key because it changes the embedding.
    precision: PrecisionSetting = "fp32"
    batch_size: int = _spec(4, lo=1)
    # How the encoder computes, not what: the same features within float rounding (like thread
    # counts), so none of these is part of the cache key.
    attention: Literal["sdpa", "original"] = "sdpa"  # PyTorch's fused attention, or the library's own
    compile: bool = False  # torch.compile the encoder (falls back to eager, with a log line, where it cannot)
    channels_last: bool = False  # the encoder's convolutions in channels-last memory layout


@dataclass(frozen=True)
class OutputConfig:
    save_dir: str = "./outputs/box_refiner"
    checkpoint_dir: str = "./checkpoints"
    log_dir: str = "./logs"


@dataclass(frozen=True)
class LoggingConfig:
    """What a run shows besides its log and metrics.jsonl (results.csv is always written)."""
    plots: bool = True  # results.png and val_boxes.jpg in output.save_dir, refreshed every epoch
    val_images: int = _spec(8, lo=1, hi=64)  # validation images pictured in val_boxes.jpg (the same every epoch)
    tensorboard: bool = False  # the same scalars and box grid as TensorBoard events in output.save_dir


@dataclass(frozen=True)
class FeatureCacheConfig:
    enabled: bool = True
    cache_dir: str = "./features"
    auto_detect: bool = True
    storage_dtype: Literal["float16", "float32", "int8"] = "float16"  # int8: per channel, scale and zero point
    # auto: hold a split in the training device's memory when it fits memory_budget_gb (default: half
    # the available RAM; on CUDA, half the free GPU memory); true: always; false: stream from disk.
    in_memory: bool | Literal["auto"] = "auto"
    memory_budget_gb: float | None = _spec(None, lo=0, lo_open=True)


@dataclass(frozen=True)
class OptimizationConfig:
    feature_cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)


DEFAULT_LEVELS = {"small": (0.03, 0.05), "medium": (0.1, 0.15), "large": (0.2, 0.3)}


@dataclass(frozen=True)
class EvaluationConfig:
    noise_seed: int = _spec(1234, lo=0)  # fixes the validation input boxes across epochs and runs
    batch_size: int | None = _spec(None, lo=1)  # default: training.batch_size
    # The run's own validation boxes (metrics without a level suffix). Default: data.box_noise when it
    # is one level, else center_std 0.1 / scale_std 0.15.
    box_noise: BoxNoiseConfig | None = None
    # Fixed noise levels every validation (and evaluate_refiner.py) reports: name -> [center_std, scale_std].
    levels: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_LEVELS))
    boxes_per_level: int = _spec(8, lo=1, hi=64)  # fixed input boxes per image and level

    def own_noise(self, data: DataConfig) -> BoxNoiseConfig:
        if self.box_noise is not None:
            return self.box_noise
        return data.box_noise if isinstance(data.box_noise, BoxNoiseConfig) else BoxNoiseConfig()


@dataclass(frozen=True)
class DebugConfig:
    max_samples: int = _spec(16, lo=1)
    epochs: int = _spec(2, lo=1)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    refinement: RefinementConfig = field(default_factory=RefinementConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hqsam: HQSAMConfig = field(default_factory=HQSAMConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def cache_enabled(self) -> bool:
        """The one feature-cache switch (`training.feature_cache: false` in a file is folded into it)."""
        return self.optimization.feature_cache.enabled

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys of the original tool's config that this tool accepts but does not use.
IGNORED_KEYS = ("optimization.performance",)
# Keys that would silently do nothing, refused with the reason.
REFUSED_KEYS = {
    "data.augmentation": "image-space augmentation cannot apply to cached features (the encoder runs once per "
                         "image); training.hflip mirrors feature map and boxes together instead",
}


# YAML 1.1 reads `5e-5` as a string; scientific notation without a dot is a float here.
class _Loader(yaml.SafeLoader):
    pass


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    """A mapping whose keys are unique: YAML would silently keep the last of two equal keys."""
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{key}' appears twice (first on line "
                              f"{seen[key]}); keep one")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args) + (" or null" if type(None) in typing.get_args(tp) else "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, ignored: list[str] | None = None) -> Any:
    """Convert one YAML value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            what = "a list" if args[-1] is Ellipsis else f"a list of {len(args)}"
            raise ConfigError(f"config key '{key}': expected {what}, got {value!r}")
        if args[-1] is Ellipsis:
            if not value:
                raise ConfigError(f"config key '{key}': the list is empty")
            return tuple(_convert(v, args[0], f"{key}[{i}]", ignored) for i, v in enumerate(value))
        return tuple(_convert(v, a, f"{key}[{i}]", ignored) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return {_convert(k, key_type, key, ignored): _convert(v, value_type, f"{key}.{k}", ignored)
                for k, v in value.items()}
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            shaped = (isinstance(value, dict) and dataclasses.is_dataclass(arg)) or (
                isinstance(value, list) and typing.get_origin(arg) is tuple)
            try:
                return _convert(value, arg, key, ignored)
            except ConfigError:
                if shaped:  # the value has this option's shape: its own message says what is wrong inside
                    raise
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}': must be one of {_type_name(tp)}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key, ignored)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this file, not user error


def _check_range(value: Any, meta: dict, key: str) -> None:
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi = meta.get("lo"), meta.get("hi")
    bad_lo = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
    bad_hi = hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
    if bad_lo or bad_hi:
        left = "(" if meta.get("lo_open") else "["
        right = ")" if meta.get("hi_open") else "]"
        bounds = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"
        raise ConfigError(f"config key '{key}': {value!r} is out of range, allowed {bounds}")


def _build(cls: type, raw: Any, prefix: str, ignored: list[str] | None = None) -> Any:
    if not isinstance(raw, dict):
        where = f"config key '{prefix}'" if prefix else "the top level of the config file"
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if key in REFUSED_KEYS:
            raise ConfigError(f"config key '{key}' is not supported: {REFUSED_KEYS[key]}")
        if name not in fields:
            if any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS):
                if ignored is not None:
                    ignored.append(key)
                continue
            close = difflib.get_close_matches(str(name), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else (
                f"; valid keys: {', '.join(fields)}")
            raise ConfigError(f"unknown config key '{key}'{hint}")
        converted = _convert(value, hints[name], key, ignored)
        _check_range(converted, dict(fields[name].metadata), key)
        values[name] = converted
    return cls(**values)


# level names whose per-level metric key (val_<key>_<name>) is already another metric's
DETECTIONS_LEVEL = "detections"  # the validation set of matched detector boxes, reported like a level
RESERVED_LEVEL_NAMES = {"tol": "val_worse_rate_tol", "levels": "val_iou_refined_levels",
                        DETECTIONS_LEVEL: f"val_iou_refined_{DETECTIONS_LEVEL} (the validation detections)"}


def _cross_check(cfg: Config) -> None:
    if cfg.hqsam.input_size % 16:
        raise ConfigError(f"config key 'hqsam.input_size': {cfg.hqsam.input_size} must be a multiple of 16")
    size = cfg.data.image_size
    if not (isinstance(size, int) and size > 0) and size != "fullsize":
        raise ConfigError(f"config key 'data.image_size': expected a size such as 300, 500, 720 or "
                          f"'fullsize', got {size!r}")
    for name, (center, scale) in cfg.evaluation.levels.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):  # it names metrics: val_iou_refined_<name>
            raise ConfigError(f"config key 'evaluation.levels.{name}': a level's name may hold letters, digits and _ only")
        if name in RESERVED_LEVEL_NAMES:
            raise ConfigError(f"config key 'evaluation.levels.{name}': this name would overwrite the metric "
                              f"{RESERVED_LEVEL_NAMES[name]}; choose another")
        if not (0 <= center <= 1 and 0 <= scale <= 1):
            raise ConfigError(f"config key 'evaluation.levels.{name}': [center_std, scale_std] must lie in [0, 1], "
                              f"got [{center}, {scale}]")
    data = cfg.data
    if data.format == "fungitastic" and not data.data_root:
        raise ConfigError("config key 'data.data_root' is required: the FungiTastic root holding "
                          "metadata/, FungiTastic-Mini/ and masks/ (or set data.format: coco | yolo)")
    if data.format == "coco":
        for split in (data.train_split, data.val_split):
            if split not in ("train", "val"):
                raise ConfigError(f"config key 'data.{'train' if split == data.train_split else 'val'}_split': "
                                  f"data.format coco names its splits train and val, got {split!r}")
            for part in ("images", "annotations"):
                if not getattr(data, f"{split}_{part}"):
                    raise ConfigError(f"config key 'data.{split}_{part}' is required with data.format coco")
    if data.format == "yolo" and not data.yolo_data:
        raise ConfigError("config key 'data.yolo_data' is required with data.format yolo: the path of an "
                          "Ultralytics data.yaml")


def fold_aliases(raw: dict) -> dict:
    """The original tool's second cache switch, `training.feature_cache`, folded into the one switch
    `optimization.feature_cache.enabled` (either one false turns the cache off). Returns a new dict."""
    training = raw.get("training")
    if not isinstance(training, dict) or "feature_cache" not in training:
        return raw
    enabled = _convert(training["feature_cache"], bool, "training.feature_cache")
    out = {**raw, "training": {k: v for k, v in training.items() if k != "feature_cache"}}
    optimization: dict = out["optimization"] if isinstance(out.get("optimization"), dict) else {}
    cache: dict = optimization["feature_cache"] if isinstance(optimization.get("feature_cache"), dict) else {}
    if not enabled:
        out["optimization"] = {**optimization, "feature_cache": {**cache, "enabled": False}}
    return out


def config_from_dict(raw: dict, ignored: list[str] | None = None) -> Config:
    cfg = _build(Config, fold_aliases(raw) if isinstance(raw, dict) else raw, "", ignored)
    _cross_check(cfg)
    return cfg


def load_config(path: str | Path) -> tuple[Config, list[str]]:
    """Read and validate a YAML file; returns the config and the ignored legacy keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except ConfigError as exc:
        raise ConfigError(f"config file {path} {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    ignored: list[str] = []
    cfg = config_from_dict(raw or {}, ignored)
    # Relative paths in a config file are relative to the working directory, like the original tool.
    return cfg, ignored


def replace(cfg: Config, section: str, **changes: Any) -> Config:
    """A copy of `cfg` with some keys of one section changed."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def with_cache(cfg: Config, enabled: bool) -> Config:
    """`cfg` with the feature cache switched on or off."""
    return replace(cfg, "optimization",
                   feature_cache=dataclasses.replace(cfg.optimization.feature_cache, enabled=enabled))


FAST_SAMPLE_RATIO = 0.1  # the quick-iteration policy's share of the training images


def fast_variant(cfg: Config) -> tuple[Config, str]:
    """The quick-iteration policy: a seeded 10% of the training images, AMP on, the batch doubled (at
    most 32). Returns the config and a line saying what changed."""
    batch = min(cfg.training.batch_size * 2, 32)
    cfg = replace(replace(cfg, "training", use_amp=True, batch_size=batch), "data", sample_ratio=FAST_SAMPLE_RATIO)
    return cfg, f"sample_ratio={FAST_SAMPLE_RATIO:g}, use_amp=true, batch_size={batch}"


def _split_pair(pair: str) -> tuple[list[str], str]:
    key, sep, text = pair.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{pair}': expected dotted.key=value, e.g. training.epochs=5")
    return key.split("."), text


def _parse_value(text: str) -> Any:
    """A command-line value as YAML (`5`, `true`, `null`, `[1, 2]`, `{a: 1}`); text YAML cannot read
    (`@x`) stays text."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set(tree: dict, path: list[str], value: Any, pair: str, done: tuple[str, ...] = ()) -> dict:
    """A copy of `tree` with the value at `path` replaced (a mapping given whole replaces the whole
    field, as in a file); missing or null sections on the way become mappings."""
    out = dict(tree)
    head, rest = path[0], path[1:]
    if not rest:
        out[head] = value
        return out
    inner = out.get(head)
    if isinstance(inner, (list, tuple)):
        key = ".".join((*done, head))
        raise ConfigError(f"override '{pair}': config key '{key}' is a list; give the whole list, e.g. {key}=[...]")
    out[head] = _set(inner if isinstance(inner, dict) else {}, rest, value, pair, (*done, head))
    return out


def with_overrides(cfg: Config, pairs: list[str]) -> Config:
    """`cfg` with command-line `dotted.key=value` overrides applied in order, each validated like a key
    of the file (a typo names the closest key, a bad value its range). A value read as YAML that the
    key does not accept is tried as plain text too (`data.data_subset=no` is the text 'no')."""
    for pair in pairs:
        try:
            cfg = _override(cfg, pair)
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith("override") else f"override '{pair}': {message}") from None
    return cfg


def _override(cfg: Config, pair: str) -> Config:
    path, text = _split_pair(pair)
    value = _parse_value(text)
    try:
        return config_from_dict(_set(cfg.to_dict(), path, value, pair))
    except ConfigError as exc:
        if isinstance(value, str):
            raise
        first = exc
    try:
        return config_from_dict(_set(cfg.to_dict(), path, text, pair))
    except ConfigError:
        raise first from None


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML that `load_config` reads back to the same config."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False, default_flow_style=None, width=110)
