"""Run-wide schedules: RunPosition, the ramp, and the LR factor, by hand."""
from __future__ import annotations

import math

import pytest

from common.config import ConfigError, TrainConfig
from common.schedule import RunPosition, lr_factor, ramp


def test_for_round_places_each_round_after_the_previous_ones():
    assert RunPosition.for_round(1, 4, 3) == RunPosition(0, 12)
    assert RunPosition.for_round(3, 4, 3) == RunPosition(6, 12)
    assert RunPosition().total(5) == 5  # default: the call is the whole run
    assert RunPosition(6, 12).total(3) == 12


@pytest.mark.parametrize("args", [(0, 3, 1), (4, 3, 1), (1, 0, 1), (1, 3, 0)])
def test_for_round_rejects_rounds_outside_the_run(args):
    with pytest.raises(ValueError, match="not in"):
        RunPosition.for_round(*args)


def test_a_position_that_cannot_hold_its_call_is_refused():
    with pytest.raises(ValueError, match="overruns"):
        RunPosition(10, 12).total(3)
    with pytest.raises(ValueError, match="exceed"):
        RunPosition(4, 4)
    with pytest.raises(ValueError, match="epoch_offset"):
        RunPosition(-1)


def test_ramp_by_hand():
    assert [ramp(p, 1.0, 2.0) for p in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)] == [0, 0, 0.25, 0.5, 1, 1]
    assert [ramp(p, 1.0, 0.0) for p in (1.0, 1.01)] == [0.0, 1.0]  # no ramp: a step after the warm-up


def test_lr_warms_up_then_follows_one_cosine_to_the_runs_end():
    """Half-epoch steps, 1 warm-up epoch, a 4-epoch run: the warm-up is read at each step's end,
    the cosine (1 at epoch 1, 0 at epoch 4) at its start."""
    cfg = TrainConfig(schedule="cosine", warmup_epochs=1.0)
    got = [lr_factor(cfg, k / 2, (k + 1) / 2, 4) for k in range(8)]
    cos = [0.5 * (1 + math.cos(math.pi * (s - 1) / 3)) for s in (1.5, 2.0, 2.5, 3.0, 3.5)]
    assert got == pytest.approx([0.5, 1.0, 1.0, *cos])
    flat = TrainConfig(schedule="constant", warmup_epochs=2.0)
    assert [lr_factor(flat, k, k + 1, 4) for k in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(TrainConfig(), 0.0, 0.25, 4) == 1.0  # no warm-up: the first step at full rate


def test_bad_schedule_and_warm_ups_are_refused():
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(TrainConfig(schedule="step"), 0.0, 1.0, 2)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        TrainConfig(warmup_epochs=-1.0)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        TrainConfig(warmup_epochs=float("nan"))
