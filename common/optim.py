"""The optimiser of local training: AdamW or SGD with an optional encoder learning-rate group,
torch.optim's classes without their TorchDynamo guards, and FedProx's proximal gradient."""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from common.config import TrainConfig
from common.dp_trainable import ENCODER_PREFIX


def _unwrapped(cls: type, name: str) -> Callable | None:
    """The innermost undecorated ``cls.name`` (torch's decorators use ``functools.wraps``;
    ``step`` also carries the profiling hook the Optimizer puts on every class it builds),
    or None when it is not decorated."""
    method = getattr(cls, name, None)
    inner = inspect.unwrap(method) if method is not None else None
    return inner if inner is not method else None


@functools.cache
def eager(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` without torch.optim's TorchDynamo guards, or ``cls`` itself if torch changed.

    ``add_param_group``/``zero_grad`` (``torch._disable_dynamo``) and ``step``
    (``_use_grad_for_differentiable``) import ``torch._dynamo`` on first use: 1.5-2.5 s on a
    busy CPU, paid by every fresh process that trains (a simulated site's first
    round, each deployed round). Nothing here is compiled, so the guards do nothing; the update
    arithmetic is torch's own (``benchmarks/sim_overhead.py`` measures the first round)."""
    methods = {n: _unwrapped(cls, n) for n in ("add_param_group", "zero_grad", "step")}
    if any(m is None for m in methods.values()):
        return cls
    step = methods["step"]

    def eager_step(self: torch.optim.Optimizer, closure: Callable[[], float] | None = None) -> float | None:
        with torch.no_grad():  # what the removed wrapper set (differentiable=False)
            return step(self, closure)

    return type(f"Eager{cls.__name__}", (cls,), {**methods, "step": eager_step,
                                                  "__doc__": eager.__doc__})


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; with ``encoder_lr_scale`` ≠ 1 the encoder's parameters ("backbone.encoder.*",
    the part that may hold ImageNet weights in lite0/effb1_attention) form a second group at
    lr × scale, so fine-tuning keeps the pretrained features while the freshly initialised decoder
    and heads learn fast (measured: +0.04 external Dice on the paper protocol)."""
    groups: list[dict[str, Any]] = [{"params": [p for _, p in named]}]
    if cfg.encoder_lr_scale != 1.0:
        enc = [p for n, p in named if n.startswith(ENCODER_PREFIX)]
        if not enc:
            raise ValueError(f"train.encoder_lr_scale={cfg.encoder_lr_scale}: the model has no "
                             f"'{ENCODER_PREFIX}*' parameters")
        groups = [{"params": [p for n, p in named if not n.startswith(ENCODER_PREFIX)]},
                  {"params": enc, "lr": cfg.lr * cfg.encoder_lr_scale}]
    if cfg.optimizer == "adamw":
        return eager(torch.optim.AdamW)(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return eager(torch.optim.SGD)(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer: unknown {cfg.optimizer!r} (adamw | sgd)")


def proximal(
    params: list[tuple[nn.Parameter, Tensor]], mu: float
) -> tuple[Callable[[], None], Callable[[], float]]:
    """(add μ·(w − w_g) to every .grad, value (μ/2)·Σ‖w − w_g‖²)."""

    def add_grad() -> None:
        with torch.no_grad():
            for p, g in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p - g, alpha=mu)

    def value() -> float:
        with torch.no_grad():
            return 0.5 * mu * float(sum(((p - g) ** 2).sum() for p, g in params))

    return add_grad, value
