"""Batch augmentation: deterministic, binary masks, flips never vertical, ranges that act, and the
depth splice and lateral roll (hand-checked rows and columns)."""
from dataclasses import replace

import pytest
import torch

from common.config import AugmentConfig, ConfigError
from common.data.augment import augment_batch, augmentation, depth_splice, lateral_roll
from common.data.synthetic import make_centre
from common.data.tensors import TensorData, to_tensors
from tests.common.test_tensors import _asym_case


def _data(n: int = 8, size: int = 32) -> TensorData:
    return to_tensors(make_centre("SynPL", n, size=size), size)


def test_augmentation_deterministic_binary_and_in_range() -> None:
    d = _data(8)
    a = augment_batch(d.images, d.masks, torch.Generator().manual_seed(5))
    b = augment_batch(d.images, d.masks, torch.Generator().manual_seed(5))
    c = augment_batch(d.images, d.masks, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d.images)
    assert set(a[1].unique().tolist()) <= {0.0, 1.0}
    assert a[0].min() >= 0 and a[0].max() <= 1 and a[0].shape == d.images.shape
    # small transforms: lesions survive and keep roughly their area (scale² ∈ [0.81, 1.21])
    area_in, area_out = d.masks.flatten(1).sum(1), a[1].flatten(1).sum(1)
    lesion = area_in > 0
    assert ((area_out[lesion] / area_in[lesion] - 1).abs() < 0.4).all()


def test_flip_moves_image_and_mask_together_and_never_vertically() -> None:
    d = to_tensors([_asym_case()], 32)
    flipped = 0
    for seed in range(40):
        img, mask = augment_batch(d.images, d.masks, torch.Generator().manual_seed(seed))
        left_bright = img[0, 0, 8:, :8].mean() > img[0, 0, 8:, -8:].mean()
        left_mask = mask[0, 0, :, :16].sum() > mask[0, 0, :, 16:].sum()
        assert left_bright == left_mask  # the lesion stays on the bright side
        assert mask[0, 0, :16].sum() > mask[0, 0, 16:].sum()  # …and in the upper half: no vertical flip
        assert img[0, 0, 2:6, 10:22].mean() > img[0, 0, -6:-2, 10:22].mean()  # bright top stays on top
        flipped += int(not left_bright)
    assert 5 <= flipped <= 35  # flips happen about half the time


def test_zero_geometry_leaves_only_the_flip() -> None:
    """AugmentConfig with every range 0: each mask is the input mask or its mirror, pixel for pixel."""
    d = _data(8)
    _, mask = augment_batch(d.images, d.masks, torch.Generator().manual_seed(3), AugmentConfig(0, 0, 0))
    for got, orig in zip(mask, d.masks):
        assert torch.equal(got, orig) or torch.equal(got, orig.flip(-1))


def _centroid_rows(masks: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(masks.shape[-2], dtype=torch.float32).view(1, 1, -1, 1)
    return (masks * rows).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)


def test_translate_range_sets_how_far_lesions_move() -> None:
    """Vertical centroid shift (flip and rotation-free): ±5 % of 32 px stays within 1.6 px (+ a
    pixel of resampling), ±30 % reaches well beyond it on some image."""
    d = _data(16)
    lesion = d.masks.flatten(1).amax(1) > 0
    before = _centroid_rows(d.masks)[lesion]
    shifts = {}
    for t in (0.05, 0.3):
        _, m = augment_batch(d.images, d.masks, torch.Generator().manual_seed(1), AugmentConfig(0, 0, t))
        kept = m.flatten(1).amax(1)[lesion] > 0  # a large shift may push a lesion out of the frame
        shifts[t] = (_centroid_rows(m)[lesion] - before)[kept].abs()
    assert shifts[0.05].max() <= 0.05 * 32 + 1
    assert shifts[0.3].max() > 0.05 * 32 + 2


def test_augment_argument_forms() -> None:
    assert augmentation(True) == AugmentConfig() and augmentation(False) is None and augmentation(None) is None
    strong = AugmentConfig(rotate_deg=15, scale=0.25, translate=0.2)
    assert augmentation(strong) is strong


def _rand_from(*values: list[float]):
    """A ``rand`` that returns the given draws in order (one list per call)."""
    queue = [torch.tensor(v) for v in values]
    return lambda *shape: queue.pop(0)


def test_depth_splice_by_hand():
    """Image 0 pushed down 3 rows under image 1's top rows; image 1 untouched (not drawn);
    image 2's push is capped at its donor's first lesion row (row 2 of image 0)."""
    h = w = 8
    images = torch.stack([torch.full((1, h, w), float(i + 1)) for i in range(3)])
    images += torch.arange(h, dtype=torch.float32).view(1, 1, h, 1) / 100  # row index in the value
    masks = torch.zeros(3, 1, h, w)
    masks[0, 0, 2:4, 2:4] = 1  # image 0: lesion rows 2-3
    masks[1, 0, 6:8, 0:2] = 1  # image 1: lesion rows 6-7
    cfg = AugmentConfig(depth_splice=0.5, depth_splice_max=0.5)
    # draws: apply (0, 2 yes; 1 no) · donor offsets (0 → 1, 2 → 0) · push fractions (3/4, 7/8 of max·H)
    rand = _rand_from([0.1, 0.9, 0.2], [0.0, 0.0, 0.0], [0.75, 0.0, 0.99])
    out, m = depth_splice(images, masks, cfg, rand)
    assert torch.equal(out[0, 0, :3], images[1, 0, :3])  # donor's near field on top
    assert torch.equal(out[0, 0, 3:], images[0, 0, :5])  # the rest pushed down by 3 rows
    assert torch.equal(m[0, 0, 5:7, 2:4], torch.ones(2, 2)) and m[0].sum() == 4  # lesion moved 3 down
    assert torch.equal(out[1], images[1]) and torch.equal(m[1], masks[1])
    assert torch.equal(out[2, 0, :2], images[0, 0, :2])  # capped at 2: no donor lesion row taken
    assert torch.equal(out[2, 0, 2:], images[2, 0, :6]) and m[2].sum() == 0


def test_depth_splice_in_augment_batch_keeps_masks_binary_and_moves_lesions_down():
    d = _data(16)
    cfg = AugmentConfig(rotate_deg=0, scale=0, translate=0, depth_splice=1.0, depth_splice_max=0.4)
    _, m = augment_batch(d.images, d.masks, torch.Generator().manual_seed(0), cfg)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    kept = (m.flatten(1).amax(1) > 0) & (d.masks.flatten(1).amax(1) > 0)
    assert (_centroid_rows(m)[kept] >= _centroid_rows(d.masks)[kept] - 1e-4).all()
    assert (_centroid_rows(m)[kept] > _centroid_rows(d.masks)[kept] + 1).any()
    same = augment_batch(d.images, d.masks, torch.Generator().manual_seed(0), AugmentConfig())
    again = augment_batch(d.images, d.masks, torch.Generator().manual_seed(0),
                          AugmentConfig(depth_splice=0.0, depth_splice_max=0.3))
    assert torch.equal(same[0], again[0])  # off: the random stream of the default is unchanged


def test_lateral_roll_by_hand():
    """Columns hold their index: image 0 rolled right by round((2·0.75 − 1) · 0.5 · 8) = 2 columns,
    image 1 left by 4 (the largest roll), image 2 not drawn; masks move with their images."""
    images = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8).repeat(3, 1, 4, 1)
    masks = torch.zeros(3, 1, 4, 8)
    masks[:, 0, 1:3, 3] = 1  # a lesion in column 3 of every image
    cfg = AugmentConfig(lateral_roll=0.5, lateral_roll_max=0.5)
    out, m = lateral_roll(images, masks, cfg, _rand_from([0.1, 0.2, 0.9], [0.75, 0.0, 0.3]))
    assert out[0, 0, 0].tolist() == [6, 7, 0, 1, 2, 3, 4, 5]  # what left on the right came back
    assert out[1, 0, 0].tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert torch.equal(out[2], images[2]) and torch.equal(m[2], masks[2])
    assert torch.nonzero(m[0, 0, 1])[:, 0].tolist() == [5] and torch.nonzero(m[1, 0, 1])[:, 0].tolist() == [7]
    assert torch.equal(m.sum((1, 2, 3)), masks.sum((1, 2, 3)))  # nothing lost at an edge


def test_lateral_roll_spreads_lesions_across_the_width_and_is_off_by_default():
    d = _data(16)
    flat = AugmentConfig(rotate_deg=0, scale=0, translate=0)
    def off_centre(m: torch.Tensor) -> torch.Tensor:  # |lesion centre column − mid-width|: flip-blind
        c = torch.arange(m.shape[-1], dtype=torch.float32).view(1, 1, 1, -1) - (m.shape[-1] - 1) / 2
        return ((m * c).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)).abs()
    ref = augment_batch(d.images, d.masks, torch.Generator().manual_seed(0), flat)
    _, m = augment_batch(d.images, d.masks, torch.Generator().manual_seed(0),
                         replace(flat, lateral_roll=1.0, lateral_roll_max=0.25))
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m.sum((1, 2, 3)), d.masks.sum((1, 2, 3)))  # a roll keeps every lesion pixel
    torch.testing.assert_close(off_centre(ref[1]), off_centre(d.masks))  # flips only
    assert (off_centre(m) - off_centre(d.masks)).abs().max() > 2  # the roll moved lesions sideways
    again = augment_batch(d.images, d.masks, torch.Generator().manual_seed(0),
                          replace(flat, lateral_roll=0.0, lateral_roll_max=0.3))
    assert torch.equal(ref[0], again[0])  # off: the random stream is unchanged
    with pytest.raises(ConfigError, match="lateral_roll"):
        AugmentConfig(lateral_roll_max=0.6)


def test_stretch_changes_aspect_within_range_and_keeps_area() -> None:
    """A centred 12×12 square, no rotation/zoom/shift: with stretch 1 (aspect a ∈ [1/2, 2]) its
    width/height ratio spreads over both sides of 1, never past 2 (+ a pixel of resampling), and
    its area stays about 144 (width × √a, height ÷ √a)."""
    masks = torch.zeros(64, 1, 32, 32)
    masks[:, :, 10:22, 10:22] = 1
    images = masks * 0.5 + 0.25
    cfg = AugmentConfig(rotate_deg=0, scale=0, translate=0, stretch=1.0)
    _, out = augment_batch(images, masks, torch.Generator().manual_seed(0), cfg)
    width = out.amax(dim=2).flatten(1).sum(1)
    height = out.amax(dim=3).flatten(1).sum(1)
    ratio = width / height
    assert ratio.min() < 0.8 and ratio.max() > 1.25
    assert (ratio < 2 * 14 / 12).all() and (ratio > 0.5 * 10 / 12).all()
    assert ((out.flatten(1).sum(1) / 144 - 1).abs() < 0.25).all()
    _, plain = augment_batch(images, masks, torch.Generator().manual_seed(0),
                             AugmentConfig(rotate_deg=0, scale=0, translate=0))
    assert (plain.amax(dim=2).flatten(1).sum(1) == 12).all()  # stretch 0: the square stays square
