"""common/tta.py: the shift itself, and the averaging of the views worked out by hand for a model
that only looks at where a pixel is (the "near-field bias" the depth shifts are for)."""
import pytest
import torch
from torch import nn

from common.data.tensors import normalise
from common.tta import shift_up, view_probs


class TopHalf(nn.Module):
    """Mask logit +20 on the top half of the image, −20 below; malignancy logit = image mean."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.shape[-2]
        rows = torch.arange(h).view(1, 1, h, 1).expand(x.shape[0], 1, h, x.shape[-1])
        return torch.where(rows < h // 2, 20.0, -20.0), x.mean(dim=(1, 2, 3))


class LeftHalf(nn.Module):
    """Mask logit +20 on the left half (columns 0-2 of 6), −20 on the right."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cols = torch.arange(x.shape[-1]) < x.shape[-1] // 2
        return torch.where(cols, 20.0, -20.0).expand(x.shape[0], 1, *x.shape[-2:]), x.new_zeros(x.shape[0])


def probs_of(model: nn.Module):
    def probs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, c = model(x)
        return torch.sigmoid(m), torch.sigmoid(c)
    return probs


def test_shift_up_moves_rows_fills_the_far_field_dark_and_rescores():
    raw = torch.rand(2, 1, 8, 5) + 0.5
    x = normalise(raw)
    out = shift_up(x, 3)
    filled = torch.cat([raw[..., 3:, :], raw.amin(dim=(-2, -1), keepdim=True).expand(2, 1, 3, 5)], -2)
    torch.testing.assert_close(out, normalise(filled), atol=1e-5, rtol=0)
    assert shift_up(x, 0) is x
    with pytest.raises(ValueError, match="8 high"):
        shift_up(x, 8)


def test_each_row_averages_the_views_that_saw_it():
    x = normalise(torch.rand(3, 1, 8, 6))
    mask, cls = view_probs(probs_of(TopHalf()), x, flip=False, shifts=(0.25, 0.5))
    # rows 0-3: seen unshifted only or by views that all call them top half -> 1;
    # rows 4-5: shifts 0/2/4 -> top half in 2 of 3; rows 6-7: only in the shift by 4 -> 1/3
    expected = torch.tensor([1, 1, 1, 1, 2 / 3, 2 / 3, 1 / 3, 1 / 3]).view(1, 1, 8, 1).expand(3, 1, 8, 6)
    torch.testing.assert_close(mask, expected, atol=1e-4, rtol=0)
    # malignancy comes from the unshifted view alone
    torch.testing.assert_close(cls, torch.sigmoid(x.mean(dim=(1, 2, 3))), atol=1e-6, rtol=0)


def test_the_mirror_is_mapped_back_and_shifted_views_are_not_mirrored():
    x = normalise(torch.rand(2, 1, 8, 6))
    mask, cls = view_probs(probs_of(LeftHalf()), x, flip=True, shifts=(0.5,))
    assert mask.shape == (2, 1, 8, 6) and cls.shape == (2,)
    # rows 0-3: the image says left, its mirror (mapped back) right -> 1/2 each side;
    # rows 4-7 also seen shifted (not mirrored), which says left -> 2/3 left, 1/3 right
    left = torch.tensor([1.0, 1, 1, 0, 0, 0])
    expected = torch.cat([(0.5 * torch.ones(4, 1)).expand(4, 6),
                          (left + 1) / 3 * torch.ones(4, 1)]).expand(2, 1, 8, 6)
    torch.testing.assert_close(mask, expected, atol=1e-4, rtol=0)


def test_no_view_is_the_plain_probabilities():
    x = normalise(torch.rand(2, 1, 8, 6))
    mask, cls = view_probs(probs_of(TopHalf()), x, flip=False, shifts=())
    m, c = TopHalf()(x)
    assert torch.equal(mask, torch.sigmoid(m)) and torch.equal(cls, torch.sigmoid(c))


@pytest.mark.parametrize("shifts", [(0.0,), (1.0,), (-0.1, 0.2)])
def test_shifts_outside_zero_one_are_refused(shifts):
    with pytest.raises(ValueError, match="shifts must lie in"):
        view_probs(probs_of(TopHalf()), normalise(torch.rand(1, 1, 8, 6)), flip=False, shifts=shifts)
