"""Flower ClientApp: converts Messages to and from client/runtime.py, nothing more.

The same app runs in deployment (``app`` below, the FAB's clientapp component: identity from
``--node-config``) and in simulation (``make_client_app(spec)``: identity from the partition id).

What leaves the site: weights (ArrayRecord) and the fixed metric schemas of
common/federation.py (numbers only), plus the site name and split sizes in the query reply, and
once after the last round the calibration query's 61 log-loss sums and image count
(common/calibration.py).
Any exception is logged here in full and replaced by ``SiteError`` whose text names only the
site and the error class — Flower ships an exception's text to the server.

DP-SGD (``experiment.privacy``, within the site's own terms, node_config "privacy-*" from its
site YAML: common/site_privacy.py): each train message runs a ``PrivacySession`` that continues
the site's accountant from the more-spent of ``context.state`` and
``<state-dir>/privacy/accountant.json`` (the file survives SuperNode restarts) and refuses, before
any step, a round that would pass the budget or the site's terms (logged, and audited in
``<state-dir>/audit.jsonl`` when the site has one).
"""
from __future__ import annotations

import logging
from importlib import metadata
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.client_dp import client_dp_mod
from client.run_status import END_STATES, RUN_END_KEY, RUNNING, note_run_state
from client.runtime import (
    RoundConfig,
    SiteContext,
    SiteError,
    evaluate_round,
    load_local_norms,
    privacy_state_path,
    resolve_site,
    save_local_norms,
    site_info,
    train_round,
)
from client.secagg_app import secagg_router
from common.calibration import CALIBRATE, site_stats, to_record
from common.device import resolve_device, set_threads
from common.federation import RunSpec, build_experiment_model, is_site_name
from common.packing import PACKED_KEY, layout_from_json, pack, unpack
from common.privacy import PrivacyBudgetExceeded, PrivacySession
from common.privacy_state import load_state, most_spent, save_state, state_from_text, state_to_text
from common.site_privacy import (
    SitePrivacy,
    SitePrivacyRefused,
    check_site_cap,
    effective_privacy,
)
from common.sitedata import load_site_tensors
from launch.audit import AuditLog

log = logging.getLogger(__name__)

_NORMS, _NORMS_META = "fedbn-norms", "fedbn-meta"
_PRIVACY = "privacy-state"  # context.state ConfigRecord {"json": state_to_text(state)}


def app_version() -> str:
    try:
        return metadata.version("fedbus")
    except metadata.PackageNotFoundError:
        return "0+unknown"


Handler = Callable[[Message, Context, SiteContext, RoundConfig], Message]


def make_client_app(spec: RunSpec | None = None) -> ClientApp:
    """A ClientApp for the sites of ``spec`` (simulation) or for node_config-defined sites.
    Its mods follow the run: SecAgg+ runs' messages go to client/secagg_app.py (with this
    app's DP-SGD session hooks), client-level DP rounds clip the update (client/client_dp.py)."""
    app = ClientApp(mods=[secagg_router(spec, _privacy_session, _store_privacy_state), client_dp_mod])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        if RUN_END_KEY in (msg.content.config_records.get("config") or {}):
            return _run_end(msg, context)
        return _guarded("query", _query, msg, context, spec)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _guarded("train", _train, msg, context, spec)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _guarded("evaluate", _evaluate, msg, context, spec)

    @app.query(CALIBRATE)
    def calibrate(msg: Message, context: Context) -> Message:
        return _guarded("calibrate", _calibrate, msg, context, spec)

    return app


def _guarded(kind: str, handler: Handler, msg: Message, context: Context, spec: RunSpec | None) -> Message:
    """Run a handler; on failure log the details locally and raise a sanitised SiteError."""
    site = _site_label(context, spec)
    note_run_state(context.node_config, context.run_id, RUNNING)  # for the site's launcher
    try:
        config = msg.content.config_records.get("config") or ConfigRecord()
        experiment = config.get("experiment")
        ctx = resolve_site(context.node_config, spec, str(experiment) if experiment else None)
        site = ctx.site.name
        return handler(msg, context, ctx, RoundConfig.from_mapping(config))
    except (PrivacyBudgetExceeded, SitePrivacyRefused) as exc:  # expected stop, not a crash
        log.error("%s", exc)
        reason = f": {exc.reason}" if isinstance(exc, SitePrivacyRefused) else ""
        raise SiteError(
            f"site {site}: {kind} refused ({type(exc).__name__}{reason}); details are in the site's log"
        ) from None
    except Exception as exc:  # noqa: BLE001 - everything must be sanitised before it leaves
        log.error("site %s: %s failed", site, kind, exc_info=True)
        raise SiteError(
            f"site {site}: {kind} failed ({type(exc).__name__}); details are in the site's log"
        ) from None


def _site_label(context: Context, spec: RunSpec | None) -> str:
    """Best-effort site name for error texts, before the full resolution (may itself fail)."""
    name: Any = context.node_config.get("site")
    if name is None and spec is not None:
        pid = context.node_config.get("partition-id")
        if isinstance(pid, int) and 0 <= pid < len(spec.sites):
            name = spec.sites[pid].name
    return str(name) if is_site_name(name) else "unnamed"


def _run_end(msg: Message, context: Context) -> Message:
    """The server's last message of a run (server/run_end.py): noted in the site's state folder
    for its launcher (client/run_status.py); the answer says only whether it was noted."""
    state = str(msg.content["config"][RUN_END_KEY])
    if state not in END_STATES:
        state = "finished"  # a newer server's state name: the run is over all the same
    noted = note_run_state(context.node_config, context.run_id, state)
    log.info("site %s: run %d %s", _site_label(context, None), context.run_id, state)
    return Message(RecordDict({"info": ConfigRecord({"run-end-noted": noted})}), reply_to=msg)


def _query(msg: Message, context: Context, ctx: SiteContext, rc: RoundConfig) -> Message:
    info = site_info(ctx, app_version())
    return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)


def _train(msg: Message, context: Context, ctx: SiteContext, rc: RoundConfig) -> Message:
    global_state = _global_state(msg)
    norms = _recall_norms(context, ctx, rc, rc.server_round - 1) if rc.strategy == "fedbn" else None
    session = _privacy_session(context, ctx, rc)
    if session is None:
        out = train_round(ctx, global_state, rc, norms)
    else:
        session.check_budget()  # PrivacyBudgetExceeded: refuse before any step
        try:
            out = train_round(ctx, global_state, rc, norms, privacy=session)
        finally:  # steps taken are accounted even if the round then fails
            session.close()
            if session.steps:
                _store_privacy_state(context, ctx, session.state_dict())
    if out.local_norms is not None:
        save_local_norms(ctx.state_dir, rc.run_key, rc.server_round, out.local_norms)
        context.state[_NORMS] = ArrayRecord(out.local_norms)
        context.state[_NORMS_META] = ConfigRecord({"round": rc.server_round, "run-key": rc.run_key})
    content = RecordDict({"arrays": _reply_arrays(msg, out.reply_state), "metrics": MetricRecord(out.metrics)})
    return Message(content, reply_to=msg)


def _global_state(msg: Message) -> dict[str, torch.Tensor]:
    """The instruction's weights per tensor (unpacked when the server packed them)."""
    arrays = msg.content["arrays"]
    if PACKED_KEY not in arrays:
        return arrays.to_torch_state_dict()
    layout = layout_from_json(str(msg.content["config"]["packing"]))
    state = unpack({k: a.numpy() for k, a in arrays.items()}, layout)
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def _reply_arrays(msg: Message, state: dict[str, torch.Tensor]) -> ArrayRecord:
    """Weights for the reply, packed like the instruction was."""
    if PACKED_KEY not in msg.content["arrays"]:
        return ArrayRecord(state)
    flat, _layout = pack({k: v.detach().cpu().numpy() for k, v in state.items()})
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in flat.items()})


def _evaluate(msg: Message, context: Context, ctx: SiteContext, rc: RoundConfig) -> Message:
    global_state = _global_state(msg)
    norms = _recall_norms(context, ctx, rc, rc.server_round) if rc.strategy == "fedbn" else None
    metrics = evaluate_round(ctx, global_state, rc, norms)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _calibrate(msg: Message, context: Context, ctx: SiteContext, rc: RoundConfig) -> Message:
    """The final model's summed log-loss on a grid of temperatures and the image count, on the
    site's validation (or, without one, training) split (``common.calibration``): 61 sums and a
    count leave the site, nothing per image. A site whose terms require DP refuses: the sums are
    not noised."""
    terms = SitePrivacy.from_node_config(context.node_config)
    if terms is not None and terms.required:
        raise SitePrivacyRefused("calibration statistics are not differentially private",
                                 f"site {ctx.site.name}: calibration refused (the site requires DP)")
    exp = ctx.experiment
    set_threads(exp.train.num_threads)
    train, val = load_site_tensors(ctx.site, exp.data, ctx.cache_dir)
    model = build_experiment_model(exp)  # the final global weights as sent (the saved model)
    model.load_state_dict(_global_state(msg))
    stats, split = site_stats(model, exp, train, val, resolve_device(exp.train.device))
    log.info("site %s: calibration statistics of %d %s images sent", ctx.site.name, stats.count, split)
    return Message(RecordDict({"calibration": MetricRecord(to_record(stats))}), reply_to=msg)


def _privacy_session(context: Context, ctx: SiteContext, rc: RoundConfig) -> PrivacySession | None:
    """This round's DP-SGD session (None: DP off), continuing the site's accountant, under the
    coordinator's request within the site's own terms; a refusal (DP off where the site requires
    it, the site's or the run's ε budget spent) is raised before any step and audited."""
    exp, name = ctx.experiment, ctx.site.name
    terms = SitePrivacy.from_node_config(context.node_config)
    try:
        plan = effective_privacy(terms, exp.privacy, name)
        if not plan.enabled:
            return None
        train, _val = load_site_tensors(ctx.site, exp.data, ctx.cache_dir)
        if len(train) == 0:
            raise ValueError("no training images at this site")
        record = context.state.config_records.get(_PRIVACY)
        in_memory = state_from_text(str(record["json"]), "context.state privacy") if record else None
        if in_memory is not None and in_memory.get("site") != name:
            in_memory = None  # not this site's ledger
        state = most_spent(in_memory, load_state(privacy_state_path(ctx.state_dir)))
        session = PrivacySession(plan, num_examples=len(train), batch_size=exp.train.batch_size,
                                 epochs=rc.local_epochs, state=state, site=name)
        if terms is not None and terms.min_noise_multiplier is not None:
            session.raise_noise_to(terms.min_noise_multiplier)
        check_site_cap(terms, session.predicted_epsilon(), session.epsilon_before, name)
        session.check_budget()
    except (PrivacyBudgetExceeded, SitePrivacyRefused) as exc:
        _audit_refusal(ctx, rc, exc)
        raise
    return session


def _audit_refusal(ctx: SiteContext, rc: RoundConfig, exc: Exception) -> None:
    """A privacy refusal in the site's audit log (when the site has one: deployment)."""
    path = ctx.state_dir / "audit.jsonl"
    if not path.is_file():
        return
    try:
        AuditLog(path, actor=f"site:{ctx.site.name}").append(
            "privacy_refused", site=ctx.site.name, run_key=rc.run_key, round=rc.server_round,
            refusal=type(exc).__name__, reason=str(exc))
    except OSError:
        log.error("site %s: could not audit the privacy refusal", ctx.site.name, exc_info=True)


def _store_privacy_state(context: Context, ctx: SiteContext, state: dict[str, Any]) -> None:
    save_state(privacy_state_path(ctx.state_dir), state)
    context.state[_PRIVACY] = ConfigRecord({"json": state_to_text(state)})
    log.info("site %s: DP-SGD eps=%.4f spent so far (delta=%g)", ctx.site.name,
             float(state["epsilon"]), float(state["delta"]))


def _recall_norms(context: Context, ctx: SiteContext, rc: RoundConfig, up_to_round: int) -> dict[str, Any] | None:
    """FedBN: this site's norm layers from the newest round <= up_to_round. ``context.state``
    first (simulation, long-lived SuperNode), else the site-local file (deployment starts a new
    process per message; it also survives a SuperNode restart)."""
    meta = context.state.config_records.get(_NORMS_META)
    if meta is not None and meta.get("run-key") == rc.run_key and int(meta.get("round", -1)) <= up_to_round:
        return context.state[_NORMS].to_torch_state_dict()
    found = load_local_norms(ctx.state_dir, rc.run_key, up_to_round)
    return found[1] if found else None


#: Deployment entry point (pyproject ``[tool.flwr.app.components] clientapp``).
app = make_client_app()
