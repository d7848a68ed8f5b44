"""Configuration: parsed once from YAML / dicts into frozen dataclasses.

Every knob of data, model, loss, training and privacy lives here, with its default, so a run's
resolved config (``to_dict``) fully describes it. Unknown keys are errors that name the source,
because a typo in a hospital's YAML must not silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import math
import re
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
#: ``privacy.trainable``: what DP-SGD trains ("decoder": every parameter but ``backbone.encoder.*``).
DP_TRAINABLE: tuple[str, ...] = ("all", "decoder")
STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedbn", "fedadam", "fedmedian")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names where it came from."""


def _need(ok: bool, key: str, rule: str, value: Any) -> None:
    """ConfigError ``key: rule, got value`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")


def _nonneg(section: str, obj: Any, *names: str) -> None:
    """Each named field a finite number >= 0 (NaN and inf refused)."""
    for name in names:
        v = getattr(obj, name)
        _need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
              f"{section}.{name}", "must be a finite number >= 0", v)


def _one_of(key: str, value: str, known: tuple[str, ...]) -> None:
    _need(value in known, key, f"must be one of {list(known)}", value)


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
    trainable: str = "all"  # "all" | "decoder": encoder frozen, decoder + heads + prior DP-trained
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


#: Strategies whose aggregate is a weighted mean of complete updates: all a masked sum (SecAgg+)
#: yields, and what client-level DP's noise σ·C/n is calibrated for.
MEAN_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")
#: Client-level DP modes of server/dp.py; the experiment file offers the fixed-clipping ones.
CLIENT_DP_MODES: tuple[str, ...] = ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
CLIENT_DP_YAML_MODES: tuple[str, ...] = ("off", "server-fixed", "client-fixed")


@dataclass(frozen=True)
class ClientDPConfig:
    """Client-level (central) DP with Flower's wrappers (server/dp.py): each site's update
    clipped to ``clipping_norm``, Gaussian noise σ·C/n added to the mean of n sites. The
    adaptive fields are for the library's adaptive modes; ``delta`` only for reporting ε."""

    mode: str = "off"  # one of CLIENT_DP_YAML_MODES ("server-fixed": the server clips each update)
    noise_multiplier: float = 1.0  # σ
    clipping_norm: float = 1.0  # C: bound on ||w_site − w_global||
    initial_clipping_norm: float = 0.1  # adaptive modes
    target_clipped_quantile: float = 0.5  # adaptive modes
    clip_norm_lr: float = 0.2  # adaptive modes
    clipped_count_stddev: float | None = None  # adaptive modes (Flower's default n/20)
    delta: float = 1e-3  # δ of the reported client-level ε

    def __post_init__(self) -> None:
        _one_of("client_dp.mode", self.mode, CLIENT_DP_MODES)
        _nonneg("client_dp", self, "noise_multiplier")
        for name in ("clipping_norm", "initial_clipping_norm", "clip_norm_lr"):
            v = getattr(self, name)
            _need(math.isfinite(v) and v > 0, f"client_dp.{name}", "must be a finite number > 0", v)
        _need(0.0 <= self.target_clipped_quantile <= 1.0, "client_dp.target_clipped_quantile",
              "must lie in [0, 1]", self.target_clipped_quantile)
        _need(0.0 < self.delta < 1.0, "client_dp.delta", "must lie in (0, 1)", self.delta)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def client_side(self) -> bool:
        """Whether the sites clip (client/client_dp.py applies Flower's mod when asked)."""
        return self.mode.startswith("client-")

    @property
    def client_mod_name(self) -> str | None:
        """The ``flwr.clientapp.mod`` the sites need, or None."""
        return {"client-fixed": "fixedclipping_mod", "client-adaptive": "adaptiveclipping_mod"}.get(self.mode)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, where: str = "client_dp") -> "ClientDPConfig":
        """From a mapping with dashed (run-config) or underscored keys."""
        return from_dict(cls, {str(k).replace("-", "_"): v for k, v in (data or {}).items()}, where)


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ (server/secagg_app.py, ``flwr.server.workflow.SecAggPlusWorkflow``): the server
    learns only the weighted mean of the site updates. Floats for ``num_shares`` /
    ``reconstruction_threshold`` are fractions of the sampled sites / of the shares; any
    ``reconstruction_threshold`` sites colluding with the server can unmask one site's update."""

    enabled: bool = False  # run the federation's rounds under SecAgg+
    num_shares: int | float = 1.0  # shares of each site's mask secrets (1.0: all sampled sites)
    reconstruction_threshold: int | float = 0.67  # shares needed to unmask a dropped site
    clipping_range: float = 1.0  # scaled update values are clipped to ± this before quantisation
    quantization_range: int = 2**22  # quantisation levels over [−clipping_range, clipping_range]
    modulus_range: int = 2**32  # the masked sum's modulus
    max_weight: float = 1000.0  # most training images a site may have (its weight's scale)
    timeout_s: float = 600.0  # deadline of each SecAgg+ stage

    def __post_init__(self) -> None:
        for name in ("clipping_range", "max_weight", "timeout_s"):
            v = getattr(self, name)
            _need(math.isfinite(v) and v > 0, f"secagg.{name}", "must be a finite number > 0", v)
        _need(0 < self.quantization_range < self.modulus_range, "secagg.quantization_range",
              "must lie in (0, modulus_range)", self.quantization_range)
        _need(self.modulus_range & (self.modulus_range - 1) == 0, "secagg.modulus_range",
              "must be a power of 2", self.modulus_range)
        shares, threshold = self.num_shares, self.reconstruction_threshold
        _need((shares == 1 or shares > 2) if isinstance(shares, int) else (0 < shares <= 1),
              "secagg.num_shares", "must be an integer > 2 (or 1), or a fraction in (0, 1]", shares)
        _need((threshold >= 1) if isinstance(threshold, int) else (0 < threshold <= 1),
              "secagg.reconstruction_threshold", "must be an integer >= 1 or a fraction in (0, 1]", threshold)
        if isinstance(shares, int) and isinstance(threshold, int) and shares > 2:
            _need(threshold < shares, "secagg.reconstruction_threshold",
                  f"must be less than num_shares ({shares})", threshold)


@dataclass(frozen=True)
class FederationConfig:
    """Round structure and aggregation. ``proximal_mu`` only acts with strategy "fedprox";
    ``server_lr`` only with "fedadam"; ``min_sites`` is the quorum below which no round starts."""

    rounds: int = 3  # server rounds; rounds × local_epochs is the run's epoch budget
    local_epochs: int = 1  # epochs each site trains per round
    strategy: str = "fedavg"  # one of STRATEGIES, the same in simulation and deployment
    proximal_mu: float = 0.01  # FedProx μ
    fraction_train: float = 1.0  # share of the connected sites asked to train each round
    fraction_evaluate: float = 1.0  # share asked to evaluate
    min_sites: int = 2  # quorum: no round starts with fewer connected sites
    round_timeout_s: float = 600.0  # deadline for one round's replies; late sites are left out
    quorum_timeout_s: float = 300.0  # how long a round waits for the quorum before the run stops
    server_lr: float = 0.01  # FedAdam's server learning rate
    central_eval: bool = True  # the server also scores the run's central test centres each round
    checkpoint_every: int = 1  # rounds between checkpoints
    packed_weights: bool = True  # one float32 vector per message (common/packing.py)
    screen_norm_factor: float = 10.0  # reject an update whose ||w_site − w_global|| exceeds this × the round's median
    screen_norm_cap: float | None = None  # absolute bound on that norm (None: only the relative bound)
    drop_after_rejections: int = 3  # a site rejected this many rounds running is no longer sampled
    client_dp: ClientDPConfig = field(default_factory=ClientDPConfig)  # client-level DP (server/dp.py)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)  # secure aggregation (server/secagg_app.py)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"federation.strategy: {self.strategy!r} not one of {STRATEGIES}")
        for name in ("rounds", "local_epochs", "min_sites", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"federation.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"federation.{name}: must be in (0, 1], got {getattr(self, name)}")
        for name in ("round_timeout_s", "quorum_timeout_s", "server_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"federation.{name}: must be > 0, got {getattr(self, name)}")
        if self.proximal_mu < 0:
            raise ConfigError(f"federation.proximal_mu: must be >= 0, got {self.proximal_mu}")
        if not self.screen_norm_factor >= 1.0:  # below 1 even the median site's update is rejected
            raise ConfigError(f"federation.screen_norm_factor: must be >= 1, got {self.screen_norm_factor}")
        if self.screen_norm_cap is not None and not self.screen_norm_cap > 0:
            raise ConfigError(f"federation.screen_norm_cap: must be > 0 or null, got {self.screen_norm_cap}")
        if self.drop_after_rejections < 1:
            raise ConfigError(f"federation.drop_after_rejections: must be >= 1, got {self.drop_after_rejections}")
        _check_private_aggregation(self)


def _check_private_aggregation(fed: FederationConfig) -> None:
    """Refuse the combinations client-level DP and SecAgg+ cannot run with, naming the reason."""
    dp, secagg = fed.client_dp, fed.secagg
    if dp.enabled and secagg.enabled:
        raise ConfigError("federation.client_dp and federation.secagg: not both at once (Flower 1.41's DP "
                          "wrappers are Message-API strategies, SecAgg+ a legacy workflow; and server-side "
                          "clipping needs the individual updates SecAgg+ hides)")
    if secagg.enabled and fed.strategy not in MEAN_STRATEGIES:
        raise ConfigError(f"federation.secagg: strategy {fed.strategy!r} cannot run under SecAgg+, which "
                          "yields only the weighted mean of complete updates (fedbn withholds layers, "
                          f"fedadam/fedmedian need more than a mean); use one of {list(MEAN_STRATEGIES)}")
    if not dp.enabled:
        return
    if dp.mode not in CLIENT_DP_YAML_MODES:
        raise ConfigError(f"federation.client_dp.mode: {dp.mode!r} is not offered for runs (adaptive clipping "
                          "would clip replies before the server's update screening, and client-adaptive adds a "
                          f"reply metric outside the fixed schema); use one of {list(CLIENT_DP_YAML_MODES)}")
    if fed.strategy not in MEAN_STRATEGIES:
        raise ConfigError(f"federation.client_dp: strategy {fed.strategy!r} cannot run with client-level DP: "
                          "the noise σ·C/n is calibrated for a mean of clipped updates of all sent arrays "
                          f"(fedbn withholds layers, fedadam/fedmedian are not a mean); use one of "
                          f"{list(MEAN_STRATEGIES)}")
    if fed.packed_weights:
        raise ConfigError("federation.client_dp: needs federation.packed_weights: false (the DP wrappers "
                          "and clipping mods compare the update with the global weights tensor by tensor)")


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
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one number is a list of one (--set sim.seeds=8)
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
