"""Exponential moving average of the trainable parameters (Polyak averaging).

Why: the average smooths the epoch-to-epoch oscillation of a noisy small-batch run, so the
validation curve that picks the epoch is smoother too. (Measured on the external validation,
run E1 of docs/external_validation.md: a tie with the last iterate, not a gain.)
``train_local`` keeps the average with ``train.ema_decay`` > 0, evaluates it at each epoch end
and leaves it in the model at the end.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


class ParameterEma:
    """avg ← d·avg + (1 − d)·w after each step, d = min(decay, (1 + t)/(10 + t)) at step t, so the
    first steps are not dominated by the initial weights."""

    def __init__(self, named: Sequence[tuple[str, nn.Parameter]], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: need 0 < decay < 1, got {decay}")
        self.decay, self.steps = decay, 0
        self.params = [p for _, p in named]
        self.avg = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], 1.0 - d)
        self.steps += 1

    @torch.no_grad()
    def _swap(self) -> None:
        for p, a in zip(self.params, self.avg):
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The model holds the average inside the block and its own weights again after it."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, a in zip(self.params, self.avg):
            p.copy_(a)
