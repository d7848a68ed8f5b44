"""``federation.client_dp`` and ``federation.secagg``: parsed from the settings document and
--set, and every combination they cannot run with refused before a run, with the reason."""
from __future__ import annotations

import pytest

from common.config import (
    ClientDPConfig,
    ConfigError,
    FederationConfig,
    SecAggConfig,
    replace,
)
from common.federation import SiteSpec, run_spec_to_dict, spec_from_dict
from common.settings import load_settings


def _fed(*items: str) -> FederationConfig:
    return load_settings("smoke", list(items)).federation


def test_both_are_off_by_default_and_read_from_yaml_and_set(tmp_path) -> None:
    fed = _fed()
    assert not fed.client_dp.enabled and not fed.secagg.enabled
    path = tmp_path / "exp.yaml"
    path.write_text("preset: smoke\nfederation:\n  packed_weights: false\n  client_dp:\n"
                    "    mode: server-fixed\n    noise_multiplier: 0.8\n    clipping_norm: 0.1\n", encoding="utf-8")
    dp = load_settings(path).federation.client_dp
    assert dp == ClientDPConfig(mode="server-fixed", noise_multiplier=0.8, clipping_norm=0.1)
    assert dp.enabled and not dp.client_side
    sa = _fed("federation.secagg.enabled=true", "federation.secagg.num_shares=3",
              "federation.secagg.reconstruction_threshold=2").secagg
    assert sa.enabled and (sa.num_shares, sa.reconstruction_threshold) == (3, 2)
    assert isinstance(sa.num_shares, int) and isinstance(SecAggConfig().num_shares, float)


@pytest.mark.parametrize("items, match", [
    (["federation.client_dp.mode=server-fixed"], r"packed_weights: false"),
    (["federation.client_dp.mode=server-fixed", "federation.packed_weights=false",
      "federation.strategy=fedbn"], r"strategy 'fedbn' cannot run with client-level DP"),
    (["federation.client_dp.mode=client-fixed", "federation.packed_weights=false",
      "federation.strategy=fedadam"], r"fedadam/fedavgm/fedmedian are not a mean"),
    (["federation.client_dp.mode=server-fixed", "federation.packed_weights=false",
      "federation.strategy=fedmedian"], r"cannot run with client-level DP"),
    (["federation.client_dp.mode=server-adaptive", "federation.packed_weights=false"], r"client_dp.mode: must be one of"),
    (["federation.client_dp.mode=local"], r"client_dp.mode: must be one of"),
    (["federation.client_dp.noise_multiplier=-1"], r"client_dp.noise_multiplier"),
    (["federation.client_dp.clipping_norm=0"], r"client_dp.clipping_norm"),
    (["federation.secagg.enabled=true", "federation.strategy=fedbn"], r"'fedbn' cannot run under SecAgg\+"),
    (["federation.secagg.enabled=true", "federation.strategy=fedadam"], r"cannot run under SecAgg\+"),
    (["federation.secagg.enabled=true", "federation.strategy=fedmedian"], r"cannot run under SecAgg\+"),
    (["federation.secagg.enabled=true", "federation.client_dp.mode=server-fixed",
      "federation.packed_weights=false"], r"not both at once"),
    (["federation.secagg.num_shares=2"], r"secagg.num_shares"),
    (["federation.secagg.num_shares=3", "federation.secagg.reconstruction_threshold=3"],
     r"must be less than num_shares \(3\)"),
    (["federation.secagg.reconstruction_threshold=1.5"], r"secagg.reconstruction_threshold"),
    (["federation.secagg.modulus_range=6000000000"], r"secagg.modulus_range: must be a power of 2"),
    (["federation.secagg.quantization_range=8589934592"], r"secagg.quantization_range"),
    (["federation.secagg.clipping_range=0"], r"secagg.clipping_range"),
    (["federation.secagg.shares=3"], r"unknown key\(s\) \['shares'\]"),
])
def test_refused_before_the_run_with_the_reason(items: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _fed(*items)


def test_fedprox_runs_under_either_and_replace_checks_again() -> None:
    assert _fed("federation.secagg.enabled=true", "federation.strategy=fedprox").secagg.enabled
    fed = _fed("federation.client_dp.mode=client-fixed", "federation.packed_weights=false",
               "federation.strategy=fedprox")
    assert fed.client_dp.client_side
    with pytest.raises(ConfigError, match="packed_weights"):  # the dataclass checks itself, whoever builds it
        replace(fed, packed_weights=True)


def test_run_spec_round_trips_both_sections() -> None:
    doc = {"experiment": {"preset": "smoke", "federation": {"secagg": {"enabled": True, "max_weight": 64}}},
           "sites": [{"name": "a", "synthetic_centre": "SynPL"}, {"name": "b", "synthetic_centre": "SynEG"}]}
    spec = spec_from_dict(doc)
    assert spec.federation.secagg == SecAggConfig(enabled=True, max_weight=64.0)
    assert spec_from_dict(run_spec_to_dict(spec)) == spec
    assert spec.sites[0] == SiteSpec("a", synthetic_centre="SynPL")


def test_sim_strategies_that_cannot_run_privately_are_refused_before_the_run() -> None:
    from common.settings import load_settings

    with pytest.raises(ConfigError, match=r"sim.strategies: \['fedbn'\] cannot run with federation.secagg"):
        load_settings("cpu-fast", ["federation.secagg.enabled=true", "federation.strategy=fedavg",
                                   "sim.strategies=[fedavg,fedbn]"])
    with pytest.raises(ConfigError, match=r"strategy 'fednova' cannot run under SecAgg\+"):  # FedNova scales each update
        load_settings("cpu-fast", ["federation.secagg.enabled=true"])
    fedavg = ["federation.secagg.enabled=true", "federation.strategy=fedavg", "sim.strategies=[fedavg]"]
    assert load_settings("cpu-fast", fedavg).sim.strategies == ("fedavg",)
