"""SecAgg+ mode, site side: a legacy ``NumPyClient`` behind Flower's ``secaggplus_mod``.

Flower 1.41's secure aggregation only exists for the legacy API: ``secaggplus_mod`` masks the
parameters of a legacy ``FitRes``, so the site must be a ``client_fn`` returning a NumPyClient
(flower-1.41 notes §1.7). The work itself is client/runtime.py's ``train_round`` /
``evaluate_round``, as in the regular app.

What is sent: the **update** (local − global weights), multiplied per array by the
"update-scales" the server puts in the fit config, so that every value lies inside SecAgg+'s
quantisation range [−clipping_range, clipping_range] (weights would need a range wide enough
for the largest weight, and counters such as the prior's ``num_updates`` grow without bound).
Values outside the range are clipped by the protocol; the site logs how many. The metrics
(train schema of common/federation.py) travel in the clear, as they do without SecAgg.

DP-SGD (``experiment.privacy.enabled``) composes with SecAgg+: the site trains with its own
``PrivacySession`` and keeps the accountant in ``<state-dir>/privacy/accountant.json``. Inside
the regular ClientApp (client/app.py) the session comes from the same hook as every other round,
so the site's own ``privacy:`` terms hold under SecAgg+ too. FedBN cannot be combined (a masked
sum needs every site to send every array).

Selection: a run with ``federation.secagg.enabled`` sends legacy (FitIns/EvaluateIns) and
SecAgg+ stage messages; ``secagg_router`` is a mod of the regular ClientApp that hands exactly
those to this app, so sites need no switch and no other app bundle (warm worker included).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.runtime import (
    RoundConfig,
    SiteContext,
    SiteError,
    evaluate_round,
    privacy_state_path,
    resolve_site,
    train_round,
)
from common.atomic import atomic_write
from common.federation import RunSpec, build_experiment_model, is_site_name
from common.privacy import PrivacySession
from common.privacy_state import load_state, save_state
from common.sitedata import load_site_tensors
from launch.wire import KEY_MAX_WEIGHT, KEY_RANGE, KEY_SCALES, SECAGG_STRATEGIES

log = logging.getLogger(__name__)

#: This round's DP-SGD session of a site (None: DP off), raising on a refusal before any step.
PrivacyHook = Callable[[Context, SiteContext, RoundConfig], "PrivacySession | None"]
#: Persist a session's accountant state (file and context.state).
StoreHook = Callable[[Context, SiteContext, dict[str, Any]], None]
#: Record names of the legacy messages (flwr ``compat`` FitIns/EvaluateIns) a SecAgg+ run sends.
LEGACY_PREFIXES = ("fitins.", "evaluateins.")


class SecAggSiteClient(NumPyClient):
    """One site for one message; ``spec`` in simulation, node_config in deployment."""

    def __init__(self, node_config: dict[str, Any], spec: RunSpec | None, record_dir: str | None = None,
                 run_context: Context | None = None, privacy: PrivacyHook | None = None,
                 store: StoreHook | None = None) -> None:
        self.node_config, self.spec, self.record_dir = node_config, spec, record_dir
        self.run_context, self.privacy, self.store = run_context, privacy, store

    def _site(self, config: dict[str, Any]) -> tuple[SiteContext, RoundConfig]:
        experiment = config.get("experiment")
        ctx = resolve_site(self.node_config, self.spec, str(experiment) if experiment else None)
        return ctx, RoundConfig.from_mapping(config)

    def _keys(self, ctx: SiteContext, parameters: list[np.ndarray]) -> list[str]:
        shapes = {k: tuple(v.shape) for k, v in build_experiment_model(ctx.experiment).state_dict().items()}
        keys = list(shapes)
        if len(keys) != len(parameters) or any(shapes[k] != p.shape for k, p in zip(keys, parameters)):
            raise ValueError("received arrays do not match this site's model (experiment differs?)")
        return keys

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        return _guarded(self, "fit", self._fit, parameters, config)

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        return _guarded(self, "evaluate", self._evaluate, parameters, config)

    def _fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        ctx, rc = self._site(config)
        if rc.strategy not in SECAGG_STRATEGIES:
            raise ValueError(f"strategy {rc.strategy!r} cannot run under SecAgg+ ({SECAGG_STRATEGIES})")
        if KEY_SCALES not in config:
            raise ValueError(f"fit config lacks {KEY_SCALES!r} (server is not server/secagg_app.py)")
        scales = np.asarray(json.loads(str(config[KEY_SCALES])), dtype=np.float64)
        keys = self._keys(ctx, parameters)
        if len(scales) != len(keys):
            raise ValueError(f"{KEY_SCALES}: {len(scales)} scales for {len(keys)} arrays")
        global_state = {k: torch.from_numpy(np.array(p, copy=True)) for k, p in zip(keys, parameters)}
        session = self._session(ctx, rc)
        if session is not None:
            session.check_budget()  # PrivacyBudgetExceeded: refuse before any step
        try:
            out = train_round(ctx, global_state, rc, privacy=session)
        finally:  # steps taken are accounted even if the round then fails
            if session is not None:
                session.close()
                if session.steps:
                    self._store(ctx, session.state_dict())
        metrics = dict(out.metrics)
        n = int(metrics["num-examples"])
        max_weight = float(config.get(KEY_MAX_WEIGHT, float("inf")))
        if n > max_weight:
            raise ValueError(f"{n} training images exceed the SecAgg+ max_weight {max_weight:g}")
        if session is not None:
            metrics["epsilon"] = float(session.epsilon())
        # 0-d arrays (e.g. the prior's num_updates) come out of SecAgg+ wrong in flwr 1.41 (its
        # stochastic rounding returns a numpy scalar): send them as shape (1,)
        update = [np.atleast_1d((out.reply_state[k].double() - global_state[k].double()).numpy() * s)
                  for k, s in zip(keys, scales)]
        limit = float(config.get(KEY_RANGE, float("inf")))
        clipped = sum(int((np.abs(u) > limit).sum()) for u in update)
        if clipped:
            log.warning("site %s: %d update values exceed the SecAgg+ clipping range %g and will be "
                        "clipped; raise secagg.clipping_range", ctx.site.name, clipped, limit)
        if self.record_dir:
            _record(Path(self.record_dir) / ctx.site.name / f"round_{rc.server_round:05d}.npz",
                    keys, update, scales, n)
        return update, n, metrics

    def _session(self, ctx: SiteContext, rc: RoundConfig) -> PrivacySession | None:
        """The round's DP-SGD session: the regular app's hook (the site's own terms, its
        accountant in context.state and on disk), or, standalone, the experiment's section."""
        if self.privacy is not None and self.run_context is not None:
            return self.privacy(self.run_context, ctx, rc)
        exp = ctx.experiment
        if not exp.privacy.enabled:
            return None
        train, _ = load_site_tensors(ctx.site, exp.data, ctx.cache_dir)
        return PrivacySession(exp.privacy, num_examples=len(train), batch_size=exp.train.batch_size,
                              epochs=rc.local_epochs, state=load_state(privacy_state_path(ctx.state_dir)),
                              site=ctx.site.name)

    def _store(self, ctx: SiteContext, state: dict[str, Any]) -> None:
        if self.store is not None and self.run_context is not None:
            self.store(self.run_context, ctx, state)
        else:
            save_state(privacy_state_path(ctx.state_dir), state)

    def _evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        ctx, rc = self._site(config)
        keys = self._keys(ctx, parameters)
        state = {k: torch.from_numpy(np.array(p, copy=True)) for k, p in zip(keys, parameters)}
        metrics = evaluate_round(ctx, state, rc)
        dice = float(metrics["dice"])
        loss = 1.0 - dice if dice >= 0 else float("nan")  # Dice loss over lesion images
        return loss, int(metrics["num-examples"]), metrics


def _record(path: Path, keys: list[str], update: list[np.ndarray], scales: np.ndarray, n: int) -> None:
    """Site-local record of the plaintext (scaled) update this site contributed (atomic)."""
    atomic_write(path, lambda fh: np.savez(fh, *update, keys=np.asarray(keys), scales=scales,
                                           num_examples=np.asarray(n)), binary=True, mode=None)


def _guarded(client: SecAggSiteClient, kind: str, fn: Any, *args: Any) -> Any:
    """Log failures in full here; only the site name and error class leave the site."""
    try:
        return fn(*args)
    except Exception as exc:
        site = _site_label(client)
        log.error("site %s: secagg %s failed", site, kind, exc_info=True)
        raise SiteError(f"site {site}: {kind} failed ({type(exc).__name__}); details are in the "
                        "site's log") from None


def _site_label(client: SecAggSiteClient) -> str:
    """The site's name for error texts: node_config's, or the spec's site of the partition id."""
    name: Any = client.node_config.get("site")
    pid = client.node_config.get("partition-id")
    if name is None and client.spec is not None and isinstance(pid, int) and 0 <= pid < len(client.spec.sites):
        name = client.spec.sites[pid].name
    return str(name) if is_site_name(name) else "unnamed"


def make_secagg_client_app(spec: RunSpec | None = None, record_dir: str | None = None,
                           privacy: PrivacyHook | None = None, store: StoreHook | None = None) -> ClientApp:
    """ClientApp for SecAgg+ runs: the sites of ``spec`` (simulation) or node_config's site.
    ``record_dir``: each site also keeps the plaintext update it contributed, as
    ``<record_dir>/<site>/round_NNNNN.npz`` (arrays arr_0.. in state_dict order, keys, scales,
    num_examples) — for a site's own audit trail, and for tests; it never leaves the site.
    ``privacy``/``store``: the regular app's DP-SGD session hooks (client/app.py)."""

    def client_fn(context: Context) -> Any:
        return SecAggSiteClient(dict(context.node_config), spec, record_dir, context, privacy, store).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def is_secagg_message(msg: Message) -> bool:
    """A SecAgg+ stage message or a legacy FitIns/EvaluateIns: what a ``federation.secagg`` run
    sends (the regular app's messages carry "arrays"/"config" records instead)."""
    content = msg.content
    names = [*content.array_records.keys(), *content.config_records.keys()]
    return RECORD_KEY_CONFIGS in content.config_records or any(n.startswith(LEGACY_PREFIXES) for n in names)


def secagg_router(spec: RunSpec | None = None, privacy: PrivacyHook | None = None,
                  store: StoreHook | None = None) -> Mod:
    """A mod for the regular ClientApp: SecAgg+ runs' messages go to the SecAgg+ app (built
    once, on first use), every other message on to the regular handlers."""
    secagg: list[ClientApp] = []

    def route(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not is_secagg_message(msg):
            return call_next(msg, context)
        if not secagg:
            secagg.append(make_secagg_client_app(spec, privacy=privacy, store=store))
        return secagg[0](msg, context)

    return route
