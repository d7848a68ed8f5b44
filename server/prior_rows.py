"""Per round, the BI-RADS prior of the global model and of each site's accepted update as metrics
rows (phase ``prior``), for the deployment report's "what this model learned about malignancy"
(server/report_prior.py, where the metric names are listed).

Nothing new leaves a site: the prior's weights and standardisation are part of the weights a
site already returns, and the server reads them with ``BiradsPrior.describe()``. Runs in the
ServerApp (torch); the coordinator only reads the rows.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from common.config import ExperimentConfig
from common.federation import AGGREGATE_SITE, build_experiment_model
from server.report_prior import PRIOR_PHASE

log = logging.getLogger(__name__)

PREFIX = "prior."  # MultiTaskNet.prior's keys in the state dict
Record = Callable[[int, str, str, str, float], None]


def describe_rows(described: Mapping[str, Any]) -> dict[str, float]:
    """``BiradsPrior.describe()`` flattened to metric names (report_prior's docstring)."""
    out: dict[str, float] = {}
    for name, f in described["features"].items():
        for key in ("weight", "per_unit", "mean", "std"):
            out[f"{key}_{name}"] = float(f[key])
    out["bias"] = float(described["bias"])
    out["bias_per_unit"] = float(described["bias_per_unit"])
    return out


class PriorLog:
    """Reads the prior out of state dicts shaped like the experiment's model."""

    def __init__(self, exp: ExperimentConfig) -> None:
        self.template = copy.deepcopy(build_experiment_model(exp).prior).eval()

    def values(self, state: Mapping[str, Any]) -> dict[str, float]:
        """Metric name → value of the prior in ``state`` (name → array or tensor); {} when the
        state holds no (or a malformed) prior."""
        sub = {k[len(PREFIX):]: torch.as_tensor(np.array(v)) for k, v in state.items() if k.startswith(PREFIX)}
        if not sub:
            return {}
        prior = copy.deepcopy(self.template)
        try:
            prior.load_state_dict(sub)
        except (RuntimeError, KeyError) as exc:  # a site's update is screened, but never trusted here
            log.warning("prior not readable (%s)", exc)
            return {}
        return describe_rows(prior.describe())

    def record_round(self, rnd: int, arrays: Any, replies: Iterable[Any], strategy: Any,
                     record: Record) -> None:
        """Rows of the aggregated ``arrays`` (an ArrayRecord, site ``all-sites``) and of each
        train reply the strategy accepted this round (its ``last_site_metrics``; the screened
        replies hold per-tensor arrays)."""
        prior_keys = [k for k in arrays.keys() if k.startswith(PREFIX)]
        rows = {AGGREGATE_SITE: self.values({k: arrays[k].numpy() for k in prior_keys})}
        accepted = strategy.last_site_metrics.get("train", {})
        for msg in replies:
            if msg.has_error():
                continue
            site = strategy.registry.name(msg.metadata.src_node_id)
            if site not in accepted or "arrays" not in msg.content.array_records:
                continue
            sent = msg.content["arrays"]
            rows[site] = self.values({k: sent[k].numpy() for k in sent.keys() if k.startswith(PREFIX)})
        for site, values in rows.items():
            for metric, value in values.items():
                record(rnd, PRIOR_PHASE, site, metric, value)
