"""Learning-rate schedules: linear warm-up, then constant or cosine decay.

Federated training calls ``train_local`` once per round. With ``span`` a call runs only its
slice of one schedule laid over the whole run (``federation.lr_schedule: global``), so rounds ×
local epochs see the same learning rates as that many centralised epochs: warm-up in the first
round only, and a cosine that reaches 0 at the last round instead of at the end of every round.
"""
from __future__ import annotations

import math

import torch

from common.config import TrainConfig

#: The whole schedule in one call (centralised training, or ``federation.lr_schedule: round``).
FULL_SPAN: tuple[float, float] = (0.0, 1.0)


def round_span(server_round: int, rounds: int) -> tuple[float, float]:
    """The fraction of the run that round ``server_round`` (1-based) of ``rounds`` covers."""
    if rounds < 1 or not 1 <= server_round <= rounds:
        raise ValueError(f"round {server_round} is not in 1..{rounds}")
    return (server_round - 1) / rounds, server_round / rounds


def lr_schedule(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total: int, span: tuple[float, float] = FULL_SPAN
) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier of every group's lr at optimiser step k of ``total``.

    Full span: linear warm-up over ``cfg.warmup_steps``, then constant or cosine from 1 to 0 at
    ``total``. A span (a, b) ≠ (0, 1) places the ``total`` steps at progress a … b of a run-wide
    cosine (the factor at step k is ½(1 + cos π(a + (b − a)·k/total))); the warm-up applies only
    to the span that starts the run (a = 0)."""
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"train.schedule: unknown {cfg.schedule!r} (cosine | constant)")
    start, end = span
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"schedule span must satisfy 0 <= start < end <= 1, got {span}")
    warm = max(cfg.warmup_steps, 0) if start == 0.0 else 0
    total = max(total, 1)

    def full(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        width = max(total - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, width) / width))

    def sliced(step: int) -> float:
        ramp = (step + 1) / warm if step < warm else 1.0
        if cfg.schedule == "constant":
            return ramp
        progress = start + (end - start) * min(step, total) / total
        return ramp * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, full if span == FULL_SPAN else sliced)
