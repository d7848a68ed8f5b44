"""Configuration: parsed once from YAML / dicts into frozen dataclasses.

Every knob of data, model, loss, training and privacy lives here, with its default, so a run's
resolved config (``to_dict``) fully describes it. Unknown keys are errors that name the source,
because a typo in a hospital's YAML must not silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")

#: BI-RADS-inspired features computed from the soft mask (see common/birads.py).
ALL_FEATURES: tuple[str, ...] = (
    "area",
    "roughness",
    "compactness",
    "texture",
    "orientation",
    "margin_sharpness",
    "posterior",
)
#: ``model.pretrained_path`` value meaning "the Lite0 ImageNet file of the installed pip package".
AUTO_PRETRAINED = "auto"

#: The four features of the published method.
PAPER_FEATURES: tuple[str, ...] = ("area", "roughness", "compactness", "texture")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names where it came from."""


@dataclass(frozen=True)
class AugmentConfig:
    """Random transforms of training batches (``common.data.augment.augment_batch``): rotation
    ±``rotate_deg``, zoom 1 ± ``scale``, shift ± ``translate`` × the side in x and y; with
    probability ``depth_splice`` another image's near field spliced above the image; with
    probability ``negative_crop`` a lesion image replaced by a lesion-free crop of itself; with
    probability ``lesion_paste`` a lesion of the batch pasted at a random place; with
    probability ``lateral_roll`` the image rolled sideways by up to ``lateral_roll_max`` × the
    width (BrEaST's lesions sit mid-width, BUSI's anywhere); blur or
    sharpening of strength up to ``sharpness``; an aspect change of up to 1 + ``stretch`` either
    way (frames of aspect 0.9–1.5 are all resized to a square, so each centre distorts its
    lesions by its own factor); with probability ``gin`` an image's intensities remapped by a
    random shallow conv net (texture and contrast of another "scanner"); the last
    ``calm_epochs`` epochs without the splice, crop, paste and stretch. Centres differ in where
    the lesion sits, how large it is and how their scanners render it, so these ranges set how
    far a model trained on one centre carries to another."""

    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    depth_splice: float = 0.0  # probability per image (common.data.augment.depth_splice)
    depth_splice_max: float = 0.4  # largest push-down, fraction of the height
    negative_crop: float = 0.0  # probability per lesion image (common.data.augment.negative_crop)
    negative_crop_min: float = 0.5  # smallest crop side, fraction of the image side
    lesion_paste: float = 0.0  # probability per image (common.data.augment.lesion_paste)
    lateral_roll: float = 0.0  # probability per image (common.data.augment.lateral_roll)
    lateral_roll_max: float = 0.35  # largest sideways roll, fraction of the width
    sharpness: float = 0.0  # image + s·(image − blur_σ=1px(image)), s uniform in ±sharpness
    stretch: float = 0.0  # aspect change: width × √a, height ÷ √a, log a uniform in ±log(1 + stretch)
    gin: float = 0.0  # probability per image of a random-conv-net intensity map (common.data.augment.gin)
    # the last calm_epochs epochs of each train_local call (each round, in a federation) run
    # without splice, crop, paste and stretch, so boundaries are last learnt on unaltered images
    # (measured: no help after lesion_paste, docs/external_validation.md)
    calm_epochs: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.scale < 1 and 0 <= self.translate <= 0.5 and 0 <= self.rotate_deg <= 180
                and 0 <= self.depth_splice <= 1 and 0 <= self.depth_splice_max < 1
                and 0 <= self.negative_crop <= 1 and 0 < self.negative_crop_min <= 1
                and 0 <= self.lesion_paste <= 1 and 0 <= self.lateral_roll <= 1
                and 0 <= self.lateral_roll_max <= 0.5 and 0 <= self.stretch <= 3
                and 0 <= self.sharpness <= 3 and 0 <= self.gin <= 1 and self.calm_epochs >= 0):
            raise ConfigError(f"data.augmentation: need 0 ≤ scale < 1, 0 ≤ translate ≤ 0.5, "
                              f"0 ≤ rotate_deg ≤ 180, 0 ≤ depth_splice ≤ 1, "
                              f"0 ≤ depth_splice_max < 1, 0 ≤ negative_crop ≤ 1, "
                              f"0 < negative_crop_min ≤ 1, 0 ≤ lesion_paste ≤ 1, "
                              f"0 ≤ lateral_roll ≤ 1, 0 ≤ lateral_roll_max ≤ 0.5, "
                              f"0 ≤ stretch ≤ 3, 0 ≤ sharpness ≤ 3, 0 ≤ gin ≤ 1, calm_epochs ≥ 0; "
                              f"got {self}")


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing and splitting. Images become ``image_size``² single-channel tensors."""

    image_size: int = 128
    augment: bool = True
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0

    @property
    def train_augmentation(self) -> AugmentConfig | None:
        """What ``train_local(augment=...)`` takes: the ranges, or None with augmentation off."""
        return self.augmentation if self.augment else None


@dataclass(frozen=True)
class ModelConfig:
    """Network choice. ``arch``: "small" (fast CPU U-Net), "effb1_attention" (published:
    EfficientNet-B1 encoder + attention U-Net decoder), "lite0" / "lite1" (EfficientNet-Lite encoder,
    optional ImageNet weights from a local file)."""

    arch: str = "small"
    base_channels: int = 16
    depth: int = 4
    cls_head: str = "bottleneck"  # "bottleneck" | "multiscale"
    refine_passes: int = 1  # >1: previous pass's probability map is fed back as an input channel
    dropout: float = 0.3
    num_groups: int = 8
    in_channels: int = 1
    pretrained_path: str | None = None  # a weights file, or "auto" (lite0/1: the pip package's file)
    encoder_norm: str = "group"  # lite0/1: "group" | "affine" (ImageNet BatchNorm statistics folded)
    mixstyle: float = 0.0  # lite0/1: probability per batch of MixStyle at strides 2-8 (not under DP)
    mixstyle_mode: str = "mix"  # "mix" (MixStyle) | "dsu" (Gaussian style shifts, Li et al. 2022)
    # effb1/lite0/lite1: "full" decoder back to the input size; "slim": its last, full-resolution
    # block with 8 channels instead of 16; "half": logits at stride 2, upsampled bilinearly (no
    # last full-resolution block: 160-px lite0 trains 1.2–1.35× faster)
    mask_head: str = "full"


@dataclass(frozen=True)
class LossConfig:
    """total = seg_weight·(dice·Dice + bce·BCE) + cls_weight·cls + consistency·MSE(p̂, φ)."""

    seg_weight: float = 1.0
    dice: float = 1.0
    bce: float = 1.0
    cls_weight: float = 1.0  # 0 → single-task segmentation arm
    cls_loss: str = "bce"  # "bce" | "focal"
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    pos_weight: float | None = None  # None: balanced from the training labels
    consistency: float = 0.5  # λ; 0 → plain multi-task arm
    consistency_grad: str = "both"  # "both" | "mask" (into φ only) | "classifier" (into p̂ only)
    features: tuple[str, ...] = PAPER_FEATURES
    sign_constrained: bool = True  # prior weights keep the clinical direction (anti-collapse)
    prior_supervision: float = 0.0  # weak BCE(φ, label) so φ cannot drift to a constant
    # λ schedule, in training steps of one MultiTaskLoss (one train_local call): 0 for the first
    # consistency_warmup_steps, then linear to λ over consistency_ramp_steps (0, 0: λ throughout)
    consistency_warmup_steps: int = 0
    consistency_ramp_steps: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation; the same for centralised, simulated and deployed training."""

    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    encoder_lr_scale: float = 1.0  # pretrained encoder ("backbone.encoder.*") trains at lr × this
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # "adamw" | "sgd"
    schedule: str = "cosine"  # "cosine" | "constant"
    warmup_steps: int = 0
    grad_clip: float | None = 5.0
    ema_decay: float = 0.0  # > 0: train on, evaluate and keep the moving average of the weights
    proximal_mu: float = 0.0  # FedProx: (μ/2)·||w − w_global||²
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    num_threads: int | None = None
    channels_last: bool = False
    progress: bool = True
    # progressive resizing: the first low_res_epochs epochs of each train_local call see every batch
    # (after augmentation) shrunk by low_res_scale (side rounded to a multiple of 32; 0.8 makes a
    # 160-px lite0 step 1.4× faster, docs/performance.md §10); the last epochs fit full size
    low_res_epochs: int = 0
    low_res_scale: float = 0.8

    def __post_init__(self) -> None:
        if self.low_res_epochs < 0 or not 0 < self.low_res_scale <= 1:
            raise ConfigError(f"train: low_res_epochs must be ≥ 0 and 0 < low_res_scale ≤ 1, got "
                              f"{self.low_res_epochs}, {self.low_res_scale}")


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP-SGD with Opacus. Either ``target_epsilon`` over ``planned_epochs`` local
    epochs (all rounds together) or a fixed ``noise_multiplier``."""

    enabled: bool = False
    target_epsilon: float | None = 8.0
    target_delta: float = 1e-5
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    planned_epochs: int = 10
    accountant: str = "rdp"
    secure_mode: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type (recursing into dataclasses and tuples)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # already built (replace() with dataclass items, e.g. sites)
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: may not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from exc
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from exc
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ``ConfigError`` naming ``where``."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a (nested) config dataclass; tuples become lists."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(obj)


def replace(obj: T, **changes: Any) -> T:
    """``dataclasses.replace`` that also accepts dotted keys: replace(cfg, **{"train.epochs": 2})."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(obj, head), **sub)
    hints = typing.get_type_hints(type(obj))
    unknown = sorted(set(flat) - set(hints))
    if unknown:
        raise ConfigError(f"{type(obj).__name__}: unknown key(s) {unknown}")
    coerced = {
        k: v if dataclasses.is_dataclass(v) else _coerce(hints[k], v, f"{type(obj).__name__}.{k}")
        for k, v in flat.items()
    }
    return dataclasses.replace(obj, **coerced)  # type: ignore[type-var]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping")
    return dict(data)


def load_experiment(path: str | Path | None = None, **overrides: Any) -> ExperimentConfig:
    """Experiment config from an optional YAML file plus dotted overrides."""
    cfg = (
        from_dict(ExperimentConfig, load_yaml(path), str(path))
        if path is not None
        else ExperimentConfig()
    )
    return replace(cfg, **overrides) if overrides else cfg
