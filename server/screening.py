"""Update screening on the server: Flower train replies → common/screening.py checks.

Every round, before aggregation, each site's train reply is read as per-tensor arrays (unpacked
when packed; the packed vector itself must be the float32 vector sent) and screened against the
global weights sent that round (common/screening.py: schema, finiteness, num-examples against the
site's declared num-train, update norm). Rejected sites are logged with the reason here; the
strategy (server/strategy.py) records them in metrics and leaves them out; the round loop
(server/app.py) stops the run when no finite model comes out (``aggregate_problem``).

Each rejection and each dropped site is also an entry of the coordinator's audit log
(``audit_screening``: ``update_rejected`` and ``site_dropped`` with site, round and reason), which
the ServerApp finds in the run folder's key registry (server/identity.py), as it does for identity
refusals. Without that registry (simulation, a SuperLink without node authentication) the metric
rows "rejected" / "rejected_<code>" / "dropped" and server.log are the only record.
SecAgg+ (server/secagg_app.py) sees only the masked sum of the updates: nothing to screen per site.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from common.packing import PACKED_KEY, layout_of, unpack
from common.screening import ScreenLimits, Update, Verdict, nonfinite_keys, screen_updates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Screened:
    """``accepted`` {site: reply with per-tensor arrays}, in site order; ``verdict`` the details
    (unreadable replies are in it as schema rejections)."""

    accepted: dict[str, Message]
    verdict: Verdict


def reply_arrays(msg: Message, reference: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, str]:
    """(per-tensor arrays of a train reply, '') or (None, why they cannot be read)."""
    content = msg.content
    if len(content.array_records) != 1 or "arrays" not in content.array_records:
        return None, "expected one ArrayRecord 'arrays'"
    try:
        raw = {k: a.numpy() for k, a in content["arrays"].items()}
    except Exception as exc:  # noqa: BLE001 - a hostile reply may hold anything
        return None, f"arrays cannot be read ({type(exc).__name__})"
    if PACKED_KEY not in raw:
        return raw, ""
    flat = raw[PACKED_KEY]
    if flat.dtype != np.float32 or flat.ndim != 1:  # unpack would cast it silently
        return None, f"packed weights are {flat.dtype} of shape {flat.shape}, expected a float32 vector"
    try:
        return unpack(raw, layout_of(reference)), ""
    except ValueError as exc:
        return None, str(exc)


def screen_train_replies(
    server_round: int,
    replies: Mapping[str, Message],
    reference: Mapping[str, np.ndarray],
    declared: Mapping[str, int],
    limits: ScreenLimits,
) -> Screened:
    """Screen well-formed train replies {site: reply} (metrics already schema-checked) against
    the global weights ``reference`` (the keys the sites send back); accepted replies get their
    arrays replaced by the per-tensor ones, in place."""
    updates: dict[str, Update] = {}
    unreadable: dict[str, tuple[tuple[str, str], ...]] = {}
    states: dict[str, dict[str, np.ndarray]] = {}
    for site, msg in replies.items():
        state, problem = reply_arrays(msg, reference)
        if state is None:
            unreadable[site] = (("schema", problem),)
            continue
        states[site] = state
        claimed = float(msg.content["metrics"]["num-examples"])  # type: ignore[arg-type]
        updates[site] = Update(state, claimed, declared.get(site))
    verdict = screen_updates(updates, reference, limits)
    if unreadable:
        rejected = dict(sorted({**verdict.rejected, **unreadable}.items()))
        verdict = Verdict(verdict.accepted, rejected, verdict.norms, verdict.bound)
    for site in verdict.rejected:
        log.warning("round %d train: update of site %s rejected: %s", server_round, site, verdict.reason(site))
    accepted = {}
    for site in verdict.accepted:
        msg = replies[site]
        msg.content["arrays"] = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in states[site].items()})
        accepted[site] = msg
    if verdict.norms:
        log.info("round %d train: update norms %s (relative bound %s)", server_round,
                 {s: float(f"{n:.4g}") for s, n in sorted(verdict.norms.items())},
                 "none" if verdict.bound is None else f"{verdict.bound:.4g}")
    return Screened(accepted, verdict)


def aggregate_problem(arrays: ArrayRecord | None, left_out: Mapping[str, str]) -> str:
    """'' when a round produced a finite global model; else why not (the run must stop then,
    keeping its last good checkpoint). ``left_out``: {site: why} of the round's train phase."""
    if arrays is None:
        why = "; ".join(f"{s}: {r}" for s, r in sorted(left_out.items())) or "no site was asked"
        return f"no site update could be aggregated ({why})"
    bad = nonfinite_keys({k: a.numpy() for k, a in arrays.items()})
    if bad:
        return f"the aggregate is not finite in {len(bad)} array(s), e.g. {bad[:3]}"
    return ""


def audit_screening(path: str | Path | None, server_round: int, rejected: Mapping[str, str],
                    dropped: Iterable[str], drop_after: int, run_dir: str = "") -> list[dict[str, Any]]:
    """Append one ``update_rejected`` entry per rejected site ({site: reason}) and one
    ``site_dropped`` entry per site dropped this round to the audit log at ``path`` (None: no
    log, nothing written); returns the entries. An unwritable log is logged, never raised: the
    rejection itself stands, only its audit entry is lost."""
    if not path or not (rejected or dropped):
        return []
    from launch.audit import AuditLog

    entries: list[dict[str, Any]] = []
    try:
        audit = AuditLog(path, actor="serverapp")
        for site, reason in sorted(rejected.items()):
            entries.append(audit.append("update_rejected", site=site, round=server_round, reason=reason,
                                        run_dir=run_dir))
        for site in sorted(dropped):
            entries.append(audit.append(
                "site_dropped", site=site, round=server_round, run_dir=run_dir,
                reason=f"update rejected {drop_after} round(s) running; no longer sampled in this run"))
    except OSError as exc:
        log.error("round %d: could not audit the screening outcome: %s", server_round, exc)
    return entries
