"""sim.test_on own_split: every centre trains (federated or pooled) without its own held-back test
split and is tested on it; a DP unit reports the ε each site spent on that site's row."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import sim.leave_center_out as lco
from common.config import ConfigError
from common.settings import SimConfig, load_settings
from sim.protocols import plan_units
from sim.units import unit_config

SYN = list(lco.site_specs(SimConfig()))[:3]


def test_the_plan_trains_every_centre_and_tests_each_on_its_own_split() -> None:
    settings = load_settings("smoke", ["sim.protocols=[federated,pooled]", "sim.strategies=[fedavg]",
                                       "sim.test_on=own_split", "sim.epsilons=[3]"])
    plan = plan_units(settings, SYN, SYN[0])
    assert [(pu.unit.protocol, pu.unit.arm) for pu in plan] == [
        ("fedavg", "consistency"), ("fedavg", "consistency-eps3"), ("pooled", "consistency"),
        ("pooled", "consistency-eps3")]
    assert all(pu.train_sites == pu.test_sites == tuple(SYN) and pu.internal_test for pu in plan)
    assert unit_config(plan[0], settings).data.test_fraction == settings.sim.reference_test_fraction
    held = load_settings("smoke", ["sim.protocols=[federated]", "sim.strategies=[fedavg]"])
    assert all(unit_config(pu, held).data.test_fraction == 0 and not pu.internal_test
               for pu in plan_units(held, SYN, SYN[0]))


@pytest.mark.parametrize("sets, match", [(["sim.test_on=everywhere"], "sim.test_on: 'everywhere' not one of"),
                                         (["sim.test_on=own_split", f"sim.held_out={SYN[0]}"], "hold none out")])
def test_bad_layouts_are_refused(sets: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings("smoke", sets)


@pytest.mark.xdist_group("ray")  # one Ray cluster at a time under pytest -n
def test_a_private_federation_reports_each_sites_own_epsilon(tmp_path) -> None:
    out = tmp_path / "runs"
    sites = SYN[:2]
    assert lco.main(["--preset", "smoke", "--no-progress", "--protocols", "federated",
                     "--set", "sim.strategies=[fedavg]", "--set", f"sim.centres={','.join(sites)}",
                     "--set", "sim.test_on=own_split", "--set", "sim.epsilons=[3]",
                     "--set", "sim.synthetic_n=24", "--out", str(out)]) == 0
    (folder,) = sorted(out.glob("lco-*"))
    res = pd.read_csv(folder / "results.csv")
    assert set(res["test_centre"]) == set(sites) and set(res["train_set"]) == {"+".join(sites)}
    images = pd.read_csv(folder / "per_image.csv")
    n_test = images.groupby("test_centre")["case_id"].nunique()
    assert all(n_test[c] < 24 for c in sites)  # the held-back split, not the whole centre
    eps = res[res["metric"] == "epsilon"].set_index("test_centre")
    unit = folder / "federated" / f"fedavg__consistency-eps3__{'+'.join(sites)}__s0"
    for site in sites:
        ledger = json.loads((unit / "site-state" / site / "privacy" / "accountant.json").read_text())
        assert eps.loc[site, "value"] == pytest.approx(ledger["epsilon"]) and 0 < ledger["epsilon"] <= 3.0
    assert "each centre tested on its own held-back split" in (folder / "report.md").read_text()
