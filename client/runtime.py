"""Site-side work for one Flower message, in plain Python/torch types (client/app.py converts).

Resolves which hospital this node is and where its data lies, runs local training or
evaluation through ``common/`` and keeps FedBN's site-local normalisation layers on disk.
Identity comes from ``node_config``: in deployment the SuperNode's ``--node-config`` keys
(NODE_KEYS); in simulation Flower sets only ``partition-id``/``num-partitions``, which index
``RunSpec.sites``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from common.atomic import atomic_write
from common.config import (
    STRATEGIES,
    ConfigError,
    ExperimentConfig,
    from_dict,
    replace,
)
from common.data import exclusions_from_node
from common.demo import demo_spec
from common.device import resolve_device, set_threads
from common.federation import (
    RunSpec,
    SiteSpec,
    build_experiment_model,
    norm_keys,
    site_seed,
    state_is_finite,
)
from common.fedmetrics import eval_metrics, train_metrics
from common.inference import evaluate
from common.losses import trained_parts
from common.privacy import PrivacySession
from common.schedule import RunPosition
from common.site_privacy import NODE_KEYS as SITE_PRIVACY_KEYS
from common.sitedata import load_site_tensors
from common.train import train_local

log = logging.getLogger(__name__)

#: node_config keys understood in deployment (values are TOML literals on the command line).
NODE_KEYS = (
    "site", "data-path", "data-format", "synthetic-centre", "synthetic-n", "cache-dir",
    "state-dir", "device", "num-threads", "data-exclude", "skip-invalid", *SITE_PRIVACY_KEYS,
)
_FEDBN_KEEP = 2  # norm-state files kept per run: the current and the previous round


class SiteError(RuntimeError):
    """The only exception text that leaves a site: error class and site name, no paths."""


@dataclass(frozen=True)
class SiteContext:
    """A resolved site: its data, the experiment to run, and where site-local state lives."""

    site: SiteSpec
    experiment: ExperimentConfig
    cache_dir: str | None
    state_dir: Path


@dataclass(frozen=True)
class RoundConfig:
    """What the server asks for in one message (``ConfigRecord`` "config", keys with dashes),
    parsed by the same ``from_dict`` as every other config; the record's "experiment" is parsed
    apart, and keys Flower's strategies add for themselves are not ours to check."""

    server_round: int = 0  # 1-based round; 0 in the query message
    local_epochs: int = 1  # epochs this round trains
    strategy: str = "fedavg"  # the run's strategy (FedBN keeps norm layers at the site)
    proximal_mu: float = 0.0  # FedProx μ
    run_key: str = "default"  # names the run in site-local state (FedBN norms, DP accountant)
    num_rounds: int = 0  # rounds of the whole run; 0: not sent, and then a site cannot train

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.run_key):
            raise ConfigError(f"server config: invalid run-key {self.run_key!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"server config: strategy {self.strategy!r} not one of {STRATEGIES}")
        if self.local_epochs < 1 or self.server_round < 0 or self.num_rounds < 0 or not self.proximal_mu >= 0:
            raise ConfigError(f"server config: out of range: {self}")

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> "RoundConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k.replace("-", "_"): v for k, v in config.items() if k.replace("-", "_") in fields}
        return from_dict(cls, values, "server config")

    def position(self) -> RunPosition:
        """Where this round's local training sits in the run: the LR schedule and λ's warm-up
        count the run's epochs, (round − 1) × local epochs before this round."""
        try:
            return RunPosition.for_round(self.server_round, self.num_rounds, self.local_epochs)
        except ValueError as err:
            raise ConfigError(f"server config: cannot place the round in the run: {err}") from None


def resolve_site(
    node_config: Mapping[str, Any],
    spec: RunSpec | None = None,
    server_experiment: str | None = None,
) -> SiteContext:
    """Which site this node is, from node_config (deployment) or partition-id (simulation).

    The experiment is the one the server sent (``server_experiment``, JSON of
    ``to_dict(ExperimentConfig)``) so every site builds the same model, else the spec's
    (simulation): a site has no experiment of its own. Site-local settings always win: device and
    threads from node_config; ``pretrained_path`` and ``init_from`` are dropped (weights arrive in the message,
    and a server must not make a site open files of its choosing). The site's own privacy terms
    (node_config "privacy-*", common/site_privacy.py) are applied per train message by
    client/app.py, so a coordinator can neither raise a hospital's budget nor switch its DP off.
    """
    if "partition-id" in node_config and "site" not in node_config:
        if spec is None:  # `flwr run .`: the demo federation the ServerApp runs too
            spec = demo_spec(int(node_config.get("num-partitions", 1)))
        pid, parts = int(node_config["partition-id"]), int(node_config.get("num-partitions", -1))
        if parts != len(spec.sites) or not 0 <= pid < len(spec.sites):
            raise ConfigError(
                f"simulation has {parts} supernodes but the spec lists {len(spec.sites)} sites"
            )
        site = spec.sites[pid]
        cache_dir = spec.cache_dir
        state_dir = Path(spec.run_dir) / "site-state" / site.name
    elif "site" in node_config:
        site = SiteSpec(
            name=str(node_config["site"]),
            data_path=_opt_str(node_config.get("data-path")),
            data_format=str(node_config.get("data-format", "auto")),
            synthetic_centre=_opt_str(node_config.get("synthetic-centre")),
            synthetic_n=int(node_config.get("synthetic-n", 64)),
            strict=not bool(node_config.get("skip-invalid", False)),  # --skip-invalid: skip and log bad files
            exclude=exclusions_from_node(str(node_config.get("data-exclude", ""))),
        )
        cache_dir = _opt_str(node_config.get("cache-dir")) or (spec.cache_dir if spec else None)
        state_dir = Path(
            _opt_str(node_config.get("state-dir"))
            or Path.home() / ".cache" / "fedbus" / "site-state" / site.name
        )
    else:
        raise ConfigError(f"node_config names no site: give 'site' (and 'data-path'); known keys {NODE_KEYS}")

    if server_experiment:
        experiment = from_dict(ExperimentConfig, json.loads(server_experiment), "server experiment")
    elif spec is not None:
        experiment = spec.experiment
    else:
        raise ConfigError("the server's message carries no experiment (is the coordinator fedbus's ServerApp?)")
    overrides: dict[str, Any] = {"model.pretrained_path": None, "model.init_from": None, "train.progress": False}
    if node_config.get("device"):
        overrides["train.device"] = str(node_config["device"])
    if node_config.get("num-threads"):
        overrides["train.num_threads"] = int(node_config["num-threads"])
    return SiteContext(site, replace(experiment, **overrides), cache_dir, state_dir)


def privacy_state_path(state_dir: Path) -> Path:
    """The site-local accountant file (one per site: the budget covers every run on its data)."""
    return Path(state_dir) / "privacy" / "accountant.json"


def _opt_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def site_info(ctx: SiteContext, app_version: str) -> dict[str, Any]:
    """Query reply: the site's name and split sizes (counts only)."""
    train, val = load_site_tensors(ctx.site, ctx.experiment.data, ctx.cache_dir)
    return {"site": ctx.site.name, "num-train": len(train), "num-val": len(val), "app-version": app_version}


def _model(ctx: SiteContext, global_state: Mapping[str, torch.Tensor], local_norms: Mapping[str, torch.Tensor] | None) -> torch.nn.Module:
    """Fresh model holding the global weights, with this site's own norm layers when FedBN."""
    exp = ctx.experiment
    model = build_experiment_model(exp)
    model.load_state_dict(dict(global_state), strict=True)
    if local_norms:
        missing = set(local_norms) - set(model.state_dict())
        if missing:
            raise ValueError(f"stored FedBN state has unknown keys {sorted(missing)[:3]}")
        model.load_state_dict(dict(local_norms), strict=False)
    return model


@dataclass
class TrainOutcome:
    reply_state: dict[str, torch.Tensor]  # what goes back to the server
    local_norms: dict[str, torch.Tensor] | None  # FedBN: what stays at the site
    metrics: dict[str, float]


def train_round(
    ctx: SiteContext,
    global_state: Mapping[str, torch.Tensor],
    rc: RoundConfig,
    local_norms: Mapping[str, torch.Tensor] | None = None,
    privacy: PrivacySession | None = None,
) -> TrainOutcome:
    """Local training from the global weights; seed derived from (seed, round, site) so a resumed
    run repeats it exactly. ``privacy``: a ``common.privacy.PrivacySession`` for DP-SGD, whose
    cumulative ε and this round's share are reported (None: DP off, both UNDEFINED)."""
    exp = ctx.experiment
    position = rc.position()  # before any work: a round that cannot be placed is refused
    set_threads(exp.train.num_threads)
    train, _val = load_site_tensors(ctx.site, exp.data, ctx.cache_dir)
    if len(train) == 0:
        raise ValueError("no training images at this site")
    train = train.without_negative_only_masks()  # labels only: no segmentation from normals alone
    fedbn = rc.strategy == "fedbn"
    model = _model(ctx, global_state, local_norms if fedbn else None)
    start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seed = site_seed(exp.train.seed, rc.server_round, ctx.site.name)
    train_cfg = replace(exp.train, epochs=rc.local_epochs, seed=seed)
    mu = rc.proximal_mu if rc.strategy == "fedprox" else 0.0
    device = resolve_device(exp.train.device)
    result = train_local(  # proximal_mu is explicit: None would fall back to train.proximal_mu
        model, train, train_cfg, exp.loss,
        global_state=start_state if mu > 0 else None, proximal_mu=mu,
        privacy=privacy, device=device, augment=exp.data.train_augmentation, desc=ctx.site.name,
        position=position,
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not state_is_finite(state):
        raise FloatingPointError("local training diverged (non-finite weights)")
    kept: dict[str, torch.Tensor] | None = None
    if fedbn:
        nkeys = norm_keys(model)
        kept = {k: v for k, v in state.items() if k in nkeys}
        state = {k: v for k, v in state.items() if k not in nkeys}
    spent = privacy.metrics() if privacy is not None else {}
    metrics = train_metrics(
        result.num_examples, result.loss, result.parts, result.steps, result.seconds,
        epsilon=spent.get("epsilon"), epsilon_round=spent.get("epsilon_round"),
        **trained_parts(train, exp.loss),
    )
    log.info("site %s round %d: trained on %d images, loss %.4f (%.1fs)", ctx.site.name,
             rc.server_round, result.num_examples, result.loss, result.seconds)
    return TrainOutcome(state, kept, metrics)


def evaluate_round(
    ctx: SiteContext,
    global_state: Mapping[str, torch.Tensor],
    rc: RoundConfig,
    local_norms: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Global model (with this site's norm layers under FedBN) on the site's validation split."""
    exp = ctx.experiment
    set_threads(exp.train.num_threads)
    _train, val = load_site_tensors(ctx.site, exp.data, ctx.cache_dir)
    t0 = time.perf_counter()
    if len(val) == 0:  # tiny site: nothing to score; every metric UNDEFINED, counts 0
        return eval_metrics({"n_images": 0, "n_lesion": 0}, 0, time.perf_counter() - t0)
    model = _model(ctx, global_state, local_norms if rc.strategy == "fedbn" else None)
    result = evaluate(model, val, exp.inference, batch_size=exp.train.batch_size,
                      device=resolve_device(exp.train.device))
    n_malignant = int(val.malignant.sum().item())
    return eval_metrics(result.summary, n_malignant, time.perf_counter() - t0)


# ------------------------------------------------------------ FedBN site-local state on disk
def _norm_dir(state_dir: Path, run_key: str) -> Path:
    return state_dir / run_key / "fedbn"


def save_local_norms(state_dir: Path, run_key: str, server_round: int, norms: Mapping[str, torch.Tensor]) -> Path:
    """Atomically store this round's norm layers; keep the newest ``_FEDBN_KEEP`` rounds so a
    server resuming from the previous round still finds the state it needs."""
    folder = _norm_dir(state_dir, run_key)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round_{server_round:05d}.pt"
    state = {k: v.detach().cpu() for k, v in norms.items()}
    atomic_write(path, lambda fh: torch.save(state, fh), binary=True)
    for old in sorted(folder.glob("round_*.pt"))[:-_FEDBN_KEEP]:
        old.unlink(missing_ok=True)
    return path


def load_local_norms(state_dir: Path, run_key: str, up_to_round: int) -> tuple[int, dict[str, torch.Tensor]] | None:
    """The newest stored norm layers from a round <= ``up_to_round`` (None: none yet)."""
    folder = _norm_dir(state_dir, run_key)
    best: tuple[int, Path] | None = None
    for path in folder.glob("round_*.pt"):
        r = int(path.stem.split("_")[1])
        if r <= up_to_round and (best is None or r > best[0]):
            best = (r, path)
    if best is None:
        return None
    return best[0], torch.load(best[1], map_location="cpu", weights_only=True)
