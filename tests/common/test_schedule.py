"""Learning-rate schedules: the full schedule, and the per-round slices of a run-wide one."""
from __future__ import annotations

import math

import pytest
import torch

from common.config import TrainConfig
from common.schedule import lr_schedule, round_span


def lrs(cfg: TrainConfig, total: int, span: tuple[float, float] = (0.0, 1.0)) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(opt, cfg, total, span)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_full_schedule_warms_up_then_follows_a_cosine_to_zero():
    got = lrs(TrainConfig(schedule="cosine", warmup_steps=2), total=10)
    assert got[0] == pytest.approx(0.5) and got[1] == pytest.approx(1.0)
    assert got[2] == pytest.approx(1.0) and got[6] == pytest.approx(0.5)  # half-way cosine
    assert got == sorted(got[:2]) + sorted(got[2:], reverse=True)
    assert lrs(TrainConfig(schedule="constant", warmup_steps=0), total=4) == [1.0] * 4


def test_round_slices_lay_one_cosine_over_the_run():
    cfg = TrainConfig(schedule="cosine", warmup_steps=0)
    rounds, steps = 4, 5
    run = [lr for r in range(1, rounds + 1) for lr in lrs(cfg, steps, round_span(r, rounds))]
    expected = [0.5 * (1 + math.cos(math.pi * k / (rounds * steps))) for k in range(rounds * steps)]
    assert run == pytest.approx(expected)
    # each round starts where the previous one stopped, not at the top of its own cosine
    assert run[steps] < run[steps - 1] < 1.0


def test_warm_up_only_in_the_first_round():
    cfg = TrainConfig(schedule="cosine", warmup_steps=2)
    first, second = lrs(cfg, 4, round_span(1, 2)), lrs(cfg, 4, round_span(2, 2))
    assert first[0] == pytest.approx(0.5 * 0.5 * (1 + math.cos(0.0)))
    assert second[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))  # no ramp: half-way


@pytest.mark.parametrize("args", [(0, 3), (4, 3), (1, 0)])
def test_round_span_rejects_rounds_outside_the_run(args):
    with pytest.raises(ValueError, match="not in"):
        round_span(*args)


def test_bad_span_and_schedule_raise():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="span"):
        lr_schedule(opt, TrainConfig(), 10, (0.5, 0.5))
    with pytest.raises(ValueError, match="schedule"):
        lr_schedule(opt, TrainConfig(schedule="step"), 10)
