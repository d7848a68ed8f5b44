"""``SiteAware``: what a multi-hospital run needs around Flower's strategies (the concrete
strategies and ``build_strategy`` are in server/strategies.py):

* node selection that never blocks (stock ``sample_nodes`` waits forever for
  ``min_available_nodes``; the round loop in server/app.py does a bounded quorum wait instead)
  and is reproducible: sites are drawn by name with a seed from (seed, round), not node id;
* per-site metric rows (``msg.metadata.src_node_id`` → site name via ``SiteRegistry``);
* failed, vanished or malformed replies reported by site name and left out, so the round
  completes with the rest (stock FedAvg skips the *whole* aggregation on one bad reply);
* every train update screened before aggregation, whatever the strategy (server/screening.py:
  names, shapes, dtypes, finiteness, num-examples, update norm): a rejected update is named in
  the metrics and left out, and a site rejected ``drop_after_rejections`` rounds running is no
  longer sampled;
* replies aggregated in site-name order and cast back to the global dtypes, so a resumed run
  reproduces an uninterrupted one;
* ``state_dict``/``load_state_dict`` for the server optimisers (FedAdam m, v; FedAvgM momentum)
  in checkpoints; they step parameters only, buffers (running statistics) take the plain mean;
* weights packed into one float32 vector per message (common/packing.py: Flower moves every
  tensor as its own object), unpacked again before aggregation.
"""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.federation import AGGREGATE_SITE, site_seed
from common.fedmetrics import (
    EVAL_METRIC_KEYS,
    TRAIN_METRIC_KEYS,
    aggregate_site_metrics,
)
from common.packing import layout_to_json, pack
from common.screening import RejectionStreaks, ScreenLimits
from server.part_weights import reweight_parts
from server.registry import SiteRegistry
from server.screening import screen_train_replies

log = logging.getLogger(__name__)

#: (round, phase, site, metric, value) — server/state.py MetricRow fields.
Recorder = Callable[[int, str, str, str, float], None]


def array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """NumPy arrays as an ArrayRecord, C-ordered; np.asarray(order="C") keeps 0-d arrays 0-d
    (np.ascontiguousarray would make them 1-d)."""
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in state.items()})


class SiteAware:
    """Mixin for a Flower message strategy; see the module docstring. Call ``attach`` after
    construction."""

    registry: SiteRegistry
    recorder: Recorder
    seed: int
    norm_keys: frozenset[str] = frozenset()
    buffer_keys: frozenset[str] = frozenset()  # statistics: a server optimiser leaves them to the mean
    current: dict[str, np.ndarray]
    part_weights: bool = False  # server/part_weights.py: decoder by n_decoder, head by n_head
    step_batch: int | None = None  # FedNova: the run's batch size, to count each site's local steps

    def attach(self, registry: SiteRegistry, recorder: Recorder, seed: int, packed: bool = True) -> "SiteAware":
        self.registry, self.recorder, self.seed, self.packed = registry, recorder, seed, packed
        self.current = {}
        self._sent: dict[str, list[int]] = {"train": [], "evaluate": []}
        self._outbox: dict[str, list[Message]] = {}
        self.last_site_metrics: dict[str, dict[str, dict[str, float]]] = {"train": {}, "evaluate": {}}
        self.last_failures: dict[str, dict[str, str]] = {"train": {}, "evaluate": {}}
        self.last_rejections: dict[str, str] = {}
        self.limits, self.streaks = ScreenLimits(), RejectionStreaks(3)  # build_strategy sets both
        return self

    # ------------------------------------------------------------------ selection
    def select(self, server_round: int, phase: str, fraction: float, grid: Grid) -> list[int]:
        """Connected registered sites, ``max(min nodes, floor(fraction·n))`` of them drawn by
        name with a (seed, round, phase) seed; never waits."""
        sites = self.registry.connected(grid.get_node_ids())
        minimum = self.min_train_nodes if phase == "train" else self.min_evaluate_nodes  # type: ignore[attr-defined]
        k = min(len(sites), max(minimum, math.floor(fraction * len(sites))))
        rng = random.Random(site_seed(self.seed, server_round, phase))
        chosen = sorted(rng.sample(sorted(sites), k))
        log.info("round %d %s: sites %s", server_round, phase, chosen)
        return [sites[s] for s in chosen]

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  nodes: list[int], message_type: str) -> list[Message]:
        config["server-round"] = server_round
        if self.packed:
            flat, layout = pack({k: a.numpy() for k, a in arrays.items()})
            config["packing"] = layout_to_json(layout)
            arrays = array_record(flat)
        record = RecordDict({"arrays": arrays, "config": config})
        messages = [Message(content=record, message_type=message_type, dst_node_id=n,
                            group_id=str(server_round)) for n in nodes]
        self._outbox[message_type] = messages  # the grid fills in their ids when it pushes them
        return messages

    def _reply_source(self, phase: str, msg: Message) -> int:
        """The site a reply stands for. An error the SuperLink makes for a vanished node comes
        from the SuperLink's own id (1), so such replies are traced back through the id of the
        message they answer."""
        node = msg.metadata.src_node_id
        if node in self._sent.get(phase, []):
            return node
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._outbox.get(phase, [])}
        return sent.get(msg.metadata.reply_to_message_id, node)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = {k: a.numpy() for k, a in arrays.items()}
        if hasattr(self, "current_arrays"):  # FedOpt family: delta_t is taken against these
            self.current_arrays = {k: v for k, v in self.current.items() if k not in self.norm_keys}
        if hasattr(self, "proximal_mu"):  # FedProx: the sites add the (squared) proximal term
            config["proximal-mu"] = float(self.proximal_mu)
        nodes = self.select(server_round, "train", self.fraction_train, grid)  # type: ignore[attr-defined]
        self._sent["train"] = nodes
        return self._messages(server_round, arrays, config, nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        nodes = self.select(server_round, "evaluate", self.fraction_evaluate, grid)  # type: ignore[attr-defined]
        self._sent["evaluate"] = nodes
        return self._messages(server_round, arrays, config, nodes, MessageType.EVALUATE)

    # ------------------------------------------------------------------ screening
    def expected_array_keys(self) -> set[str]:
        return {k for k in self.current if k not in self.norm_keys}

    def _screen(self, server_round: int, phase: str, replies: Iterable[Message]) -> list[Message]:
        """Keep well-formed (and, for train, screened) replies sorted by site, record their
        metrics per site, and report every failed, malformed, missing or rejected site by name.
        ``last_failures[phase]`` holds every site left out and why; ``last_rejections`` the
        train updates rejected by screening."""
        schema = TRAIN_METRIC_KEYS if phase == "train" else EVAL_METRIC_KEYS
        failures: dict[str, str] = {}
        valid: dict[str, Message] = {}
        answered: set[int] = set()
        for msg in replies:
            node = self._reply_source(phase, msg)
            answered.add(node)
            site = self.registry.name(node)
            if msg.has_error():
                failures[site] = f"error reply: {msg.error.reason}"
                continue
            problem = _schema_problem(msg, schema)
            if problem:
                failures[site] = f"malformed reply ({problem})"
                continue
            valid[site] = msg
        for node in self._sent.get(phase, []):
            if node not in answered:
                failures[self.registry.name(node)] = "no reply before the round timeout"
        rejections: dict[str, tuple[tuple[str, str], ...]] = {}
        if phase == "train":
            screened = screen_train_replies(server_round, valid, self.reference(), self.registry.declared, self.limits)
            valid, rejections = screened.accepted, screened.verdict.rejected
            self.last_rejections = {s: screened.verdict.reason(s) for s in rejections}
        per_site: dict[str, dict[str, float]] = {}
        for site, msg in sorted(valid.items()):
            metrics = {k: float(v) for k, v in msg.content["metrics"].items()}  # type: ignore[arg-type]
            per_site[site] = metrics
            for key in schema:
                self.recorder(server_round, phase, site, key, metrics[key])
        for site, why in sorted(failures.items()):
            log.warning("round %d %s: site %s left out: %s", server_round, phase, site, why)
            self.recorder(server_round, phase, site, "failed", 1.0)
        for site, reasons in rejections.items():
            failures[site] = "update rejected: " + "; ".join(text for _c, text in reasons)
            self.recorder(server_round, phase, site, "rejected", 1.0)
            for code in dict(reasons):
                self.recorder(server_round, phase, site, f"rejected_{code}", 1.0)
        if phase == "train":
            self._count_rejections(server_round, per_site, rejections)
        if per_site:
            for key, value in aggregate_site_metrics(per_site, phase).items():
                self.recorder(server_round, phase, AGGREGATE_SITE, key, value)
        self.recorder(server_round, phase, AGGREGATE_SITE, "sites_ok", float(len(per_site)))
        self.last_site_metrics[phase], self.last_failures[phase] = per_site, failures
        return [valid[s] for s in sorted(valid)]

    def reference(self) -> dict[str, np.ndarray]:
        """The global weights a train reply must match: those sent, less FedBN's norm layers."""
        return {k: self.current[k] for k in self.expected_array_keys()}

    def _count_rejections(self, server_round: int, accepted: Iterable[str],
                          rejections: Mapping[str, Any]) -> None:
        """Drop the sites whose update was rejected ``drop_after`` rounds running."""
        for site in self.streaks.update(accepted, rejections):
            self.registry.drop(site)
            self.recorder(server_round, "train", site, "dropped", 1.0)
            log.error("round %d: site %s dropped: its update was rejected %d rounds running; it is no "
                      "longer sampled in this run", server_round, site, self.streaks.drop_after)

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self._screen(server_round, "train", replies)
        if not valid:
            return None, None
        if self.part_weights:
            changed = reweight_parts(valid, self.current, batch_size=self.step_batch, buffers=self.buffer_keys)
            for prefix, factors in sorted(changed.items()):
                log.info("round %d: %s* updates weighted per site by what trained them%s (factors %s)",
                         server_round, prefix, " and their local steps" if self.step_batch else "",
                         [round(f, 3) for f in factors])
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        if arrays is None:
            return None, metrics
        merged = dict(self.current)  # FedBN: the keys nobody sent keep their global value
        for key, array in arrays.items():
            merged[key] = array.numpy().astype(self.current[key].dtype, copy=False)
        self._server_step(merged, valid)
        return array_record(merged), metrics

    def _server_step(self, merged: dict[str, np.ndarray], replies: list[Message]) -> None:
        """Change the aggregate ``merged`` in place (server optimisers); none for a mean."""

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = self._screen(server_round, "evaluate", replies)
        return super().aggregate_evaluate(server_round, valid) if valid else None  # type: ignore[misc]

    # ------------------------------------------------------------------ server state
    def state_dict(self) -> dict[str, Any]:
        """Server-optimiser state for checkpoints (FedAdam's moments, FedAvgM's momentum), as tensors:
        they survive ``torch.load(weights_only=True)`` with their shapes, 0-d included."""
        out: dict[str, Any] = {}
        for name in ("m_t", "v_t", "momentum"):
            value = getattr(self, name, None)
            if value:
                out[name] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
        if self.streaks.counts or self.registry.dropped:  # rejection streaks and dropped sites
            out["screening"] = {**self.streaks.state_dict(), "dropped": sorted(self.registry.dropped)}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("m_t", "v_t", "momentum"):
            if name in state:
                setattr(self, name, {k: _numpy(v) for k, v in state[name].items()})
        if "screening" in state:
            self.streaks.load_state_dict(state["screening"])
            self.registry.dropped.update(str(s) for s in state["screening"].get("dropped", []))


def _numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _schema_problem(msg: Message, schema: tuple[str, ...]) -> str:
    """Why a reply's metrics can't be used ('' when they can): wrong record count or keys, NaN.
    (A train reply's arrays are screened separately: server/screening.py.)"""
    content = msg.content
    if "metrics" not in content.metric_records or len(content.metric_records) != 1:
        return "expected one MetricRecord 'metrics'"
    metrics = content["metrics"]
    if set(metrics.keys()) != set(schema):
        return f"metric keys differ from the schema: {sorted(set(metrics.keys()) ^ set(schema))}"
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values()):
        return "non-finite or non-scalar metric"
    return ""
