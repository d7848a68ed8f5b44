"""The one door for configuration: named presets, files and ``section.key=value`` overrides,
parsed once into a frozen ``Settings``.

A settings document is a YAML mapping with the sections ``data, model, loss, train, privacy,
inference`` (the ``ExperimentConfig``), ``federation`` (``FederationConfig``) and ``sim``
(``SimConfig``, the simulation's protocol options), plus two optional keys: ``preset`` (a preset
name or a file to start from; each document inherits from at most one) and ``description``. The
presets ship inside the package (``common/presets/*.yaml``); a run folder's ``config.yaml`` is a
fully resolved document and loads again as it is. Every key and value is checked before a run
folder exists, and every error names the key and the file it came from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from common.config import (
    MEAN_STRATEGIES, STRATEGIES, ConfigError, ExperimentConfig, FederationConfig, from_dict, load_yaml, to_dict,
)

PRESET_DIR = Path(__file__).resolve().parent / "presets"
#: The preset of real-data runs everywhere (simulation, deployment, local trial).
DEFAULT_REAL_PRESET = "recommended"
#: The preset of the simulation on its embedded synthetic centres.
DEFAULT_SYNTHETIC_PRESET = "cpu-fast"
EXPERIMENT_SECTIONS: tuple[str, ...] = ("data", "model", "loss", "train", "privacy", "inference")
SECTIONS: tuple[str, ...] = (*EXPERIMENT_SECTIONS, "federation", "sim")
_META_KEYS = ("preset", "description")
_MAX_DEPTH = 8  # a longer inheritance chain is a mistake, not a design

#: Protocol groups of the simulation: the paper protocol, federated leave-one-centre-out (one
#: protocol per strategy, the same strategies as deployment), and the reference rows.
PROTOCOL_GROUPS: dict[str, tuple[str, ...]] = {
    "paper": ("paper",),
    "federated": STRATEGIES,
    "reference": ("local", "pooled"),
    "pooled": ("pooled",),  # the reference's pooled rows alone (the local-only ones cost the most)
}
BASE_ARMS: tuple[str, ...] = ("seg_only", "multitask", "consistency")
#: The consistency arm with its gradient routed to the mask, the classifier or both (sim.arms).
CONSISTENCY_GRAD_ARMS: tuple[str, ...] = ("consistency-mask", "consistency-classifier",
                                          "consistency-both")
SELECTIONS: tuple[str, ...] = ("best_val", "last")
#: Where federated and pooled units are tested: a held-out centre (leave-one-centre-out) or, with
#: every centre training, each centre's own held-back split (FLamby's per-centre test sets).
TEST_LAYOUTS: tuple[str, ...] = ("held_out", "own_split")


@dataclass(frozen=True)
class SimConfig:
    """What ``python -m sim.leave_center_out`` runs; the recipe itself (epochs, rounds, loss,
    inference) lives in the other sections."""

    protocols: tuple[str, ...] = ("paper", "federated", "reference")  # of PROTOCOL_GROUPS
    arms: tuple[str, ...] = BASE_ARMS  # paper-protocol arms
    fed_arms: tuple[str, ...] = ("consistency",)  # arms of the federated and reference protocols
    strategies: tuple[str, ...] = ("fedavg", "fedprox")  # federated protocols to run
    train_centre: str | None = None  # paper protocol; None: BrEaST (real) / first synthetic centre
    data_root: str | None = None  # folder of the real centres; None: embedded synthetic centres
    centres: tuple[str, ...] = ()  # subset of the centres found (empty: all)
    held_out: tuple[str, ...] = ()  # federated/pooled: centres to hold out (empty: each in turn)
    test_on: str = "held_out"  # federated/pooled: of TEST_LAYOUTS
    synthetic_n: int = 48  # cases per synthetic centre
    seeds: tuple[int, ...] = (0,)  # training seeds (init, data order); splits stay fixed
    lambda_sweep: tuple[float, ...] = ()  # extra paper arms with these consistency weights
    ablate_features: bool = False  # extra paper arms leaving each prior feature out in turn
    reference_test_fraction: float = 0.25  # a centre's own test split (local-only diagonal, own_split)
    bootstrap: int = 1000  # bootstrap resamples of every confidence interval
    examples_per_centre: int = 2  # overlay examples per test centre in the report
    epsilons: tuple[float, ...] = ()  # DP-SGD target ε of extra arms; inf = the arm without DP
    dp_arms: tuple[str, ...] = ("consistency",)  # arms that get the DP variants
    selection: str = "best_val"  # centralised model selection: best_val | last
    workers: int = 1  # processes that train centralised units side by side (sim/workers.py)
    # paper protocol, public → private: a model trained without DP on these centres (sim/public.py)
    # is every arm's model.init_from; they are no longer test centres
    public_centres: tuple[str, ...] = ()
    public_epochs: int | None = None  # epochs of that pretraining; None: train.epochs
    public_lr: float | None = None  # its peak learning rate; None: train.lr (a DP fine-tune wants its own)
    label_only_centres: tuple[str, ...] = ()  # their training masks hidden: labels-only hospitals

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOL_GROUPS]
        if bad:
            raise ConfigError(f"sim.protocols: unknown {bad}; known: {list(PROTOCOL_GROUPS)}")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad:
            raise ConfigError(f"sim.strategies: unknown {bad}; known: {list(STRATEGIES)}")
        for name in ("arms", "fed_arms", "dp_arms"):
            bad = [a for a in getattr(self, name) if a not in BASE_ARMS + CONSISTENCY_GRAD_ARMS]
            if bad:
                raise ConfigError(f"sim.{name}: unknown arm(s) {bad}; known: "
                                  f"{list(BASE_ARMS + CONSISTENCY_GRAD_ARMS)} "
                                  "(ablations and the λ sweep have their own keys)")
        if self.synthetic_n < 4:
            raise ConfigError(f"sim.synthetic_n: must be >= 4, got {self.synthetic_n}")
        if not self.seeds:
            raise ConfigError("sim.seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"sim.seeds: repeated seed in {list(self.seeds)}")
        if not 0.0 < self.reference_test_fraction < 1.0:
            raise ConfigError(f"sim.reference_test_fraction: must be in (0, 1), got "
                              f"{self.reference_test_fraction}")
        if self.bootstrap < 1 or self.examples_per_centre < 0:
            raise ConfigError("sim.bootstrap must be >= 1 and sim.examples_per_centre >= 0")
        if any(not e > 0 for e in self.epsilons):
            raise ConfigError(f"sim.epsilons: every ε must be > 0 (inf: no DP), got {list(self.epsilons)}")
        if any(not (math.isfinite(v) and v >= 0) for v in self.lambda_sweep):
            raise ConfigError(f"sim.lambda_sweep: every λ must be finite and >= 0, got {list(self.lambda_sweep)}")
        if self.workers < 1:
            raise ConfigError(f"sim.workers: must be >= 1, got {self.workers}")
        if self.public_epochs is not None and self.public_epochs < 1:
            raise ConfigError(f"sim.public_epochs: must be >= 1 (or null), got {self.public_epochs}")
        if self.public_lr is not None and not (math.isfinite(self.public_lr) and self.public_lr > 0):
            raise ConfigError(f"sim.public_lr: must be a finite number > 0 (or null), got {self.public_lr}")
        if self.test_on not in TEST_LAYOUTS:
            raise ConfigError(f"sim.test_on: {self.test_on!r} not one of {list(TEST_LAYOUTS)}")
        if self.test_on == "own_split" and self.held_out:
            raise ConfigError(f"sim.held_out {list(self.held_out)}: with sim.test_on own_split every centre "
                              "trains; hold none out")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"sim.selection: {self.selection!r} not one of {list(SELECTIONS)}")


@dataclass(frozen=True)
class Settings:
    """A whole recipe: the experiment (what a site trains and how a model predicts), the
    federation (rounds, strategy) and the simulation's protocol options."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    description: str = ""

    def __post_init__(self) -> None:
        fed = self.federation
        private = "secagg" if fed.secagg.enabled else "client_dp" if fed.client_dp.enabled else None
        bad = [s for s in self.sim.strategies if s not in MEAN_STRATEGIES]
        if private and bad:  # refused before any unit runs, not when its turn comes
            raise ConfigError(f"sim.strategies: {bad} cannot run with federation.{private}, which needs "
                              f"a mean of complete updates; use {list(MEAN_STRATEGIES)}")
        exp = self.experiment  # deployment: common.federation.spec_from_dict asks for model.init_from
        private_arms = exp.privacy.enabled or any(math.isfinite(e) for e in self.sim.epsilons)
        if (private_arms and exp.privacy.trainable == "norms" and not exp.model.init_from
                and not self.sim.public_centres):
            raise ConfigError("privacy.trainable 'norms' trains only the norm affines, biases and heads of a "
                              "model that already segments: set model.init_from (a public model file) or, "
                              "in the simulation, sim.public_centres")


# ----------------------------------------------------------------------------- presets
def list_presets() -> dict[str, str]:
    """Name → one-line description of every shipped preset."""
    out: dict[str, str] = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        out[path.stem] = str(load_yaml(path).get("description", "")).strip()
    return out


def preset_path(name: str) -> Path:
    """The shipped file of preset ``name``; ConfigError naming the known presets otherwise."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(list_presets())} "
                          "(or give the path of a YAML file)")
    return path


def _source_path(source: str | Path, base: Path | None) -> Path:
    """A preset name or a file (relative to ``base``, the including file's folder)."""
    text = str(source)
    looks_like_file = text.endswith((".yaml", ".yml")) or "/" in text or Path(text).is_file()
    if not looks_like_file:
        return preset_path(text)
    path = Path(text)
    if not path.is_absolute() and base is not None and (base / path).is_file():
        path = base / path
    if not path.is_file():
        raise ConfigError(f"{text}: no such settings file")
    return path


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two mappings: ``over`` wins; nested mappings merge key by key."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        out[key] = merge(old, value) if isinstance(value, Mapping) and isinstance(old, Mapping) else value
    return out


def resolve_document(doc: Mapping[str, Any], where: str, base: Path | None = None,
                     _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """``doc`` with its ``preset`` chain merged under it (the parent first), without meta keys
    other than the leaf's description. Unknown top-level keys are errors naming ``where``."""
    unknown = sorted(set(doc) - set(SECTIONS) - set(_META_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {[*SECTIONS, *_META_KEYS]}")
    for sec in SECTIONS:
        if sec in doc and doc[sec] is not None and not isinstance(doc[sec], Mapping):
            raise ConfigError(f"{where}: {sec}: expected a mapping, got {type(doc[sec]).__name__}")
    body = {k: dict(v or {}) for k, v in doc.items() if k in SECTIONS}
    parent = doc.get("preset")
    if parent is None:
        resolved: dict[str, Any] = {}
    else:
        if not isinstance(parent, (str, Path)) or not str(parent).strip():
            raise ConfigError(f"{where}: preset: expected a preset name or a file, got {parent!r}")
        try:
            path = _source_path(parent, base)
        except ConfigError as exc:
            raise ConfigError(f"{where}: preset: {exc}") from None
        key = str(path.resolve())
        if key in _seen or len(_seen) >= _MAX_DEPTH:
            raise ConfigError(f"{where}: preset chain loops or is deeper than {_MAX_DEPTH}: "
                              f"{' -> '.join([*_seen, key])}")
        resolved = resolve_document(load_yaml(path), str(path), path.parent, (*_seen, key))
        resolved.pop("description", None)
    resolved = merge(resolved, body)
    if "description" in doc:
        resolved["description"] = str(doc["description"])
    return resolved


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=3", "sim.seeds=[8, 9]"]`` → a nested mapping; values are YAML scalars
    or flow lists (``8,9`` is read as a list too). The key must be ``section.key[.key...]``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=3")
        if parts[0] not in SECTIONS:
            raise ConfigError(f"--set {item!r}: unknown section {parts[0]!r}; known: {list(SECTIONS)}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: cannot read the value ({exc})") from None
        if isinstance(value, str) and "," in value:
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def settings_from_dict(doc: Mapping[str, Any], where: str = "settings", base: Path | None = None) -> Settings:
    """Parse a settings document (its ``preset`` chain resolved); errors are prefixed by ``where``."""
    resolved = resolve_document(doc, where, base)
    try:
        experiment = from_dict(ExperimentConfig, {k: resolved[k] for k in EXPERIMENT_SECTIONS if k in resolved},
                               "experiment")
        return Settings(
            experiment=experiment,
            federation=from_dict(FederationConfig, resolved.get("federation"), "federation"),
            sim=from_dict(SimConfig, resolved.get("sim"), "sim"),
            description=str(resolved.get("description", "")),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {_strip_root(str(exc))}") from None


def _strip_root(text: str) -> str:
    """'experiment.train.epochs: …' → 'train.epochs: …' (sections are named as in the YAML)."""
    return text.removeprefix("experiment.").replace("experiment: ", "", 1)


def load_settings(source: str | Path | Mapping[str, Any] | None = None,
                  overrides: Sequence[str] | Mapping[str, Any] = (),
                  default: str = DEFAULT_SYNTHETIC_PRESET) -> Settings:
    """Settings from a preset name, a YAML file or a mapping (``None``: ``default``), with
    ``--set`` style overrides (strings ``section.key=value`` or a nested mapping) on top."""
    if isinstance(overrides, Mapping):
        over = dict(overrides)
    else:
        over = parse_overrides(overrides)
    if source is None:
        source = default
    if isinstance(source, Mapping):
        doc, where, base = dict(source), "settings", None
    else:
        path = _source_path(source, None)
        doc, where, base = load_yaml(path), str(path), path.parent
    where = where if not over else f"{where} (with --set {_flat(over)})"
    return settings_from_dict(merge(doc, over), where, base)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> str:
    items = []
    for k, v in tree.items():
        items.append(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else f"{prefix}{k}={v}")
    return ", ".join(items)


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    """The fully resolved document (no ``preset`` key): what a run folder's config.yaml holds."""
    out: dict[str, Any] = {"description": settings.description} if settings.description else {}
    out.update(to_dict(settings.experiment))
    out["federation"] = to_dict(settings.federation)
    out["sim"] = to_dict(settings.sim)
    return out
