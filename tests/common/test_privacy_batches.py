"""Augmentation multiplicity and virtual steps (common/dp_batches.py through PrivacySession)."""
from __future__ import annotations

import pytest
import torch

from common.config import (
    PAPER_FEATURES,
    AugmentConfig,
    ConfigError,
    LossConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
)
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.dp_batches import mean_over_copies, repeat_rows, split_indices
from common.model import build_model
from common.privacy import PrivacySession
from common.train import train_local

SIZE, N, B = 32, 24, 8
TINY = ModelConfig(base_channels=4, depth=2, num_groups=2, dropout=0.0)  # no dropout: copies see the same net


@pytest.fixture(scope="module")
def data():
    return to_tensors(make_centre("SynPL", N, size=SIZE, seed=0), SIZE)


def run(data, *, augmult: int = 1, max_physical_batch: int | None = None, batch_size: int = B,
        augment: AugmentConfig | bool = False, noise: float = 1.0):
    torch.manual_seed(0)
    model = build_model(TINY, PAPER_FEATURES)
    cfg = PrivacyConfig(enabled=True, target_epsilon=None, noise_multiplier=noise, target_delta=1e-3,
                        planned_epochs=1, augmult=augmult, max_physical_batch=max_physical_batch)
    sess = PrivacySession(cfg, num_examples=N, batch_size=batch_size, epochs=1, site="A")
    seen: list[int] = []
    forward = model.forward
    model.forward = lambda x: (seen.append(int(x.shape[0])), forward(x))[1]  # rows per pass
    res = train_local(model, data, TrainConfig(epochs=1, batch_size=batch_size, lr=0.05, optimizer="sgd",
                                               progress=False, device="cpu", num_threads=1, seed=3),
                      LossConfig(pos_weight=1.0), privacy=sess, augment=augment)
    sess.close()
    del model.forward
    return model.state_dict(), sess, res, seen


def test_mean_over_copies_and_repeat_rows_are_hand_computable() -> None:
    gs = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [20.0, 0.0]])  # 2 images × K=2 rows
    assert torch.equal(mean_over_copies(gs, 2), torch.tensor([[2.0, 3.0], [15.0, 0.0]]))
    with pytest.raises(RuntimeError, match="multiple of K"):
        mean_over_copies(gs[:3], 2)
    batch = {"mask": torch.tensor([[0.0], [1.0]]), "index": torch.tensor([7, 9]), "name": "x"}
    out = repeat_rows(batch, 3)
    assert out["index"].tolist() == [7, 7, 7, 9, 9, 9] and out["name"] == "x"
    assert [len(c) for c in split_indices(torch.arange(10), 4)] == [4, 3, 3]
    assert [len(c) for c in split_indices(torch.arange(4), 4)] == [4]


def test_k_identical_copies_give_the_k1_update(data) -> None:
    # no augmentation: the K copies of an image are identical, so the mean of their per-sample
    # gradients is that image's gradient, and the noised update is the K = 1 update
    one, s1, r1, seen1 = run(data, augmult=1)
    three, s3, r3, seen3 = run(data, augmult=3)
    assert [n * 3 for n in seen1] == seen3  # each pass held every image three times
    assert s1.steps == s3.steps == 3 and s1.epsilon() == s3.epsilon()  # the same accounting
    for k in one:
        torch.testing.assert_close(three[k], one[k], rtol=1e-4, atol=1e-5)
    assert r3.loss == pytest.approx(r1.loss, rel=1e-4)


def test_augmented_copies_change_the_update(data) -> None:
    aug = AugmentConfig()
    one, *_ = run(data, augmult=1, augment=aug)
    two, _, _, seen = run(data, augmult=2, augment=aug)
    assert all(n % 2 == 0 for n in seen)
    assert any(not torch.allclose(one[k], two[k]) for k in one if one[k].is_floating_point())


def test_virtual_steps_bound_the_pass_and_take_the_same_step(data) -> None:
    # an expected batch of 24 (q = 1: every image every step) in passes of at most 5 rows is one
    # DP step per logical batch, with the update of the unsplit batch
    whole, sw, _, seen_w = run(data, batch_size=24)
    split, ss, _, seen_s = run(data, batch_size=24, max_physical_batch=5)
    assert seen_w == [24] and seen_s == [5, 5, 5, 5, 4]
    assert sw.steps == ss.steps == 1 and sw.history == ss.history
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-5)


def test_virtual_steps_with_augmult_count_rows(data) -> None:
    _, sess, _, seen = run(data, batch_size=24, augmult=2, max_physical_batch=10, augment=AugmentConfig())
    assert max(seen) <= 10 and sum(seen) == 48 and sess.steps == 1


def test_bad_batch_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="privacy.augmult"):
        PrivacyConfig(augmult=0)
    with pytest.raises(ConfigError, match="max_physical_batch"):
        PrivacyConfig(augmult=4, max_physical_batch=3)
