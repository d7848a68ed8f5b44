"""common/federation.py: run spec parsing, seeds, FedBN keys."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from common.config import ConfigError, ExperimentConfig, replace
from common.federation import (
    FederationConfig,
    RunSpec,
    SiteSpec,
    load_run_spec,
    norm_keys,
    run_spec_to_dict,
    site_seed,
    spec_from_dict,
    state_is_finite,
)


def test_federation_config_rejects_unknown_strategy_and_bad_values() -> None:
    assert FederationConfig().strategy == "fedavg"
    with pytest.raises(ConfigError, match="strategy"):
        FederationConfig(strategy="fedsgd")
    with pytest.raises(ConfigError, match="rounds"):
        FederationConfig(rounds=0)
    with pytest.raises(ConfigError, match="fraction_train"):
        FederationConfig(fraction_train=0.0)


def test_site_needs_exactly_one_data_source_and_a_safe_name() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        SiteSpec("A")
    with pytest.raises(ConfigError, match="exactly one"):
        SiteSpec("A", data_path="/x", synthetic_centre="c0")
    with pytest.raises(ConfigError, match="site name"):
        SiteSpec("../etc", data_path="/x")
    with pytest.raises(ConfigError, match="site name"):
        SiteSpec("all-sites", data_path="/x")
    assert SiteSpec("BUSI", data_path="/d").data_format == "auto"


def test_duplicate_site_names_are_refused() -> None:
    a = SiteSpec("A", synthetic_centre="c0")
    with pytest.raises(ConfigError, match="duplicate"):
        RunSpec(sites=(a,), central_test=(a,))


def test_spec_round_trips_through_a_plain_dict() -> None:
    spec = RunSpec(
        experiment=replace(ExperimentConfig(), **{"data.image_size": 32, "model.base_channels": 4}),
        federation=FederationConfig(rounds=2, strategy="fedprox", proximal_mu=0.1),
        sites=(SiteSpec("A", synthetic_centre="c0", synthetic_n=8), SiteSpec("B", data_path="/data/b")),
        run_dir="/tmp/run",
        central_test=(SiteSpec("C", synthetic_centre="c2"),),
    )
    assert spec_from_dict(run_spec_to_dict(spec)) == spec


def test_load_run_spec_resolves_relative_paths_and_names_the_file(tmp_path) -> None:
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "run.yaml"
    path.write_text(
        "experiment: {preset: smoke, federation: {rounds: 4, strategy: fedbn}}\n"
        "sites:\n  - {name: A, data_path: data/a}\n  - {name: B, synthetic_centre: c1}\n"
        "run_dir: runs/x\n"
    )
    spec = load_run_spec(path)
    assert spec.federation.rounds == 4 and spec.federation.strategy == "fedbn"
    assert spec.experiment.data.image_size == 32  # from the smoke preset
    assert spec.sites[0].data_path == str(tmp_path / "cfg" / "data" / "a")
    assert spec.run_dir == str(tmp_path / "cfg" / "runs" / "x")
    assert spec.sites[1].synthetic_centre == "c1"
    path.write_text("experiment: {model: {arch: lite0, pretrained_path: auto}, data: {image_size: 128}}\n"
                    "sites:\n  - {name: A, synthetic_centre: c0}\n  - {name: B, synthetic_centre: c1}\n")
    assert load_run_spec(path).experiment.model.pretrained_path == "auto"  # a keyword, not a file


@pytest.mark.parametrize("text, message", [
    ("experiment: {federation: {rounds: 2, strategy: nope}}\nsites: [{name: A, synthetic_centre: c0}]\n",
     "federation.strategy"),
    ("federaton: {}\n", "federaton"),
    ("federation: {rounds: 2}\nsites: [{name: A, synthetic_centre: c0}]\n", "go under experiment"),
    ("experiment: {preset: smoke}\nsites: []\n", "at least one training site"),
    ("experiment: {preset: smoke}\nsites: [{name: A, synthetic_centre: c0}]\n", "min_sites: 2 is more than"),
    ("experiment: {preset: nope}\nsites: [{name: A, synthetic_centre: c0}]\n", "unknown preset 'nope'"),
    ("experiment: {train: {epochs: 0}}\nsites: [{name: A, synthetic_centre: c0}]\n", "train.epochs"),
])
def test_a_bad_run_spec_is_refused_naming_the_file_and_key(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"run\.yaml") as exc:
        load_run_spec(path)
    assert message in str(exc.value)


def test_site_seed_is_a_fixed_function_of_seed_round_and_site() -> None:
    # CRC-32 of "0/3/BUSI" is 0xDD9983F9; masked to 31 bits. A salted hash() would differ per process.
    assert site_seed(0, 3, "BUSI") == 0xDD9983F9 & 0x7FFFFFFF == 1570341881
    assert len({site_seed(0, 3, "BUSI"), site_seed(0, 4, "BUSI"), site_seed(0, 3, "UDIAT"),
                site_seed(1, 3, "BUSI")}) == 4


def test_norm_keys_are_exactly_the_normalisation_layer_entries() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2)))
    assert norm_keys(model) == {"1.weight", "1.bias", "2.1.weight", "2.1.bias"}


def test_state_is_finite() -> None:
    assert state_is_finite({"w": torch.ones(2), "i": torch.tensor([1])})
    assert not state_is_finite({"w": torch.tensor([1.0, float("nan")])})
