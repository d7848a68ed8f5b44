"""Batch augmentation: deterministic, binary masks, flips never vertical, ranges that act, and the
depth splice and lateral roll (hand-checked rows and columns)."""
from dataclasses import replace

import pytest
import torch

from common.config import AugmentConfig, ConfigError
from common.data.augment import (augment_batch, augmentation, calm, depth_splice, lateral_roll, negative_crop,
                                  shrink_batch)
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
    assert calm(AugmentConfig(lateral_roll=0.5)).lateral_roll == 0.0
    with pytest.raises(ConfigError, match="lateral_roll"):
        AugmentConfig(lateral_roll_max=0.6)


def test_negative_crop_by_hand():
    """16×16 images whose value is 10·row + col/100, so a pixel's value names where it came from.
    Image 0: lesion rows 2-4 → the largest free square is below it (rows ≥ 5 + margin 0 → side
    11, cols 0-10 with along = 0); image 1 is not drawn; image 2's lesion fills the middle and
    leaves no square of half the side; image 3 has no lesion."""
    h = w = 16
    rows = torch.arange(h, dtype=torch.float32).view(h, 1) * 10
    cols = torch.arange(w, dtype=torch.float32).view(1, w) / 100
    images = (rows + cols).expand(4, 1, h, w).clone()
    masks = torch.zeros(4, 1, h, w)
    masks[0, 0, 2:5, 6:9] = 1
    masks[1, 0, 2:5, 6:9] = 1
    masks[2, 0, 4:12, 4:12] = 1
    cfg = AugmentConfig(negative_crop=0.5, negative_crop_min=0.5)
    rand = _rand_from([0.1, 0.9, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0])
    out, m = negative_crop(images, masks, cfg, rand)
    assert m[0].sum() == 0 and torch.equal(m[1:], masks[1:])
    assert torch.equal(out[1:], images[1:])
    # the crop rows 5 … 15 and cols 0 … 10, stretched to 16×16: bilinear reads reach at most half
    # a pixel past the crop's edges (rows ≥ 4.5, cols ≤ 10.5; the margin is 0 px at this size)
    assert out[0].min() >= 45 - 1e-4 and out[0].max() <= 150 + 0.105 + 1e-4
    # output pixel centre k reads input row/col start − ½ + (k + ½)·11/16 (clamped at the border)
    assert out[0, 0, 0, 0].item() == pytest.approx(10 * (5 - 0.5 + 11 / 32), abs=1e-3)
    assert out[0, 0, -1, -1].item() == pytest.approx(150 + (-0.5 + 15.5 * 11 / 16) / 100, abs=1e-3)


def test_negative_crop_never_shows_lesion_pixels_and_is_off_by_default():
    d = _data(16)
    cfg = AugmentConfig(rotate_deg=0, scale=0, translate=0, negative_crop=1.0, negative_crop_min=0.3)
    bright = d.images.clone()
    bright[d.masks > 0] = 5.0  # a value no background pixel has
    out, m = negative_crop(bright, d.masks, cfg, lambda *s: torch.zeros(*s))
    cropped = (d.masks.flatten(1).amax(1) > 0) & (m.flatten(1).amax(1) == 0)
    assert cropped.any()
    assert (out[cropped] < 1.5).all()  # bilinear reads stop at the 3 % margin: no lesion pixel
    same = augment_batch(d.images, d.masks, torch.Generator().manual_seed(0), AugmentConfig())
    again = augment_batch(d.images, d.masks, torch.Generator().manual_seed(0),
                          AugmentConfig(negative_crop=0.0, negative_crop_min=0.9))
    assert torch.equal(same[0], again[0])  # off: the random stream of the default is unchanged
    _, m2 = augment_batch(d.images, d.masks, torch.Generator().manual_seed(0),
                          AugmentConfig(negative_crop=1.0, negative_crop_min=0.3))
    assert m2.flatten(1).amax(1).sum() < d.masks.flatten(1).amax(1).sum()  # some lesions cropped away


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


def test_lesion_paste_by_hand() -> None:
    """Image 0 has a 4×4 lesion at rows 4–7 (value 0.1 on 0.9 background), image 1 none. With
    margin round(0.1·32) = 3 the donor box is rows/cols 1–10; forcing the draws puts it at row
    22, col 22 of image 1 (the last place it fits): its lesion lands at rows 25–28, the ramp is
    1 there, and the host's own mask and pixels outside the box are untouched."""
    from common.data.augment import lesion_paste
    images = torch.full((2, 1, 32, 32), 0.9)
    masks = torch.zeros(2, 1, 32, 32)
    images[0, 0, 4:8, 4:8], masks[0, 0, 4:8, 4:8] = 0.1, 1
    draws = iter([torch.tensor([0.9, 0.0]),  # apply: image 1 only
                  torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])])  # donor 0, far corner
    out, m = lesion_paste(images, masks, AugmentConfig(lesion_paste=0.5), lambda *s: next(draws))
    assert torch.equal(out[0], images[0]) and torch.equal(m[0], masks[0])
    assert m[1, 0].sum() == 16 and m[1, 0, 25:29, 25:29].all()
    assert torch.allclose(out[1, 0, 25:29, 25:29], torch.tensor(0.1))
    assert torch.equal(out[1, 0, :22], images[1, 0, :22]) and torch.equal(out[1, 0, :, :22], images[1, 0, :, :22])
    assert (out[1, 0, 22:, 22:] > 0.1).any() and (out[1, 0, 22:, 22:] < 0.9).any()  # the ramp blends
    assert torch.equal(masks[1], torch.zeros(1, 32, 32))  # inputs not modified in place


def test_lesion_paste_in_augment_batch_adds_lesions_and_keeps_masks_binary() -> None:
    masks = torch.zeros(6, 1, 64, 64)
    masks[::2, :, 10:18, 20:30] = 1  # small lesions in images 0, 2, 4 (the synthetic ones are too big)
    images = 0.8 - 0.6 * masks
    cfg = AugmentConfig(rotate_deg=0, scale=0, translate=0, lesion_paste=1.0)
    _, pasted = augment_batch(images, masks, torch.Generator().manual_seed(1), cfg)
    _, plain = augment_batch(images, masks, torch.Generator().manual_seed(1),
                             AugmentConfig(rotate_deg=0, scale=0, translate=0))
    assert set(pasted.unique().tolist()) <= {0.0, 1.0}
    assert pasted.sum() > plain.sum()


def test_sharpness_blurs_or_sharpens_a_step_edge() -> None:
    """A vertical step 0.3 → 0.7, no geometry. The sharpness draw comes after every other draw, so
    with the same seed the runs with and without it differ only by that step: far from the edge
    nothing changes (the blur of a flat region is itself); on the dark pixel next to the edge
    some images get brighter (blurred towards the bright side), some darker (overshoot)."""
    from common.data.augment import _blur1
    step = torch.full((1, 1, 16, 16), 0.3)
    step[..., 8:] = 0.7
    blurred = _blur1(step)
    assert torch.allclose(blurred[..., :, :5], step[..., :, :5]) and blurred[0, 0, 0, 7] > 0.3
    images, masks = step.repeat(64, 1, 1, 1), torch.zeros(64, 1, 16, 16)
    cfg = dict(rotate_deg=0, scale=0, translate=0)
    sharp, _ = augment_batch(images, masks, torch.Generator().manual_seed(0),
                             AugmentConfig(**cfg, sharpness=1.0))
    plain, _ = augment_batch(images, masks, torch.Generator().manual_seed(0), AugmentConfig(**cfg))
    flip = plain[:, 0, 4, 0] > plain[:, 0, 4, -1]  # put the dark side on the left again
    sharp = torch.where(flip[:, None, None, None], sharp.flip(-1), sharp)
    plain = torch.where(flip[:, None, None, None], plain.flip(-1), plain)
    assert torch.allclose(sharp[..., :, :4], plain[..., :, :4], atol=1e-6)
    ratio = sharp[:, 0, 4, 7] / plain[:, 0, 4, 7]
    assert ratio.max() > 1.1 and ratio.min() < 0.9


def test_gin_keeps_range_polarity_and_masks_and_is_off_by_default() -> None:
    """A dark disc on a bright ramp. GIN at p = 1 changes the texture but keeps each image's
    [min, max], correlates positively with the input (a hypoechoic lesion stays darker than its
    surroundings) and never touches the masks; at p = 0 (the default) no draw happens."""
    from common.data.augment import gin
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = ((ys - 16) ** 2 + (xs - 16) ** 2 < 36).float()
    images = (0.4 + 0.5 * xs / 31 - 0.35 * disc).expand(16, 1, 32, 32).clone()
    g = torch.Generator().manual_seed(0)
    out = gin(images, 1.0, lambda *s: torch.rand(*s, generator=g),
              lambda *s: torch.randn(*s, generator=g))
    assert not torch.allclose(out, images)
    assert (out.amin((2, 3)) >= images.amin((2, 3)) - 1e-5).all()
    assert (out.amax((2, 3)) <= images.amax((2, 3)) + 1e-5).all()
    inside = (out * disc).sum((2, 3)) / disc.sum()
    outside = (out * (1 - disc)).sum((2, 3)) / (1 - disc).sum()
    centred_in = images - images.mean((2, 3), keepdim=True)
    centred_out = out - out.mean((2, 3), keepdim=True)
    assert ((centred_in * centred_out).sum((2, 3)) > 0).all()
    assert (inside < outside).float().mean() >= 0.75  # polarity mostly survives the remap
    cfg = dict(rotate_deg=0, scale=0, translate=0)
    masks = disc.expand(16, 1, 32, 32).clone()
    a, ma = augment_batch(images, masks, torch.Generator().manual_seed(1), AugmentConfig(**cfg, gin=1.0))
    b, mb = augment_batch(images, masks, torch.Generator().manual_seed(1), AugmentConfig(**cfg))
    assert torch.equal(ma, mb) and not torch.allclose(a, b)
    g0 = torch.Generator().manual_seed(2)
    assert torch.equal(gin(images, 0.0, lambda *s: torch.rand(*s, generator=g0),
                           lambda *s: torch.randn(*s, generator=g0)), images)


def test_shrink_batch_by_hand_keeps_masks_binary_and_area_fractions() -> None:
    """160 px × 0.8 → 128 px (a multiple of 32); a centred 80-px square (1/4 of the image) stays
    1/4 to a row of pixels, the mask stays 0/1, a constant image stays constant."""
    raw = torch.full((2, 1, 160, 160), 0.25)
    mask = torch.zeros(2, 1, 160, 160)
    mask[:, :, 40:120, 40:120] = 1
    small_raw, small_mask = shrink_batch(raw, mask, 0.8)
    assert small_raw.shape == small_mask.shape == (2, 1, 128, 128)
    assert torch.allclose(small_raw, torch.full_like(small_raw, 0.25))
    assert set(small_mask.unique().tolist()) == {0.0, 1.0}
    assert abs(float(small_mask.mean()) - 0.25) < 2 / 128
    # the side is rounded to a multiple of 32 and never below 32; no shrink → the same tensors
    assert shrink_batch(raw, mask, 0.5)[0].shape[-1] == 96  # 80 → 96
    assert shrink_batch(raw[..., :64, :64], mask[..., :64, :64], 0.1)[0].shape[-1] == 32
    same = shrink_batch(raw, mask, 0.95)  # 152 → 160: nothing to do
    assert same[0] is raw and same[1] is mask


def test_shrink_batch_keeps_the_lesion_where_it_was() -> None:
    """A lesion in the upper-left quarter is still there, at the scaled place, after shrinking."""
    mask = torch.zeros(1, 1, 128, 128)
    mask[:, :, 16:48, 16:48] = 1
    _, small = shrink_batch(torch.rand(1, 1, 128, 128), mask, 0.5)
    rows, cols = torch.nonzero(small[0, 0], as_tuple=True)
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (8, 23, 8, 23)
