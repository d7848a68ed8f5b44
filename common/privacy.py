"""Sample-level DP-SGD at one site (Opacus), with a budget that survives rounds and restarts.

A ``PrivacySession`` covers one local-training call (one federated round) and plugs into
``common.train.train_local(privacy=...)``. Its guarantee is (ε, δ)-DP with respect to adding or
removing **one training image** of this site, for everything the site releases from training
(the weights of every round); see docs/privacy.md for what it does not cover.
The budget arithmetic is in ``common.accounting`` and the state (de)serialisation in
``common.privacy_state``.

How the budget is spent across rounds:
- The noise multiplier σ is fixed **once per site** (first round): either ``noise_multiplier``
  or, from ``target_epsilon``, σ such that ``planned_epochs`` epochs at sample rate q reach
  exactly ε ≤ target (``opacus.accountants.utils.get_noise_multiplier``, as
  ``make_private_with_epsilon`` does). Recomputing σ every round from the full target would
  re-spend the budget each round.
- The accountant's history [(σ, q, steps), ...] (Opacus RDP by default) lives in a JSON-safe
  state dict that the caller keeps in Flower's ``context.state`` **and** in a site-local file
  (``save_state``/``load_state``): Flower starts a new process per message and the in-memory
  state is lost when a SuperNode restarts.
- ``check_budget()`` predicts ε after this round's steps on a throwaway accountant and raises
  ``PrivacyBudgetExceeded`` before any step is taken (``wrap`` calls it too).

Sampling is Poisson (each image joins a step's batch with probability q = 1/⌈N/B⌉, Opacus'
``DPDataLoader``), which the RDP analysis assumes. A step whose draw is empty is still taken as a
noise-only step (and accounted): skipping it would reveal that the draw was empty.
``max_physical_batch`` cuts a large draw into chunks of one logical step (virtual steps) and
``augmult`` averages each image's gradient over K augmented copies (``common.dp_batches``);
``trainable`` (all | decoder | norms, ``common.dp_trainable``) is frozen by ``common.train`` before wrapping.
Refused before training: δ ≥ 1/N, and modules Opacus cannot privatise (BatchNorm).
"""
from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from common.accounting import epsilon_of, plan_noise_multiplier, poisson_rate, validate
from common.config import PrivacyConfig
from common.dp_batches import (
    average_copies_before_clipping,
    refuse_unsupported_modules,
    split_indices,
)
from common.dp_trainable import register_grad_samplers
from common.privacy_state import STATE_FORMAT, _check_state

if TYPE_CHECKING:  # the data stack is imported only where batches are built
    from common.data.tensors import TensorData

log = logging.getLogger(__name__)

#: Metric keys a site reports each round (fixed schema: the same at every site).
METRIC_KEYS = ("epsilon", "epsilon_round")
_GSM_PREFIX = "_module."

BatchFactory = Callable[[], Iterable[dict[str, Tensor]]]


class PrivacyBudgetExceeded(RuntimeError):
    """Training this round would take the site's ε past its budget; nothing was trained."""


# ------------------------------------------------------------------ model helpers
def unwrap_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The plain model's state_dict: a GradSampleModule's ``_module.`` prefixes removed."""
    inner = getattr(model, "_module", model)
    state = inner.state_dict()
    return {(k[len(_GSM_PREFIX):] if k.startswith(_GSM_PREFIX) else k): v for k, v in state.items()}


def _batch_of(data: TensorData, idx: Tensor) -> dict[str, Tensor]:
    """One batch dict (as ``batches`` yields) holding the images ``idx`` of ``data``."""
    from common.data.tensors import batches

    batch = next(iter(batches(data.subset(idx), len(idx), shuffle=False)))
    if "index" in batch:
        batch["index"] = idx  # positions in ``data``, not in the subset
    return batch


# ------------------------------------------------------------------ the session
class PrivacySession:
    """DP-SGD for one round at one site; see the module docstring.

    ``num_examples``/``batch_size``/``epochs``: the round's training set size, the (expected)
    batch size and the local epochs, which fix q and this round's steps before training.
    ``state``: the previous rounds' state (``state_dict()`` of the last session), or None on a
    site's first round. ``site`` names the site in messages.
    """

    def __init__(
        self,
        cfg: PrivacyConfig,
        *,
        num_examples: int,
        batch_size: int,
        epochs: int,
        state: Mapping[str, Any] | None = None,
        site: str = "site",
    ) -> None:
        validate(cfg)
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.cfg, self.site = cfg, site
        self.num_examples, self.batch_size, self.epochs = int(num_examples), int(batch_size), int(epochs)
        self.sample_rate, self.steps_per_epoch = poisson_rate(self.num_examples, self.batch_size)
        if cfg.target_delta >= 1.0 / self.num_examples:  # (ε, δ ≥ 1/N) allows releasing a record outright
            raise ValueError(f"site {site}: privacy.target_delta={cfg.target_delta:g} is >= 1/N = "
                             f"{1 / self.num_examples:.3g} (N = {self.num_examples} training images): such a "
                             f"guarantee allows publishing one image outright; DP-SGD refused before "
                             f"training: use a delta well below 1/N")
        if state is not None:
            _check_state(state, f"site {site} privacy state")
            if state.get("accountant", cfg.accountant) != cfg.accountant:
                raise ValueError(f"site {site}: stored accountant {state.get('accountant')!r} "
                                 f"differs from privacy.accountant {cfg.accountant!r}")
        self._previous: dict[str, Any] = copy.deepcopy(dict(state)) if state else {}
        stored_sigma = self._previous.get("noise_multiplier")
        if stored_sigma is None:
            self.noise_multiplier = plan_noise_multiplier(cfg, self.sample_rate, self.steps_per_epoch)
            log.info("site %s: DP-SGD noise multiplier %.4f (q=%.4g, %s)", site, self.noise_multiplier,
                     self.sample_rate, f"target eps {cfg.target_epsilon} over {cfg.planned_epochs} epochs"
                     if cfg.noise_multiplier is None else "fixed")
        else:
            self.noise_multiplier = float(stored_sigma)
            self._warn_if_plan_changed()
        self._history_before = [list(h) for h in self._previous.get("history", [])]
        self.epsilon_before = epsilon_of(self._history_before, cfg.target_delta, cfg.accountant)
        self._engine: Any = None
        self._module: Any = None
        self._prior_tracking: tuple[Any, bool] | None = None
        self._steps = 0  # optimizer steps of this round (noise-only ones included)

    # ---- what train_local reads (common.train's PrivacySession protocol)
    @property
    def trainable(self) -> str:
        """"all", "decoder" or "norms": what train_local leaves trainable before wrapping."""
        return self.cfg.trainable

    @property
    def augmult(self) -> int:
        """K: train_local repeats each image K times (augmented independently) per step."""
        return self.cfg.augmult

    # ---- plan / budget
    def _warn_if_plan_changed(self) -> None:
        plan = self._previous.get("plan", {})
        now = {"target_epsilon": self.cfg.target_epsilon, "planned_epochs": self.cfg.planned_epochs,
               "noise_multiplier": self.cfg.noise_multiplier}
        changed = {k: (plan.get(k), v) for k, v in now.items() if k in plan and plan[k] != v}
        if changed:
            log.warning("site %s: privacy config changed since the noise was planned %s; the "
                        "stored noise multiplier %.4f is kept and the budget check uses the "
                        "current target", self.site, changed, self.noise_multiplier)

    def raise_noise_to(self, minimum: float) -> None:
        """Use σ ≥ ``minimum`` (a site's floor) from this round on, before training; a larger σ
        only lowers ε, and the accountant records each round's σ."""
        if self._engine is not None:
            raise RuntimeError("PrivacySession.raise_noise_to: call it before training")
        if self.noise_multiplier < minimum:
            log.info("site %s: noise multiplier %.4f raised to the site's minimum %.4f",
                     self.site, self.noise_multiplier, minimum)
            self.noise_multiplier = float(minimum)

    @property
    def budget(self) -> float | None:
        """The ε the site may not exceed (None: no cap, only with a fixed noise multiplier)."""
        return None if self.cfg.target_epsilon is None else float(self.cfg.target_epsilon)

    @property
    def planned_steps(self) -> int:
        """Optimizer steps this round will take (noise-only steps of empty draws included)."""
        return self.epochs * self.steps_per_epoch

    def predicted_epsilon(self) -> float:
        """ε after this round's planned steps, on a copy of the history (nothing is spent)."""
        hist = [*self._history_before, [self.noise_multiplier, self.sample_rate, self.planned_steps]]
        return epsilon_of(hist, self.cfg.target_delta, self.cfg.accountant)

    def check_budget(self) -> None:
        """Raise ``PrivacyBudgetExceeded`` if this round would take ε past the budget."""
        if self.budget is None:
            return
        predicted = self.predicted_epsilon()
        if predicted > self.budget:
            raise PrivacyBudgetExceeded(
                f"site {self.site}: privacy budget exhausted - spent eps={self.epsilon_before:.3f} "
                f"(delta={self.cfg.target_delta:g}) of the budget eps={self.budget:g}; this round "
                f"({self.planned_steps} DP-SGD steps) would reach eps={predicted:.3f}. The site "
                f"does not train. Continuing needs the data owner to raise privacy.target_epsilon."
            )

    # ---- the train_local seam
    def wrap(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: TensorData,
        *,
        batch_size: int,
        generator: torch.Generator,
        extra_grad: Callable[[], None] | None,
    ) -> tuple[nn.Module, torch.optim.Optimizer, BatchFactory]:
        """Privatise ``model`` (a fresh one per session) for this round; see common/train.py."""
        if self._engine is not None:
            raise RuntimeError("PrivacySession.wrap: a session privatises one model once; make a "
                               "new session (and a fresh model) for the next round")
        if batch_size != self.batch_size or len(data) != self.num_examples:
            raise ValueError(f"site {self.site}: session planned for N={self.num_examples}, "
                             f"B={self.batch_size} but training got N={len(data)}, B={batch_size}")
        self.check_budget()
        refuse_unsupported_modules(model, self.site)
        register_grad_samplers()
        from opacus import PrivacyEngine

        try:
            engine = PrivacyEngine(accountant=self.cfg.accountant, secure_mode=self.cfg.secure_mode)
        except ImportError as exc:
            raise RuntimeError("privacy.secure_mode needs the torchcsprng package (not installed); "
                               "turn secure_mode off for research runs") from exc
        engine.accountant.load_state_dict({"history": [tuple(h) for h in self._history_before],
                                           "mechanism": engine.accountant.mechanism()})
        prior = getattr(model, "prior", None)
        if prior is not None and hasattr(prior, "track_running_stats"):
            # running feature statistics would mix images and leave the site un-noised
            self._prior_tracking = (prior, bool(prior.track_running_stats))
            prior.track_running_stats = False
        device = next(model.parameters()).device
        noise_gen = None
        if not self.cfg.secure_mode:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            noise_gen = torch.Generator(device=device).manual_seed(seed)
        index_loader = DataLoader(TensorDataset(torch.arange(len(data))), batch_size=batch_size,
                                  generator=generator)
        module, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=index_loader,
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.cfg.max_grad_norm,
            poisson_sampling=True, noise_generator=noise_gen,
        )
        if len(dp_loader) != self.steps_per_epoch or dp_loader.sample_rate != self.sample_rate:
            raise RuntimeError(f"Opacus sampler ({len(dp_loader)} steps, q={dp_loader.sample_rate}) "
                               f"differs from the plan ({self.steps_per_epoch}, q={self.sample_rate})")
        if extra_grad is not None:  # after noise and scaling, before the parameter update
            account = dp_opt.step_hook

            def hook(opt: Any) -> None:
                account(opt)
                extra_grad()

            dp_opt.step_hook = hook
        if self.cfg.augmult > 1:
            average_copies_before_clipping(dp_opt, self.cfg.augmult)
        self._engine, self._optimizer, self._module = engine, dp_opt, module
        bound = self.cfg.max_physical_batch
        per_pass = None if bound is None else bound // self.cfg.augmult  # images per forward pass

        def epoch() -> Iterator[dict[str, Tensor] | list[dict[str, Tensor]]]:
            for (idx,) in dp_loader:
                if idx.numel() == 0:
                    self._noise_only_step()
                    continue
                chunks = [_batch_of(data, part) for part in split_indices(idx, per_pass)]
                yield chunks[0] if len(chunks) == 1 else chunks

        return module, dp_opt, epoch

    def fill_unused(self, rows: int) -> None:
        """Zero per-sample gradients for trainable parameters this pass did not reach (the prior
        while λ is still 0): Opacus clips and noises every parameter and refuses a missing one."""
        for p in self._optimizer.params:
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = torch.zeros((rows, *p.shape), device=p.device, dtype=p.dtype)

    def accumulate(self) -> None:
        """After a chunk of a split Poisson batch (not its last): clip and sum its per-sample
        gradients into Opacus' ``summed_grad`` and clear them, with no noise and no update;
        the last chunk's ``optimizer.step()`` then noises and applies the whole batch."""
        opt = self._optimizer
        opt.signal_skip_step(do_skip=True)
        opt.step()
        opt.zero_grad(set_to_none=True)  # keeps summed_grad after a skipped step

    def close(self) -> None:
        """Detach Opacus from the model (hooks, per-sample gradients) once training is over, so
        the plain model can be evaluated or privatised again by a later session."""
        if self._module is not None and hasattr(self._module, "to_standard_module"):
            self._module.to_standard_module()
        self._module = None
        if self._prior_tracking is not None:
            prior, tracking = self._prior_tracking
            prior.track_running_stats = tracking
            self._prior_tracking = None

    def _noise_only_step(self) -> None:
        """An empty Poisson draw: the step still releases noise (and is accounted)."""
        opt = self._optimizer
        opt.zero_grad(set_to_none=True)
        for p in opt.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.after_step()

    def after_step(self) -> None:
        """Count the step and check that the accountant saw it (one history step per update)."""
        self._steps += 1
        recorded = sum(int(h[2]) for h in self._engine.accountant.history)
        expected = sum(int(h[2]) for h in self._history_before) + self._steps
        if recorded != expected:
            raise RuntimeError(f"site {self.site}: accountant recorded {recorded} steps, "
                               f"expected {expected}: a DP step went unaccounted")

    # ---- results
    @property
    def history(self) -> list[list[float]]:
        if self._engine is None:
            return [list(h) for h in self._history_before]
        return [[float(s), float(q), int(n)] for s, q, n in self._engine.accountant.history]

    def epsilon(self) -> float:
        """Cumulative ε at ``target_delta`` over every round so far, this one included."""
        if self._engine is None:
            return self.epsilon_before
        return epsilon_of(self.history, self.cfg.target_delta, self.cfg.accountant)

    @property
    def epsilon_this_round(self) -> float:
        """Increase of the cumulative ε during this round (ε does not add up linearly, so this
        is the round's share of the total, not the ε of the round on its own)."""
        return self.epsilon() - self.epsilon_before

    @property
    def steps(self) -> int:
        return self._steps

    def metrics(self) -> dict[str, float]:
        """The fixed per-round metric keys (``METRIC_KEYS``)."""
        return {"epsilon": self.epsilon(), "epsilon_round": self.epsilon_this_round}

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state to pass as ``state`` to the next round's session (and to save)."""
        rounds = list(self._previous.get("rounds", []))
        if self._steps:
            rounds.append({"steps": self._steps, "epsilon": self.epsilon(),
                           "epsilon_round": self.epsilon_this_round})
        return {
            "format": STATE_FORMAT,
            "site": self.site,
            "accountant": self.cfg.accountant,
            "delta": self.cfg.target_delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.cfg.max_grad_norm,
            "sample_rate": self.sample_rate,
            "plan": self._previous.get("plan") or {
                "target_epsilon": self.cfg.target_epsilon,
                "planned_epochs": self.cfg.planned_epochs,
                "noise_multiplier": self.cfg.noise_multiplier,
            },
            "history": self.history,
            "epsilon": self.epsilon(),
            "rounds": rounds,
        }
