"""Experiment configuration: YAML → frozen dataclasses, dotted overrides, checked ranges."""
import pytest

from common.config import ConfigError, load_experiment, replace


def test_augmentation_ranges_from_yaml_and_checked(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  augmentation:\n    translate: 0.2\n    scale: 0.25\n", encoding="utf-8")
    cfg = load_experiment(path)
    assert cfg.data.augmentation.translate == 0.2 and cfg.data.augmentation.rotate_deg == 10.0
    assert cfg.data.train_augmentation is cfg.data.augmentation
    assert replace(cfg, **{"data.augment": False}).data.train_augmentation is None
    with pytest.raises(ConfigError, match="data.augmentation"):
        replace(cfg, **{"data.augmentation.scale": 1.5})


def test_replace_accepts_tuples_of_built_dataclasses():
    from common.federation import RunSpec, SiteSpec

    spec = RunSpec(sites=(SiteSpec(name="a", synthetic_centre="SynPL"),))
    new = replace(spec, sites=(SiteSpec(name="b", synthetic_centre="SynEG"),))
    assert [s.name for s in new.sites] == ["b"]
    mixed = replace(spec, sites=({"name": "c", "synthetic_centre": "SynPL"},))  # mappings still work
    assert isinstance(mixed.sites[0], SiteSpec) and mixed.sites[0].name == "c"


def test_low_res_epochs_from_yaml_and_checked(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  low_res_epochs: 12\n  low_res_scale: 0.75\n", encoding="utf-8")
    cfg = load_experiment(path)
    assert (cfg.train.low_res_epochs, cfg.train.low_res_scale) == (12, 0.75)
    for bad in ({"train.low_res_scale": 0.0}, {"train.low_res_scale": 1.5}, {"train.low_res_epochs": -1}):
        with pytest.raises(ConfigError, match="low_res"):
            replace(cfg, **bad)
