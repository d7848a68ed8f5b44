"""benchmarks/ensemble.py: the mean of several single-arm runs, scored like one run."""
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from benchmarks.ensemble import MeanOfModels
from benchmarks.ensemble import main as ensemble_main
from benchmarks.external_validation import main as train_main


class Constant(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.logit = torch.logit(torch.tensor(p))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logit.expand(x.shape[0], 1, *x.shape[2:]), self.logit.expand(x.shape[0])


def test_mean_of_models_averages_probabilities_not_logits():
    mask, cls = MeanOfModels([Constant(0.2), Constant(0.9)])(torch.zeros(3, 1, 4, 4))
    assert mask.shape == (3, 1, 4, 4) and cls.shape == (3,)
    assert torch.sigmoid(mask) == pytest.approx(torch.full_like(mask, 0.55), abs=1e-6)
    assert torch.sigmoid(cls) == pytest.approx(torch.full_like(cls, 0.55), abs=1e-6)


class LeftHalf(nn.Module):
    """Mask logit +10 on the left half of whatever size it is given, −10 elsewhere; records sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(tuple(x.shape[-2:]))
        m = torch.full((x.shape[0], 1, *x.shape[2:]), -10.0)
        m[..., : x.shape[-1] // 2] = 10.0
        return m, torch.zeros(x.shape[0])


def test_mean_of_models_resizes_for_a_member_of_another_size():
    small, native = LeftHalf(), LeftHalf()
    mask, cls = MeanOfModels([small, native], sizes=[4, 8])(torch.rand(2, 1, 8, 8))
    assert small.seen == [(4, 4)] and native.seen == [(8, 8)]
    assert mask.shape == (2, 1, 8, 8) and cls.shape == (2,)
    prob = torch.sigmoid(mask)
    assert (prob[..., :3] > 0.99).all() and (prob[..., 5:] < 0.01).all()  # both agree away from the edge
    with pytest.raises(ValueError, match="2 sizes for 1 members"):
        MeanOfModels([small], sizes=[4, 8])


def test_ensemble_of_two_seeds_and_a_one_member_ensemble_reproduces_its_run(tmp_path, tiny_centres):
    root, options = tiny_centres
    common = options + ["--select", "last"]
    assert train_main(common + ["--arms", "plain", "--out", str(tmp_path / "s0")]) == 0
    # a member trained for the ensemble only: saved, not scored
    assert train_main(common + ["--arms", "plain", "--seed", "1", "--no-score", "--channels-last",
                                "--out", str(tmp_path / "s1")]) == 0
    assert (tmp_path / "s1" / "model_plain.pt").is_file() and not (tmp_path / "s1" / "metrics.csv").exists()
    saved = yaml.safe_load((tmp_path / "s1" / "config.yaml").read_text())
    assert saved["arms"]["plain"]["train"]["channels_last"] is True
    assert len(pd.read_csv(tmp_path / "s1" / "history.csv")) == 1
    assert train_main(common + ["--arms", "consistency", "--out", str(tmp_path / "c")]) == 0
    ens = ["--data-root", str(root), "--cache-dir", "", "--threads", "1"]

    assert ensemble_main([str(tmp_path / "s0"), "--out", str(tmp_path / "one")] + ens) == 0
    own = pd.read_csv(tmp_path / "s0" / "per_image.csv").set_index("case_id")["dice"]
    alone = pd.read_csv(tmp_path / "one" / "per_image.csv").set_index("case_id")["dice"]
    pd.testing.assert_series_equal(alone.sort_index(), own.sort_index(), check_exact=False, atol=1e-6)
    # channels-last members: the same predictions to float rounding
    assert ensemble_main([str(tmp_path / "s0"), "--out", str(tmp_path / "one_cl"), "--channels-last"] + ens) == 0
    cl = pd.read_csv(tmp_path / "one_cl" / "per_image.csv").set_index("case_id")
    base = pd.read_csv(tmp_path / "one" / "per_image.csv").set_index("case_id")
    np.testing.assert_allclose(cl["p_malignant"].sort_index(), base["p_malignant"].sort_index(), atol=1e-5)

    assert ensemble_main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "two"),
                          "--postprocess", "--depth-tta", "0.25,0.5"] + ens) == 0
    table = pd.read_csv(tmp_path / "two" / "metrics.csv")
    assert set(table.inference) == {"raw", "flip+lcc", "flip+shift"} and (table.members == 2).all()
    per_image = pd.read_csv(tmp_path / "two" / "per_image.csv")
    assert len(per_image) == 3 * 5 and np.isfinite(per_image[per_image.has_lesion].dice).all()

    mixed = [str(tmp_path / "s0"), str(tmp_path / "c"), "--out", str(tmp_path / "mixed")] + ens
    assert ensemble_main(mixed) == 2  # plain and consistency are not one arm
    assert ensemble_main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")] + ens) == 2
