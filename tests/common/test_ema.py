"""Moving average of the weights: hand-computed updates, swap in and out, and train_local's use."""
import pytest
import torch
from torch import nn

from common.config import PAPER_FEATURES, LossConfig, ModelConfig, TrainConfig
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.ema import ParameterEma
from common.model import build_model
from common.train import train_local


def test_average_by_hand_and_swap():
    p = nn.Parameter(torch.tensor([0.0]))
    ema = ParameterEma([("p", p)], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()  # step 0: d = min(0.9, 1/10) = 0.1 → avg = 0.1·0 + 0.9·1
    assert ema.avg[0].item() == pytest.approx(0.9)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()  # step 1: d = 2/11
    assert ema.avg[0].item() == pytest.approx(2 / 11 * 0.9 + 9 / 11 * 2.0)
    expected = ema.avg[0].item()
    with ema.swapped():
        assert p.item() == pytest.approx(expected)
    assert p.item() == 2.0  # the model's own weights come back
    ema.copy_to_model()
    assert p.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="ema_decay"):
        ParameterEma([("p", p)], decay=1.0)


def test_train_local_evaluates_and_keeps_the_average():
    data = to_tensors(make_centre("SynPL", 16, size=32, seed=0), 32)
    cfg = dict(epochs=2, batch_size=8, lr=3e-3, progress=False, device="cpu", seed=0)
    tiny = ModelConfig(depth=3, base_channels=8)
    models, seen = [], []
    for decay in (0.0, 0.9):
        torch.manual_seed(0)
        model = build_model(tiny, PAPER_FEATURES)
        on_end = (lambda e, r, m=model: seen.append({k: v.clone() for k, v in m.state_dict().items()})) \
            if decay else None
        train_local(model, data, TrainConfig(ema_decay=decay, **cfg), LossConfig(), augment=False,
                    on_epoch_end=on_end)
        models.append(model.state_dict())
    plain, averaged = models
    assert not all(torch.equal(plain[k], averaged[k]) for k in plain)  # the average is kept, not the last step
    assert all(torch.equal(seen[-1][k], averaged[k]) for k in averaged)  # and it is what the epoch end saw
