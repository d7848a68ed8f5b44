"""Federation run description and the framework-free pieces the Flower apps share.

A federated run is fully described by a ``RunSpec`` (experiment + federation settings + sites +
run folder), so the same object drives deployment (server CLI writes it as YAML) and simulation
(sim/ builds it in Python). The replies' metric schemas are in common/fedmetrics.py.
"""
from __future__ import annotations

import dataclasses
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


def state_is_finite(state: Mapping[str, torch.Tensor]) -> bool:
    """True when every floating tensor of a state dict is finite (diverged sites send nothing)."""
    import torch

    return all(
        bool(torch.isfinite(t).all()) for t in state.values() if torch.is_floating_point(t)
    )
