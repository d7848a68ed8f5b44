"""common.tail_average: the mean of the last k global models, by hand."""
from __future__ import annotations

import pytest
import torch

from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import ConfigError
from common.fedconfig import FederationConfig, SecAggConfig
from common.tail_average import TailAverage


def _state(w: float, count: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), w), "count": torch.tensor(count, dtype=torch.long)}


def test_mean_of_the_window_only_in_the_models_dtypes() -> None:
    tail = TailAverage(k=2, rounds=4)  # rounds 3 and 4
    for rnd, w in ((1, 100.0), (2, 100.0), (3, 1.0), (4, 2.0)):
        tail.add(rnd, _state(w, rnd))
    out = tail.result(_state(2.0, 4))
    assert tail.n == 2 and tail.first == 3
    torch.testing.assert_close(out["w"], torch.full((2,), 1.5))
    assert out["count"].dtype == torch.long and int(out["count"]) == 4  # 3.5 rounds to even


def test_k_one_and_an_empty_window_hand_out_the_last_model() -> None:
    last = _state(7.0, 1)
    one = TailAverage(k=1, rounds=3)
    for rnd in (1, 2, 3):
        one.add(rnd, _state(float(rnd), rnd))
    assert one.n == 0 and one.result(last) == last
    early = TailAverage(k=2, rounds=5)
    early.add(1, _state(1.0, 1))
    assert early.result(last) == last


def test_k_beyond_the_run_averages_every_round() -> None:
    tail = TailAverage(k=10, rounds=3)
    for rnd in (1, 2, 3):
        tail.add(rnd, _state(float(rnd), rnd))
    torch.testing.assert_close(tail.result(_state(3.0, 3))["w"], torch.full((2,), 2.0))


def test_state_survives_a_checkpoint_and_a_moved_window_is_refused(tmp_path) -> None:
    tail = TailAverage(k=3, rounds=4)
    tail.add(2, _state(1.0, 2))
    tail.add(3, _state(4.0, 3))
    path = save_checkpoint(tmp_path / "ck.pt", {}, {}, tail_state=tail.state_dict())
    saved = load_checkpoint(path)["extra"]["tail_state"]
    again = TailAverage(k=3, rounds=4)
    again.load_state_dict(saved)
    again.add(4, _state(7.0, 4))
    torch.testing.assert_close(again.result(_state(7.0, 4))["w"], torch.full((2,), 4.0))
    with pytest.raises(ConfigError, match="began averaging at round 2"):
        TailAverage(k=3, rounds=6).load_state_dict(saved, "ck.pt")
    TailAverage(k=3, rounds=6).load_state_dict({})  # nothing counted yet: any window


def test_config_refuses_zero_and_secagg() -> None:
    with pytest.raises(ConfigError, match="average_last"):
        FederationConfig(average_last=0)
    with pytest.raises(ConfigError, match="average_last.*secagg"):
        FederationConfig(average_last=3, secagg=SecAggConfig(enabled=True))
