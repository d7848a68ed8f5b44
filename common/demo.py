"""The federation that ``flwr run .`` runs: the ``smoke`` preset on the embedded synthetic
centres, one per simulated SuperNode.

``flwr run .`` is the first command a Flower user tries (pyproject declares ``[tool.flwr.app]``).
It gives neither a run spec nor site data, so the ServerApp and each simulated ClientApp build the
same spec from the number of SuperNodes alone; real federations start with ``flower-server``.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from common.data.synthetic import SYNTHETIC_CENTRES
from common.federation import RunSpec, SiteSpec
from common.settings import load_settings

#: Preset of the demo federation: seconds per round, no result.
DEMO_PRESET = "smoke"


def demo_root() -> Path:
    """Folder of demo run folders: ``$FEDBUS_RUNS`` or ``~/fedbus-runs``."""
    return Path(os.environ.get("FEDBUS_RUNS") or Path.home() / "fedbus-runs")


def demo_spec(n_sites: int, run_name: str = "flwr-run") -> RunSpec:
    """Spec of ``n_sites`` synthetic sites (``site-1`` … on the synthetic centres in turn)
    under ``demo_root()/run_name``; deterministic, so server and clients agree."""
    if n_sites < 1:
        raise ValueError(f"a demo federation needs at least one SuperNode, got {n_sites}")
    settings = load_settings(DEMO_PRESET)
    centres = list(SYNTHETIC_CENTRES)
    sites = tuple(
        SiteSpec(name=f"site-{i + 1}", synthetic_centre=centres[i % len(centres)],
                 synthetic_n=settings.sim.synthetic_n)
        for i in range(n_sites)
    )
    fed = dataclasses.replace(settings.federation, min_sites=n_sites)  # every SuperNode joins
    return RunSpec(experiment=settings.experiment, federation=fed, sites=sites,
                   run_dir=str(demo_root() / run_name))
