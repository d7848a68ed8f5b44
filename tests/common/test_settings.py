"""The one configuration door: presets, inheritance, --set overrides, and every bad input refused
with the key and the file named."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import ConfigError
from common.settings import (
    SECTIONS, Settings, list_presets, load_settings, parse_overrides, settings_from_dict, settings_to_dict,
)

PRESETS = ("smoke", "cpu-fast", "recommended", "paper", "dp")


def test_every_preset_parses_and_says_what_it_is() -> None:
    listed = list_presets()
    assert set(PRESETS) <= set(listed)
    for name in PRESETS:
        assert listed[name], f"preset {name} has no description"
        assert isinstance(load_settings(name), Settings)


def test_recommended_is_the_measured_recipe() -> None:
    s = load_settings("recommended")
    exp = s.experiment
    assert (exp.model.arch, exp.data.image_size, exp.model.mask_head, exp.train.epochs) == ("lite0", 160, "half", 66)
    assert exp.loss.consistency_grad == "classifier" and exp.train.weight_decay == 0.05
    assert exp.inference.flip and exp.inference.depth_shifts == (0.15, 0.3) and exp.inference.ensemble
    assert s.federation.rounds * s.federation.local_epochs == exp.train.epochs  # matched budgets
    assert s.federation.strategy == "fednova" and s.sim.strategies == ("fednova",)
    assert load_settings("dp").federation.strategy == "fedavg"  # FedNova not measured under DP


def test_a_preset_inherits_one_other_and_overrides_it() -> None:
    paper, rec = load_settings("paper"), load_settings("recommended")
    assert paper.experiment.model.arch == "effb1_attention"
    assert paper.experiment.train.lr == rec.experiment.train.lr  # inherited
    assert paper.experiment.data.augmentation.depth_splice == rec.experiment.data.augmentation.depth_splice
    assert paper.description != rec.description  # the leaf's own line


def test_a_file_inherits_a_preset_and_a_resolved_config_loads_again(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"preset": "smoke", "train": {"epochs": 3}, "sim": {"seeds": [4, 5]}}))
    s = load_settings(path)
    assert s.experiment.train.epochs == 3 and s.sim.seeds == (4, 5)
    assert s.experiment.data.image_size == load_settings("smoke").experiment.data.image_size
    resolved = tmp_path / "config.yaml"
    resolved.write_text(yaml.safe_dump(settings_to_dict(s)))
    assert load_settings(resolved) == s
    assert "preset" not in settings_to_dict(s)


def test_overrides_win_and_take_yaml_values() -> None:
    s = load_settings("smoke", ["train.epochs=2", "sim.seeds=8,9", "inference.depth_shifts=[0.1]",
                                "data.augmentation.stretch=0.25", "train.device=cpu"])
    assert s.experiment.train.epochs == 2 and s.sim.seeds == (8, 9)
    assert s.experiment.inference.depth_shifts == (0.1,)
    assert s.experiment.data.augmentation.stretch == 0.25


@pytest.mark.parametrize("item, message", [
    ("epochs=3", "section.key=value"),
    ("trian.epochs=3", "unknown section 'trian'"),
    ("train.=3", "section.key=value"),
])
def test_malformed_overrides_are_named(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_overrides([item])


def test_unknown_keys_sections_and_presets_are_refused_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site-exp.yaml"
    path.write_text(yaml.safe_dump({"preset": "smoke", "train": {"epochz": 3}}))
    with pytest.raises(ConfigError, match=r"site-exp\.yaml.*train.*epochz"):
        load_settings(path)
    path.write_text(yaml.safe_dump({"trian": {}}))
    with pytest.raises(ConfigError, match=r"site-exp\.yaml.*unknown key.*trian"):
        load_settings(path)
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        load_settings("fast")
    path.write_text(yaml.safe_dump({"preset": "no-such-preset"}))
    with pytest.raises(ConfigError, match="unknown preset 'no-such-preset'"):
        load_settings(path)
    with pytest.raises(ConfigError, match="no such settings file"):
        load_settings(tmp_path / "missing.yaml")


def test_an_inheritance_loop_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("preset: b.yaml\n")
    (tmp_path / "b.yaml").write_text("preset: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_settings(tmp_path / "a.yaml")


BAD_VALUES = [
    ("train.epochs=0", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("federation.rounds=0", "federation.rounds"),
    ("federation.local_epochs=0", "federation.local_epochs"),
    ("data.image_size=16", "data.image_size"),
    ("loss.consistency=-0.5", "loss.consistency"),
    ("loss.consistency=.nan", "loss.consistency"),
    ("loss.seg_weight=-1", "loss.seg_weight"),
    ("train.lr=-1", "train.lr"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("data.val_fraction=-0.1", "data.val_fraction"),
    ("model.arch=resnet", "model.arch"),
    ("federation.strategy=fedsgd", "federation.strategy"),
    ("sim.protocols=papers", "sim.protocols"),
    ("sim.strategies=fedsgd", "sim.strategies"),
    ("train.device=gpu", "train.device"),
    ("inference.depth_shifts=[1.5]", "inference.depth_shifts"),
]


@pytest.mark.parametrize("item, key", BAD_VALUES)
def test_invalid_values_are_refused_naming_key_and_source(item: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings("smoke", [item])
    text = str(exc.value)
    assert key in text and "smoke.yaml" in text, text


def test_image_size_must_suit_the_network() -> None:
    with pytest.raises(ConfigError, match="data.image_size.*multiple of 32"):
        load_settings("recommended", ["data.image_size=150"])
    assert load_settings("recommended", ["data.image_size=128"]).experiment.data.image_size == 128


def test_sections_are_the_documented_ones() -> None:
    assert SECTIONS == ("data", "model", "loss", "train", "privacy", "inference", "federation", "sim")
    assert settings_from_dict({}).sim.protocols == ("paper", "federated", "reference")
