"""Run-wide schedules: the learning rate and the consistency weight λ as functions of the run's
global epoch progress.

A federated run calls ``train_local`` once per round; a centralised run calls it once. Counting
both schedules in epochs of the whole run (global epoch = (round − 1) × local epochs + local
epoch, plus the fraction of the current epoch) makes a recipe mean the same thing in all three
settings: the warm-ups happen once, at the start of the run, and the cosine reaches its end at
the run's last step, not at the end of every round. ``RunPosition`` says where one call sits.

Each training step covers progress [start, end) of the run, end = start + 1/steps-per-epoch.
Ramps (LR warm-up, λ ramp) are read at ``end``, so the first step of a warm-up already moves;
the cosine decay is read at ``start``, so the first step after warm-up runs at the full rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import TrainConfig

SCHEDULES: tuple[str, ...] = ("cosine", "constant")


@dataclass(frozen=True)
class RunPosition:
    """Where one ``train_local`` call sits in its run, in epochs: it starts after
    ``epoch_offset`` epochs of the run; the run has ``total_epochs`` epochs in all (None: this
    call is the whole run, i.e. offset + the call's own epochs)."""

    epoch_offset: int = 0  # epochs of the run before this call
    total_epochs: int | None = None  # epochs of the whole run; None: ends with this call

    def __post_init__(self) -> None:
        if self.epoch_offset < 0:
            raise ValueError(f"RunPosition: epoch_offset must be >= 0, got {self.epoch_offset}")
        if self.total_epochs is not None and self.total_epochs <= self.epoch_offset:
            raise ValueError(f"RunPosition: total_epochs ({self.total_epochs}) must exceed "
                             f"epoch_offset ({self.epoch_offset})")

    @classmethod
    def for_round(cls, server_round: int, rounds: int, local_epochs: int) -> "RunPosition":
        """Round ``server_round`` (1-based) of ``rounds``, each of ``local_epochs`` epochs."""
        if local_epochs < 1 or rounds < 1 or not 1 <= server_round <= rounds:
            raise ValueError(f"round {server_round} is not in 1..{rounds} (local epochs "
                             f"{local_epochs})")
        return cls((server_round - 1) * local_epochs, rounds * local_epochs)

    def total(self, epochs: int) -> int:
        """Epochs of the whole run for a call of ``epochs`` epochs (checked to fit in it)."""
        total = self.epoch_offset + epochs if self.total_epochs is None else self.total_epochs
        if self.epoch_offset + epochs > total:
            raise ValueError(f"a call of {epochs} epochs after {self.epoch_offset} overruns the "
                             f"run's {total} epochs")
        return total


def ramp(progress: float, start: float, length: float) -> float:
    """0 until ``progress`` passes ``start``, then linear to 1 over ``length`` epochs (a step
    to 1 when ``length`` is 0)."""
    if progress <= start:
        return 0.0
    if length <= 0:
        return 1.0
    return min(1.0, (progress - start) / length)


def lr_factor(cfg: TrainConfig, start: float, end: float, total: float) -> float:
    """Multiplier of every group's base lr for the step covering run progress [start, end) of
    ``total`` epochs: linear warm-up over ``cfg.warmup_epochs`` (read at ``end``), then constant
    or a cosine from 1 at the warm-up's end to 0 at ``total`` (read at ``start``)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule: unknown {cfg.schedule!r} ({' | '.join(SCHEDULES)})")
    warm = cfg.warmup_epochs
    factor = ramp(end, 0.0, warm) if warm > 0 else 1.0
    if cfg.schedule == "cosine" and start > warm:  # start < total, so total − warm > 0 here
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, (start - warm) / (total - warm))))
    return factor
