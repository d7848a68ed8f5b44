"""Federation run description and the framework-free pieces the Flower apps share.

A federated run is fully described by a ``RunSpec`` (experiment + federation settings + sites +
run folder), so the same object drives deployment (server CLI writes it as YAML) and simulation
(sim/ builds it in Python). The fixed metric schemas live here too: Flower skips aggregation when
sites report different metric keys, so every site always reports exactly these keys, with
sentinels instead of NaN.
"""
from __future__ import annotations

import dataclasses
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping


from common.config import (  # noqa: F401  (FederationConfig, STRATEGIES: part of a RunSpec)
    AUTO_PRETRAINED, STRATEGIES, ConfigError, ExperimentConfig, FederationConfig, from_dict, load_yaml, to_dict,
)
from common.exclusion import Exclusion

if TYPE_CHECKING:  # torch (and MONAI behind common.model) load only where a network is built:
    import torch  # the launchers parse RunSpec/SiteSpec without them (benchmarks/launcher_startup.py)
    from torch import nn

#: Site label of the federation-wide (aggregated) rows in metrics files; not a valid site name.
AGGREGATE_SITE = "all-sites"
#: Value reported for a metric that is undefined at a site (e.g. AUC with one class present).
UNDEFINED = -1.0

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_site_name(name: object) -> bool:
    """The one site-name rule: 1-64 letters, digits, '_', '.', '-', starting with a letter or
    digit, and not the aggregate label. Names become file and folder names and metric labels."""
    return (isinstance(name, str) and _SITE_NAME.fullmatch(name) is not None
            and name.lower() != AGGREGATE_SITE)


def check_site_name(name: object, where: str) -> str:
    """``name`` when it obeys ``is_site_name``; else ConfigError naming ``where`` (a file, a key)."""
    if not is_site_name(name):
        raise ConfigError(f"{where}: site name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
                          f"starting with a letter or digit (not {AGGREGATE_SITE!r})")
    return str(name)


@dataclass(frozen=True)
class SiteSpec:
    """One hospital: real data at ``data_path`` (read with ``common.data.load_site``) or a
    synthetic centre (``common.data.synthetic``) of ``synthetic_n`` cases — exactly one of them."""

    name: str
    data_path: str | None = None
    data_format: str = "auto"
    synthetic_centre: str | None = None
    synthetic_n: int = 64
    #: strict: any malformed file stops the site (deployment, after its data check); lenient:
    #: malformed files are skipped and each is logged by name (experiments on public data).
    strict: bool = True
    #: cases the site leaves out (site YAML ``data.exclude``), before strictness applies
    exclude: tuple[Exclusion, ...] = ()
    #: False: the training split's masks are hidden, a hospital with pathology labels but no
    #: drawn masks (experiments; a deployed labels-only site simply has no masks)
    masks: bool = True

    def __post_init__(self) -> None:
        check_site_name(self.name, "site")
        if (self.data_path is None) == (self.synthetic_centre is None):
            raise ConfigError(
                f"site {self.name!r}: give exactly one of data_path or synthetic_centre"
            )
        if self.synthetic_n < 1:
            raise ConfigError(f"site {self.name!r}: synthetic_n must be >= 1")


@dataclass(frozen=True)
class RunSpec:
    """Everything a federated run needs. ``sites`` are the training sites (their order is the
    simulation partition id); ``central_test`` are held-out centres the server evaluates each
    round; ``cache_dir`` holds preprocessed tensors (never leaves the machine it is on)."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    sites: tuple[SiteSpec, ...] = ()
    run_dir: str = "runs/federation"
    central_test: tuple[SiteSpec, ...] = ()
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        names = [s.name for s in self.sites] + [s.name for s in self.central_test]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"run spec: duplicate site name(s) {dupes}")

    def site(self, name: str) -> SiteSpec:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


_SPEC_KEYS = ("experiment", "sites", "run_dir", "central_test", "cache_dir")


def spec_from_dict(data: Mapping[str, Any], where: str = "run spec", base: Path | None = None) -> RunSpec:
    """Parse a run-spec document: ``experiment`` is a settings document (``common.settings``:
    a ``preset`` plus overrides, or fully resolved), the rest names the sites and folders.
    Every error names ``where``; a deployment's site list must be non-empty and hold the quorum."""
    from common.settings import settings_from_dict

    unknown = sorted(set(data) - set(_SPEC_KEYS))
    if unknown:
        hint = " (federation settings go under experiment:)" if "federation" in unknown else ""
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {list(_SPEC_KEYS)}{hint}")
    doc = data.get("experiment") or {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where}: experiment: expected a settings mapping such as {{preset: recommended}}")
    settings = settings_from_dict(doc, f"{where}: experiment", base)
    rest = {k: v for k, v in data.items() if k != "experiment"}
    try:
        spec = from_dict(RunSpec, rest, where)
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(where) else f"{where}: {text}") from None
    if not spec.sites:
        raise ConfigError(f"{where}: sites: list at least one training site")
    exp = settings.experiment
    if exp.privacy.enabled and exp.privacy.trainable == "norms" and not exp.model.init_from:
        raise ConfigError(f"{where}: experiment: privacy.trainable 'norms' fine-tunes a model that already "
                          "segments: set model.init_from to the public model file")
    if settings.federation.min_sites > len(spec.sites):
        raise ConfigError(f"{where}: experiment.federation.min_sites: {settings.federation.min_sites} is more "
                          f"than the {len(spec.sites)} listed site(s)")
    return dataclasses.replace(spec, experiment=settings.experiment, federation=settings.federation)


def load_run_spec(yaml_path: str | Path) -> RunSpec:
    """Read a RunSpec YAML. Relative paths (sites' ``data_path``, ``run_dir``, ``cache_dir``,
    ``experiment.model.pretrained_path`` and ``init_from``, a preset file) are resolved against the YAML's folder,
    so a spec file works from any working directory."""
    path = Path(yaml_path)
    base = path.resolve().parent
    spec = spec_from_dict(load_yaml(path), str(path), base)

    def absolute(p: str | None) -> str | None:
        return p if p in (None, AUTO_PRETRAINED) or Path(p).is_absolute() else str(base / p)

    def fix(site: SiteSpec) -> SiteSpec:
        return dataclasses.replace(site, data_path=absolute(site.data_path))

    model = dataclasses.replace(spec.experiment.model, pretrained_path=absolute(spec.experiment.model.pretrained_path),
                                init_from=absolute(spec.experiment.model.init_from))
    return dataclasses.replace(
        spec,
        experiment=dataclasses.replace(spec.experiment, model=model),
        sites=tuple(fix(s) for s in spec.sites),
        central_test=tuple(fix(s) for s in spec.central_test),
        run_dir=absolute(spec.run_dir),
        cache_dir=absolute(spec.cache_dir),
    )


def run_spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    """Plain YAML-safe dict with the experiment as a resolved settings document;
    ``spec_from_dict(run_spec_to_dict(s)) == s``."""
    out = to_dict(spec)
    out["experiment"] = {**out.pop("experiment"), "federation": out.pop("federation")}
    return {"experiment": out["experiment"], **{k: out[k] for k in _SPEC_KEYS if k != "experiment"}}


def site_seed(seed: int, server_round: int, site: str) -> int:
    """Seed for one site's local training in one round: stable across processes and restarts
    (crc32, not Python's salted ``hash``), so a resumed run repeats the same local updates."""
    return zlib.crc32(f"{seed}/{server_round}/{site}".encode()) & 0x7FFFFFFF


def build_experiment_model(exp: ExperimentConfig) -> nn.Module:
    """The experiment's network, built identically by the server (initial weights) and sites;
    ``model.init_from`` (strict, ``common.init_from``) sets every initial weight. Sites drop
    ``init_from`` (client/runtime.py): their weights arrive in the message."""
    from common.init_from import initialise_from
    from common.model import build_model

    model = build_model(exp.model, exp.loss.features, sign_constrained=exp.loss.sign_constrained)
    if exp.model.init_from:  # every weight comes from the file
        initialise_from(model, exp.model.init_from, tuple(exp.loss.features))
    return model


def norm_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of normalisation layers (GroupNorm/LayerNorm/BatchNorm/InstanceNorm):
    the parameters FedBN keeps local to each site."""
    from torch import nn

    norm_types = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, norm_types):
            for name in module.state_dict().keys():
                keys.add(f"{prefix}.{name}" if prefix else name)
    return frozenset(keys)


def buffer_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of buffers (the prior's running feature statistics and its update count):
    statistics to average, never to step with a server optimiser's momentum or Adam."""
    return frozenset(name for name, _ in model.named_buffers())


# ---------------------------------------------------------------- fixed metric schemas
#: Keys of every train reply. Losses are means over the last local epoch ("train_loss" is the
#: multi-task total, "proximal" the FedProx term); "epsilon" is the site's cumulative DP-SGD ε
#: over every round so far and "epsilon_round" this round's increase of it (both UNDEFINED when
#: DP is off).
TRAIN_METRIC_KEYS: tuple[str, ...] = (
    "num-examples", "n_decoder", "n_head", "train_loss", "seg", "cls", "consistency", "prior_sup",
    "proximal", "steps", "seconds", "epsilon", "epsilon_round",
)
#: Keys of every evaluate reply. Counts make each sentinel interpretable: dice/iou/hd95 are
#: UNDEFINED when n_lesion == 0, sensitivity when n_malignant == 0, specificity when
#: n_images == n_malignant, auc when either class is missing.
EVAL_METRIC_KEYS: tuple[str, ...] = (
    "num-examples", "dice", "iou", "hd95", "auc", "sensitivity", "specificity", "accuracy",
    "n_images", "n_lesion", "n_malignant", "seconds",
)


def finite_or_undefined(value: Any) -> float:
    """float(value), or UNDEFINED for None/NaN/inf (a MetricRecord must never hold NaN)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return UNDEFINED
    return v if math.isfinite(v) else UNDEFINED


def train_metrics(
    num_examples: int, loss: float, parts: Mapping[str, float], steps: int, seconds: float,
    epsilon: float | None = None, epsilon_round: float | None = None,
    n_decoder: int | None = None, n_head: int | None = None,
) -> dict[str, float]:
    """The fixed train-reply schema from one site's local training (epsilon/epsilon_round:
    None when DP is off; n_decoder / n_head: training images that give the mask decoder / the
    classifier head a gradient, None: all; their weights in server/part_weights.py)."""
    out = {
        "num-examples": float(num_examples),
        "n_decoder": float(num_examples if n_decoder is None else n_decoder),
        "n_head": float(num_examples if n_head is None else n_head),
        "train_loss": finite_or_undefined(loss),
        "steps": float(steps),
        "seconds": float(seconds),
        "epsilon": finite_or_undefined(epsilon),
        "epsilon_round": finite_or_undefined(epsilon_round),
    }
    for key in ("seg", "cls", "consistency", "prior_sup"):
        out[key] = finite_or_undefined(parts.get(key))
    out["proximal"] = finite_or_undefined(parts.get("proximal", 0.0))  # FedProx term, 0 otherwise
    return {k: out[k] for k in TRAIN_METRIC_KEYS}


def eval_metrics(summary: Mapping[str, float], n_malignant: int, seconds: float) -> dict[str, float]:
    """The fixed evaluate-reply schema from an ``EvalResult.summary``."""
    n_images = int(summary.get("n_images", 0))
    out = {k: finite_or_undefined(summary.get(k)) for k in EVAL_METRIC_KEYS}
    out.update(
        {
            "num-examples": float(n_images),
            "n_images": float(n_images),
            "n_lesion": float(int(summary.get("n_lesion", 0))),
            "n_malignant": float(n_malignant),
            "seconds": float(seconds),
        }
    )
    return out


#: Weight of each evaluate metric when pooling sites: the count its per-site value averages over.
_EVAL_WEIGHTS: dict[str, str] = {
    "dice": "n_lesion", "iou": "n_lesion", "hd95": "n_lesion", "auc": "n_images",
    "sensitivity": "n_malignant", "specificity": "n_benign", "accuracy": "n_images",
}


def aggregate_site_metrics(per_site: Mapping[str, Mapping[str, float]], phase: str) -> dict[str, float]:
    """Federation-wide metrics from per-site replies. Evaluate: each metric is weighted by the
    count it is a mean over (dice by n_lesion, sensitivity by n_malignant, ...) skipping
    UNDEFINED sites, which makes dice/sensitivity/specificity/accuracy exactly the pooled
    values; AUC is the image-weighted mean of site AUCs (pooled AUC needs the raw scores).
    Train: losses weighted by num-examples; seconds, epsilon and epsilon_round are the maximum
    over sites (the weakest guarantee of the federation)."""
    sites = list(per_site.values())
    if not sites:
        return {}
    out: dict[str, float] = {}
    if phase == "train":
        for key in TRAIN_METRIC_KEYS:
            vals = [s[key] for s in sites]
            if key in ("num-examples", "n_decoder", "n_head", "steps"):
                out[key] = float(sum(vals))
            elif key in ("seconds", "epsilon", "epsilon_round"):
                out[key] = float(max(vals))
            else:
                out[key] = _weighted([(s[key], s["num-examples"]) for s in sites])
        return out
    for key in EVAL_METRIC_KEYS:
        if key in _EVAL_WEIGHTS:
            out[key] = _weighted([(s[key], _eval_weight(s, _EVAL_WEIGHTS[key])) for s in sites])
        elif key == "seconds":
            out[key] = float(max(s[key] for s in sites))
        else:
            out[key] = float(sum(s[key] for s in sites))
    return out


def _eval_weight(site: Mapping[str, float], count: str) -> float:
    if count == "n_benign":
        return site["n_images"] - site["n_malignant"]
    return site[count]


def _weighted(pairs: list[tuple[float, float]]) -> float:
    """Weighted mean over pairs (value, weight), ignoring UNDEFINED values and zero weights."""
    kept = [(v, w) for v, w in pairs if v != UNDEFINED and w > 0]
    total = sum(w for _, w in kept)
    return float(sum(v * w for v, w in kept) / total) if total > 0 else UNDEFINED


def state_is_finite(state: Mapping[str, torch.Tensor]) -> bool:
    """True when every floating tensor of a state dict is finite (diverged sites send nothing)."""
    import torch

    return all(
        bool(torch.isfinite(t).all()) for t in state.values() if torch.is_floating_point(t)
    )
