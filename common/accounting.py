"""DP accounting helpers: Poisson sample rate, ε of an accountant history, group/patient bounds,
and the once-per-site noise plan (σ from a target ε).

Pure functions of numbers and a ``PrivacyConfig`` (Opacus' accountants are imported lazily inside
them, torch not at all), kept apart from the DP-SGD session in ``common.privacy`` so the budget
arithmetic can be read and tested on its own. ``common.privacy`` re-exports the public names.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterable

from common.config import ACCOUNTANTS, ConfigError, PrivacyConfig



def poisson_rate(num_examples: int, batch_size: int) -> tuple[float, int]:
    """(sample rate q, steps per epoch) as Opacus' DPDataLoader derives them from a loader of
    ⌈N/B⌉ batches: q = 1/⌈N/B⌉, steps = int(1/q) (which float rounding can make ⌈N/B⌉ − 1)."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need num_examples >= 1 and batch_size >= 1, got {num_examples}, {batch_size}")
    q = 1.0 / math.ceil(num_examples / batch_size)
    return q, int(1 / q)


def _accountant(mechanism: str, history: Iterable[Iterable[float]] = ()) -> Any:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=mechanism)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def epsilon_of(history: Iterable[Iterable[float]], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` of a history [(σ, q, steps), ...]; 0 for an empty history, inf when σ = 0."""
    hist = tuple((float(s), float(q), int(n)) for s, q, n in history)
    if not hist or sum(h[2] for h in hist) == 0:
        return 0.0
    if any(h[0] <= 0 for h in hist):
        return math.inf
    return _cached_epsilon(hist, float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _cached_epsilon(hist: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    # Opacus' RDP bound over fractional orders costs ~0.1-1 s per call; sessions ask repeatedly
    return float(_accountant(accountant, hist).get_epsilon(delta=delta))


def group_epsilon(epsilon: float, delta: float, group_size: int) -> tuple[float, float]:
    """Group privacy: (ε, δ)-DP for one image gives (kε, k·e^{(k−1)ε}·δ)-DP for k images of one
    patient (Dwork & Roth 2014, Thm 2.2 with the standard δ extension). Loose, but valid; it
    grows fast, e.g. ε = 3, k = 4 → (12, 4·e⁹·δ ≈ 3.2e4·δ)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    k = int(group_size)
    return k * epsilon, k * math.exp((k - 1) * epsilon) * delta


def per_patient_bound(epsilon: float, delta: float, patient_ids: Iterable[Any]) -> tuple[float, float]:
    """Patient-level (ε, δ) from the image-level one, with k = most images of any one patient
    in the training set (e.g. ``TensorData``'s case → patient mapping); see ``group_epsilon``."""
    counts: dict[Any, int] = {}
    for pid in patient_ids:
        counts[pid] = counts.get(pid, 0) + 1
    return group_epsilon(epsilon, delta, max(counts.values(), default=1))


def validate(cfg: PrivacyConfig, where: str = "privacy") -> None:
    """Reject configurations that cannot give a stated guarantee (errors name ``where``)."""
    if cfg.accountant not in ACCOUNTANTS:
        raise ConfigError(f"{where}.accountant: {cfg.accountant!r} not one of {ACCOUNTANTS}")
    if not 0.0 < cfg.target_delta < 1.0:
        raise ConfigError(f"{where}.target_delta: must be in (0, 1), got {cfg.target_delta}")
    if not cfg.max_grad_norm > 0:
        raise ConfigError(f"{where}.max_grad_norm: must be > 0, got {cfg.max_grad_norm}")
    if cfg.noise_multiplier is None and cfg.target_epsilon is None:
        raise ConfigError(f"{where}: give target_epsilon (with planned_epochs) or noise_multiplier")
    if cfg.noise_multiplier is not None and cfg.noise_multiplier < 0:
        raise ConfigError(f"{where}.noise_multiplier: must be >= 0, got {cfg.noise_multiplier}")
    if cfg.target_epsilon is not None and not cfg.target_epsilon > 0:
        raise ConfigError(f"{where}.target_epsilon: must be > 0, got {cfg.target_epsilon}")
    if cfg.planned_epochs < 1:
        raise ConfigError(f"{where}.planned_epochs: must be >= 1, got {cfg.planned_epochs}")


def plan_noise_multiplier(cfg: PrivacyConfig, sample_rate: float, steps_per_epoch: int) -> float:
    """σ for the whole plan: ``cfg.noise_multiplier`` if given, else the smallest σ (to 0.01 in ε)
    with ε(σ, q, planned_epochs·steps_per_epoch) ≤ target_epsilon."""
    validate(cfg)
    if cfg.noise_multiplier is not None:
        return float(cfg.noise_multiplier)
    return _planned_sigma(float(cfg.target_epsilon), float(cfg.target_delta), float(sample_rate),
                          cfg.planned_epochs * steps_per_epoch, cfg.accountant)


@functools.lru_cache(maxsize=64)
def _planned_sigma(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                      steps=steps, accountant=accountant, epsilon_tolerance=0.01))
