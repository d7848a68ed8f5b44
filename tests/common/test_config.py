"""Experiment configuration: YAML → frozen dataclasses, dotted overrides, checked ranges."""
import pytest

from common.config import ConfigError, ExperimentConfig, replace
from common.settings import load_settings


def test_augmentation_ranges_from_yaml_and_checked(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  augmentation:\n    translate: 0.2\n    scale: 0.25\n", encoding="utf-8")
    cfg = load_settings(path).experiment
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


def test_run_wide_schedules_from_yaml_and_checked(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  warmup_epochs: 1.5\nloss:\n  consistency_warmup_epochs: 20\n"
                    "  consistency_ramp_epochs: 10\n", encoding="utf-8")
    cfg = load_settings(path).experiment
    assert cfg.train.warmup_epochs == 1.5
    assert (cfg.loss.consistency_warmup_epochs, cfg.loss.consistency_ramp_epochs) == (20.0, 10.0)
    for bad in ({"train.warmup_epochs": -1}, {"loss.consistency_warmup_epochs": float("nan")},
                {"loss.consistency_ramp_epochs": -0.5}):
        with pytest.raises(ConfigError, match=next(iter(bad)).split(".")[1]):
            replace(cfg, **bad)


@pytest.mark.parametrize("key", ["train.ema_decay", "train.low_res_epochs", "train.warmup_steps",
                                 "loss.consistency_warmup_steps", "model.mixstyle_mode",
                                 "data.augmentation.gin", "data.augmentation.lesion_paste",
                                 "data.augmentation.negative_crop", "data.augmentation.calm_epochs",
                                 "data.augmentation.sharpness"])
def test_removed_knobs_are_unknown_keys(key):
    with pytest.raises(ConfigError, match="unknown"):
        replace(ExperimentConfig(), **{key: 1})
