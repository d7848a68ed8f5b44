"""The federation's run folder (``common.runfolder.RunFolder``): checkpoint/resume, status and
the round metrics files (no Flower types here).

Layout of ``run_dir``:
  config.yaml     resolved RunSpec (written at start and on resume)
  checkpoint.pt   newest finished round: global weights, round, run key, strategy state
                  (FedAdam m/v), server RNG state, spec (common.checkpoint format, atomic)
  model.pt        the final global model at the end of the run (common.modelfile: what
                  fedbus-predict takes)
  metrics.csv     one row per (round, phase, site, metric, value); phase in train/evaluate/central
  metrics.jsonl   the same rows as JSON lines
  status.json     {"state": running|finished|stopped, "round": r, "message": ...}
Rows are appended after each round *before* its checkpoint; on resume rows of rounds after the
checkpoint are dropped so an interrupted round is not counted twice.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import ConfigError
from common.federation import AGGREGATE_SITE, RunSpec, run_spec_to_dict, spec_from_dict
from common.runfolder import RunFolder

log = logging.getLogger(__name__)

CHECKPOINT, STATUS, MODEL = "checkpoint.pt", "status.json", "model.pt"
METRICS_CSV, METRICS_JSONL = "metrics.csv", "metrics.jsonl"
METRIC_COLUMNS = ("round", "phase", "site", "metric", "value")
PHASES = ("train", "evaluate", "central")


@dataclass(frozen=True)
class MetricRow:
    round: int
    phase: str
    site: str
    metric: str
    value: float


@dataclass
class Resumed:
    """What a checkpoint restores."""

    round: int
    state_dict: dict[str, torch.Tensor]
    run_key: str
    strategy_state: dict[str, Any]
    spec: RunSpec


def capture_rng() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of capture_rng after a checkpoint round trip (tuples became lists, arrays tensors)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])


class ServerRunFolder(RunFolder):
    """One federation's ``run_dir`` (the spec names it; no timestamped ``create``)."""

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def write_config(self, resolved: Any) -> None:
        """A RunSpec as the document ``load_run_spec`` reads again (experiment as settings)."""
        super().write_config(run_spec_to_dict(resolved) if isinstance(resolved, RunSpec) else resolved)

    def write_status(self, state: str, server_round: int, message: str = "") -> None:
        self.write_text(STATUS, json.dumps({"state": state, "round": server_round, "message": message}) + "\n")

    def read_status(self) -> dict[str, Any]:
        return dict(self.read_json(STATUS))

    # ----------------------------------------------------------------- checkpoint
    def save(
        self,
        server_round: int,
        state_dict: Mapping[str, torch.Tensor],
        spec: RunSpec,
        run_key: str,
        strategy_state: Mapping[str, Any],
    ) -> Path:
        return save_checkpoint(
            self.checkpoint_path, state_dict, run_spec_to_dict(spec),
            round=server_round, run_key=run_key, strategy=spec.federation.strategy,
            strategy_state=dict(strategy_state), rng=capture_rng(),
        )

    def load(self, restore: bool = True) -> Resumed:
        """Read the checkpoint; ``restore`` also resets the server's RNGs to their saved state."""
        ck = load_checkpoint(self.checkpoint_path)
        extra = ck["extra"]
        if restore:
            restore_rng(extra["rng"])
        return Resumed(
            round=int(extra["round"]),
            state_dict=ck["state_dict"],
            run_key=str(extra["run_key"]),
            strategy_state=extra.get("strategy_state", {}),
            spec=spec_from_dict(ck["config"], str(self.checkpoint_path)),
        )

    def write_model(self, server_round: int, state_dict: Mapping[str, torch.Tensor], spec: RunSpec,
                    run_key: str) -> Path:
        """``model.pt`` (``common.modelfile``) of the global weights after ``server_round``, with
        the sites' training/validation counts and the largest ε any site reported."""
        from common.federation import build_experiment_model
        from common.modelfile import save_model

        model = build_experiment_model(spec.experiment)
        model.load_state_dict(dict(state_dict))
        counts: dict[str, dict[str, int]] = {}
        spent = []
        for r in self.read_metrics():  # later rounds overwrite earlier ones
            if r.phase in ("train", "evaluate") and r.metric in ("num-examples", "n_images") and r.value >= 0:
                counts.setdefault(r.site, {})["train" if r.phase == "train" else "val"] = int(r.value)
            if r.phase == "train" and r.metric == "epsilon" and r.value >= 0:
                spent.append(r.value)
        counts.pop(AGGREGATE_SITE, None)
        fed = spec.federation
        path = save_model(self.path / MODEL, model, spec.experiment, name=f"federation-{run_key}-round{server_round}",
                          data={"centres": counts}, epsilon=max(spent) if spent else None,
                          source={"kind": "deployment", "round": server_round, "rounds": fed.rounds,
                                  "strategy": fed.strategy, "run_key": run_key,
                                  "note": ("FedBN: the normalisation layers are the initial ones; "
                                           "each site keeps its own") if fed.strategy == "fedbn" else ""})
        self._write_card(path, server_round)
        return path

    def _write_card(self, path: Path, server_round: int) -> None:
        """The model card again with the round's per-site scores (sites' validation splits and
        held-out centres; no per-image data reaches the server, hence no CIs or calibration)."""
        from common.modelcard import centre_evaluation
        from common.modelfile import write_card_for

        values: dict[tuple[str, str], dict[str, float]] = {}
        for r in self.read_metrics():
            if r.round == server_round and r.phase in ("evaluate", "central") and r.site != AGGREGATE_SITE:
                values.setdefault((r.phase, r.site), {})[r.metric] = r.value
        evaluation = []
        for (phase, site), m in sorted(values.items()):
            rows = [{"metric": k, "value": m[k], "n": int(max(m.get(n, 0), 0))}  # UNDEFINED (-1): left out
                    for k, n in (("dice", "n_lesion"), ("auc", "n_images")) if m.get(k, -1.0) >= 0]
            if rows:
                evaluation.append(centre_evaluation(f"{site} ({'held-out' if phase == 'central' else 'validation'})", rows))
        if evaluation:
            write_card_for(path, evaluation, f"Federated evaluation after round {server_round}: each site's "
                                             "validation split, and held-out centres scored by the server.")

    # ----------------------------------------------------------------- metrics
    def append_metrics(self, rows: Iterable[MetricRow]) -> None:
        """Add rows to metrics.csv (value as repr(float)) and metrics.jsonl."""
        rows = list(rows)
        self.append_csv(METRICS_CSV, METRIC_COLUMNS, [_csv_row(r) for r in rows])
        self.append_jsonl(METRICS_JSONL, [_json_record(r) for r in rows])

    def read_metrics(self) -> list[MetricRow]:
        return [MetricRow(int(d["round"]), d["phase"], d["site"], d["metric"], float(d["value"]))
                for d in self.read_csv(METRICS_CSV)]

    def truncate_metrics(self, after_round: int) -> int:
        """Drop rows of rounds > after_round from both files (each rewritten atomically);
        returns how many were dropped."""
        rows = self.read_metrics()
        kept = [r for r in rows if r.round <= after_round]
        if len(kept) == len(rows):
            return 0
        self.write_csv(METRICS_CSV, METRIC_COLUMNS, [_csv_row(r) for r in kept])
        self.write_jsonl(METRICS_JSONL, [_json_record(r) for r in kept])
        return len(rows) - len(kept)


def _csv_row(r: MetricRow) -> tuple[Any, ...]:
    return (r.round, r.phase, r.site, r.metric, repr(float(r.value)))


def _json_record(r: MetricRow) -> dict[str, Any]:
    return {c: getattr(r, c) for c in METRIC_COLUMNS}


#: Federation settings that change results; a resumed run must match the checkpoint in these.
_RESULT_FIELDS = ("local_epochs", "strategy", "proximal_mu", "fraction_train", "server_lr",
                  "server_momentum")


def check_resumable(current: RunSpec, saved: RunSpec, where: str) -> None:
    """Refuse to continue a run under settings that would change its results (``rounds`` and
    timeouts may differ: extending a run is the point of resuming)."""
    diffs = [f"federation.{f}" for f in _RESULT_FIELDS
             if getattr(current.federation, f) != getattr(saved.federation, f)]
    if current.experiment != saved.experiment:
        diffs.append("experiment")
    if [s.name for s in current.sites] != [s.name for s in saved.sites]:
        diffs.append("sites")
    if diffs:
        raise ConfigError(f"{where}: cannot resume, settings differ from the checkpoint: {diffs}")
