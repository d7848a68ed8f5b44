"""Configuration: parsed once from YAML / dicts into frozen dataclasses.

Every knob of data, model, loss, training and privacy lives here, with its default, so a run's
resolved config (``to_dict``) fully describes it. Unknown keys are errors that name the source,
because a typo in a hospital's YAML must not silently fall back to a default.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# one door: every config name is importable from here (the machinery and the federation section
# live in their own modules)
from common.configtools import (  # noqa: F401
    ConfigError,
    _need,
    _nonneg,
    _one_of,
    from_dict,
    load_yaml,
    replace,
    to_dict,
)
from common.fedconfig import (  # noqa: F401
    CLIENT_DP_MODES,
    MEAN_STRATEGIES,
    STRATEGIES,
    ClientDPConfig,
    FederationConfig,
    SecAggConfig,
)

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
#: Names the dataclasses below accept (the modules that build them import these).
ARCHES: tuple[str, ...] = ("small", "effb1_attention", "lite0", "lite1")
CLS_HEADS: tuple[str, ...] = ("bottleneck", "multiscale")
MASK_HEADS: tuple[str, ...] = ("full", "half")
ENCODER_NORMS: tuple[str, ...] = ("group", "affine")
CONSISTENCY_GRADS: tuple[str, ...] = ("both", "mask", "classifier")
CLS_LOSSES: tuple[str, ...] = ("bce", "focal")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
ACCOUNTANTS: tuple[str, ...] = ("rdp", "gdp", "prv")
#: ``privacy.trainable``: what DP-SGD trains (common/dp_trainable.py).
DP_TRAINABLE: tuple[str, ...] = ("all", "decoder", "norms")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class AugmentConfig:
    """Random transforms of training batches (``common.data.augment.augment_batch``). Centres
    differ in where the lesion sits, how large it is and how their scanners render it, so these
    ranges set how far a model trained on one centre carries to another."""

    rotate_deg: float = 10.0  # rotation uniform in ± this many degrees
    scale: float = 0.1  # zoom uniform in 1 ± scale
    translate: float = 0.05  # shift uniform in ± translate × the side, in x and y
    depth_splice: float = 0.0  # probability per image of another image's near field spliced above it
    depth_splice_max: float = 0.4  # largest push-down of the splice, fraction of the height
    lateral_roll: float = 0.0  # probability per image of a sideways roll (BrEaST's lesions sit mid-width)
    lateral_roll_max: float = 0.35  # largest sideways roll, fraction of the width
    # aspect change: width × √a, height ÷ √a, log a uniform in ±log(1 + stretch) (frames of aspect
    # 0.9–1.5 are all resized to a square, so each centre distorts its lesions by its own factor)
    stretch: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.scale < 1 and 0 <= self.translate <= 0.5 and 0 <= self.rotate_deg <= 180
                and 0 <= self.depth_splice <= 1 and 0 <= self.depth_splice_max < 1
                and 0 <= self.lateral_roll <= 1 and 0 <= self.lateral_roll_max <= 0.5
                and 0 <= self.stretch <= 3):
            raise ConfigError(f"data.augmentation: need 0 ≤ scale < 1, 0 ≤ translate ≤ 0.5, "
                              f"0 ≤ rotate_deg ≤ 180, 0 ≤ depth_splice ≤ 1, "
                              f"0 ≤ depth_splice_max < 1, 0 ≤ lateral_roll ≤ 1, "
                              f"0 ≤ lateral_roll_max ≤ 0.5, 0 ≤ stretch ≤ 3; got {self}")


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing and splitting. Images become ``image_size``² single-channel tensors."""

    image_size: int = 128  # side of the square every image is resized to, in pixels
    augment: bool = True  # random transforms of training batches (``augmentation``'s ranges)
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)  # the transforms' ranges
    val_fraction: float = 0.2  # share of a site's images for validation (whole patients per split)
    test_fraction: float = 0.0  # share held back as the site's own test split (whole patients)
    seed: int = 0  # seed of the splits (and of synthetic centres' images)
    mask_fraction: float = 1.0  # share of training lesion images keeping their mask (by patient; experiments)
    label_fraction: float = 1.0  # share of training images keeping their label (by patient; experiments)

    def __post_init__(self) -> None:
        _need(self.image_size >= 32, "data.image_size", "must be >= 32 pixels", self.image_size)
        for name in ("mask_fraction", "label_fraction"):
            v = getattr(self, name)
            _need(isinstance(v, (int, float)) and 0.0 <= v <= 1.0, f"data.{name}",
                  "must lie in [0, 1]", v)
        _need(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "must lie in [0, 1)", self.val_fraction)
        _need(0.0 <= self.test_fraction < 1.0 and self.val_fraction + self.test_fraction < 1.0,
              "data.test_fraction", "must lie in [0, 1) with val_fraction + test_fraction < 1",
              self.test_fraction)

    @property
    def train_augmentation(self) -> AugmentConfig | None:
        """What ``train_local(augment=...)`` takes: the ranges, or None with augmentation off."""
        return self.augmentation if self.augment else None


@dataclass(frozen=True)
class ModelConfig:
    """Network choice. ``arch``: "small" (fast CPU U-Net), "effb1_attention" (published:
    EfficientNet-B1 encoder + attention U-Net decoder), "lite0" / "lite1" (EfficientNet-Lite encoder,
    optional ImageNet weights from a local file)."""

    arch: str = "small"  # "small" | "effb1_attention" | "lite0" | "lite1"
    base_channels: int = 16  # small: channels of the first level, doubled at each deeper one
    depth: int = 4  # small: resolution levels (the image side must divide by 2^(depth − 1))
    cls_head: str = "bottleneck"  # "bottleneck" | "multiscale" (pooled decoder stages as well)
    refine_passes: int = 1  # >1: previous pass's probability map is fed back as an input channel
    dropout: float = 0.3  # before the malignancy head's linear layer
    num_groups: int = 8  # GroupNorm groups of every norm layer (no BatchNorm: Opacus, small sites)
    in_channels: int = 1  # image channels (grey-scale ultrasound)
    pretrained_path: str | None = None  # a weights file, or "auto" (lite0/1: the pip package's file)
    encoder_norm: str = "group"  # lite0/1: "group" | "affine" (ImageNet BatchNorm statistics folded)
    mixstyle: float = 0.0  # lite0/1: probability per batch of MixStyle at strides 2-8 (not under DP)
    # effb1/lite0/lite1: "full" decoder back to the input size; "half": logits at stride 2,
    # upsampled bilinearly (no last full-resolution block: 160-px lite0 trains 1.2–1.35× faster)
    mask_head: str = "full"
    # a fedbus model file or training checkpoint of this exact network: every weight starts from
    # it (strict: a missing file, another format, architecture or feature set is refused)
    init_from: str | None = None

    def __post_init__(self) -> None:
        _one_of("model.arch", self.arch, ARCHES)
        _need(self.init_from is None or bool(str(self.init_from).strip()), "model.init_from",
              "must be a file path (or null)", self.init_from)
        _one_of("model.cls_head", self.cls_head, CLS_HEADS)
        _one_of("model.encoder_norm", self.encoder_norm, ENCODER_NORMS)
        _one_of("model.mask_head", self.mask_head, MASK_HEADS)
        _need(self.mask_head == "full" or self.arch != "small", "model.mask_head",
              "arch 'small' has only the 'full' head", self.mask_head)
        for name, low in (("base_channels", 1), ("depth", 2), ("refine_passes", 1), ("num_groups", 1),
                          ("in_channels", 1)):
            _need(getattr(self, name) >= low, f"model.{name}", f"must be >= {low}", getattr(self, name))
        _need(0.0 <= self.dropout < 1.0, "model.dropout", "must lie in [0, 1)", self.dropout)
        _need(0.0 <= self.mixstyle <= 1.0, "model.mixstyle", "must lie in [0, 1]", self.mixstyle)

    @property
    def size_multiple(self) -> int:
        """What the image side must divide by: the network's total downsampling."""
        return 2 ** (self.depth - 1) if self.arch == "small" else 32


@dataclass(frozen=True)
class LossConfig:
    """total = seg_weight·(dice·Dice + bce·BCE) + cls_weight·cls + consistency·MSE(p̂, φ)."""

    seg_weight: float = 1.0  # weight of the segmentation term
    dice: float = 1.0  # soft Dice (lesion images only) inside the segmentation term
    bce: float = 1.0  # pixel BCE (every image) inside the segmentation term
    cls_weight: float = 1.0  # 0 → single-task segmentation arm
    cls_loss: str = "bce"  # "bce" | "focal"
    focal_gamma: float = 2.0  # focal loss γ (cls_loss "focal")
    focal_alpha: float = 0.25  # focal loss weight of the positives (cls_loss "focal")
    pos_weight: float | None = None  # None: balanced from the training labels
    consistency: float = 0.5  # λ; 0 → plain multi-task arm
    consistency_grad: str = "both"  # "both" | "mask" (into φ only) | "classifier" (into p̂ only)
    features: tuple[str, ...] = PAPER_FEATURES  # BI-RADS features the prior φ combines
    sign_constrained: bool = True  # prior weights keep the clinical direction (anti-collapse)
    prior_supervision: float = 0.0  # weak BCE(φ, label) so φ cannot drift to a constant
    # λ schedule in epochs of the whole run (common.schedule, the same centralised and federated):
    # 0 until consistency_warmup_epochs, then linear to λ over consistency_ramp_epochs
    consistency_warmup_epochs: float = 0.0
    consistency_ramp_epochs: float = 0.0

    def __post_init__(self) -> None:
        _nonneg("loss", self, "seg_weight", "dice", "bce", "cls_weight", "focal_gamma", "focal_alpha",
                "consistency", "prior_supervision", "consistency_warmup_epochs", "consistency_ramp_epochs")
        if self.pos_weight is not None:
            _need(math.isfinite(self.pos_weight) and self.pos_weight > 0, "loss.pos_weight",
                  "must be a finite number > 0 (or null: balanced)", self.pos_weight)
        _one_of("loss.cls_loss", self.cls_loss, CLS_LOSSES)
        _one_of("loss.consistency_grad", self.consistency_grad, CONSISTENCY_GRADS)
        bad = [f for f in self.features if f not in ALL_FEATURES]
        _need(bool(self.features) and not bad and len(set(self.features)) == len(self.features),
              "loss.features", f"must be distinct names from {list(ALL_FEATURES)}", list(self.features))


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation; the same for centralised, simulated and deployed training."""

    epochs: int = 10  # epochs of one train_local call (a federated round runs federation.local_epochs)
    batch_size: int = 16  # images per step (under DP: the expected size of a Poisson batch)
    lr: float = 1e-3  # peak learning rate, reached after the warm-up
    encoder_lr_scale: float = 1.0  # pretrained encoder ("backbone.encoder.*") trains at lr × this
    weight_decay: float = 1e-4  # AdamW's decoupled decay (SGD: L2 penalty)
    optimizer: str = "adamw"  # "adamw" | "sgd" (momentum 0.9)
    schedule: str = "cosine"  # after the warm-up: "cosine" (to 0 at the run's end) | "constant"
    warmup_epochs: float = 0.0  # linear LR warm-up over the run's first epochs (common.schedule)
    grad_clip: float | None = 5.0  # global gradient-norm clip; None: off (DP clips per sample instead)
    proximal_mu: float = 0.0  # FedProx: (μ/2)·||w − w_global||²
    seed: int = 0  # data order, augmentation, dropout (federated: one seed per round and site from it)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    num_threads: int | None = None  # torch intra-op threads; None: torch's default (all cores)
    channels_last: bool = False  # channels-last memory format (faster depthwise convs on CPU; not under DP)
    progress: bool = True  # a progress bar per train_local call

    def __post_init__(self) -> None:
        _need(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        _need(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        _nonneg("train", self, "lr")
        _nonneg("train", self, "encoder_lr_scale", "weight_decay", "warmup_epochs", "proximal_mu")
        _one_of("train.optimizer", self.optimizer, OPTIMIZERS)
        _one_of("train.schedule", self.schedule, SCHEDULES)
        if self.grad_clip is not None:
            _need(math.isfinite(self.grad_clip) and self.grad_clip > 0, "train.grad_clip",
                  "must be a finite number > 0 (or null: off)", self.grad_clip)
        _need(bool(_DEVICE.match(self.device)), "train.device", "must be auto, cpu, mps, cuda or cuda:N",
              self.device)
        if self.num_threads is not None:
            _need(self.num_threads >= 1, "train.num_threads", "must be >= 1 (or null)", self.num_threads)


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP-SGD with Opacus. Either ``target_epsilon`` over ``planned_epochs`` local
    epochs (all rounds together) or a fixed ``noise_multiplier``."""

    enabled: bool = False  # DP-SGD on (common.privacy)
    target_epsilon: float | None = 8.0  # ε that planned_epochs may spend (σ is derived from it)
    target_delta: float = 1e-5  # δ of the (ε, δ) guarantee
    noise_multiplier: float | None = None  # a fixed σ instead of one derived from target_epsilon
    max_grad_norm: float = 1.0  # per-sample gradient clip C
    planned_epochs: int = 10  # local epochs the budget covers, all rounds together
    accountant: str = "rdp"  # Opacus accountant ("rdp" | "prv" | "gdp")
    secure_mode: bool = False  # Opacus' cryptographically secure noise (needs torchcsprng)
    trainable: str = "all"  # "all" | "decoder" (encoder frozen) | "norms" (affines, biases, heads, prior)
    augmult: int = 1  # augmentations per image whose gradients are averaged before clipping (De et al. 2022)
    max_physical_batch: int | None = None  # most rows (images × augmult) per forward pass; None: no bound

    def __post_init__(self) -> None:
        _one_of("privacy.trainable", self.trainable, DP_TRAINABLE)
        _need(self.augmult >= 1, "privacy.augmult", "must be >= 1", self.augmult)
        if self.max_physical_batch is not None:
            _need(self.max_physical_batch >= self.augmult, "privacy.max_physical_batch",
                  f"must be >= privacy.augmult ({self.augmult}): one image's copies share a pass",
                  self.max_physical_batch)
        for name in ("target_epsilon", "noise_multiplier"):
            v = getattr(self, name)
            _need(v is None or v > 0, f"privacy.{name}", "must be > 0 (or null)", v)
        _need(0.0 < self.target_delta < 1.0, "privacy.target_delta", "must lie in (0, 1)", self.target_delta)
        _need(math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0, "privacy.max_grad_norm",
              "must be a finite number > 0", self.max_grad_norm)
        _need(self.planned_epochs >= 1, "privacy.planned_epochs", "must be >= 1", self.planned_epochs)
        _one_of("privacy.accountant", self.accountant, ACCOUNTANTS)


@dataclass(frozen=True)
class InferenceConfig:
    """How a trained model predicts (``common.inference``), the same in simulation scoring,
    federated evaluation, the benchmarks and the predict command."""

    flip: bool = False  # also predict the horizontal mirror and average the probabilities
    depth_shifts: tuple[float, ...] = ()  # also the image shifted up by these fractions of its height
    largest_component: bool = False  # keep only the largest 8-connected component of the mask
    ensemble: bool = False  # sim: score the mean of the seeds' models of an arm as one model
    threshold: float = 0.5  # mask and malignancy decision threshold on probabilities

    def __post_init__(self) -> None:
        if any(not 0.0 < s < 1.0 for s in self.depth_shifts):
            raise ConfigError(f"inference.depth_shifts: each shift must lie in (0, 1), got "
                              f"{list(self.depth_shifts)}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"inference.threshold: must lie in (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: what every site trains and how a trained model predicts."""

    data: DataConfig = field(default_factory=DataConfig)  # preprocessing, splits, augmentation
    model: ModelConfig = field(default_factory=ModelConfig)  # the network
    loss: LossConfig = field(default_factory=LossConfig)  # the multi-task loss and λ's schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # local optimisation and the LR schedule
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # DP-SGD
    inference: InferenceConfig = field(default_factory=InferenceConfig)  # how a trained model predicts

    def __post_init__(self) -> None:
        size, multiple = self.data.image_size, self.model.size_multiple
        _need(size % multiple == 0, "data.image_size",
              f"must be a multiple of {multiple} for arch {self.model.arch!r}", size)
        if self.privacy.enabled:
            refusal = dp_refusal(self.model.mixstyle, self.train.channels_last, self.data.train_augmentation)
            if refusal:
                raise ConfigError(f"privacy.enabled: {refusal}")
            _need(self.privacy.augmult == 1 or self.data.augment, "privacy.augmult",
                  "needs data.augment: true (without it the copies are identical)", self.privacy.augmult)


def dp_refusal(mixstyle: float, channels_last: bool, augment: AugmentConfig | None) -> str | None:
    """Why DP-SGD cannot train with these options (None: it can). Each refused option makes one
    image's gradient depend on other images of the batch, or corrupts Opacus' per-sample
    gradients, so the per-image guarantee would not hold."""
    if mixstyle > 0:
        return (f"model.mixstyle={mixstyle:g} mixes feature statistics across the images of a batch, "
                "so one image's gradient depends on the others: set model.mixstyle: 0 under DP")
    if channels_last:
        return ("train.channels_last: Opacus' per-sample conv gradients are wrong for channels-last "
                "tensors: set train.channels_last: false under DP")
    if augment is not None and augment.depth_splice > 0:
        return (f"data.augmentation.depth_splice={augment.depth_splice:g} splices another image of the "
                "batch into each image, so one image's gradient depends on another: set it to 0 under DP")
    return None
