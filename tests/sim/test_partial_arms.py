"""The partial-annotation matrix preset: its arms route the consistency gradient as named."""
from __future__ import annotations

import pytest

from common.config import ConfigError
from common.settings import load_settings
from sim.protocols import arm_config

PRESET = "sim/experiments/partial_masks.yaml"


def test_grad_arms_set_the_mode_and_keep_lambda() -> None:
    cfg = load_settings("smoke").experiment
    for mode in ("mask", "classifier", "both"):
        got = arm_config(cfg, f"consistency-{mode}").loss
        assert got.consistency_grad == mode and got.consistency == cfg.loss.consistency > 0
    assert arm_config(cfg, "consistency-mask-eps3", planned_epochs=4).privacy.enabled


def test_partial_masks_preset_loads_with_a_mask_fraction() -> None:
    s = load_settings(PRESET, ["data.mask_fraction=0.25"])
    assert s.experiment.data.mask_fraction == 0.25
    assert s.sim.arms == ("multitask", "consistency-mask", "consistency-classifier",
                          "consistency-both")
    assert len(s.sim.seeds) >= 3
    with pytest.raises(ConfigError, match="data.mask_fraction"):
        load_settings(PRESET, ["data.mask_fraction=-0.5"])
    with pytest.raises(ConfigError, match="unknown arm"):
        load_settings(PRESET, ["sim.arms=consistency-sideways"])


def test_label_only_centres_hide_the_named_centres_masks_and_unknown_ones_are_refused() -> None:
    from sim.leave_center_out import site_specs

    s = load_settings("smoke", ["sim.label_only_centres=[SynES1]"])
    sites = site_specs(s.sim)
    assert not sites["SynES1"].masks and all(v.masks for k, v in sites.items() if k != "SynES1")
    with pytest.raises(ConfigError, match="label_only_centres"):
        site_specs(load_settings("smoke", ["sim.label_only_centres=[Nowhere]"]).sim)
