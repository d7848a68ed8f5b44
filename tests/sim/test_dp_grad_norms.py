"""sim/dp_grad_norms.py: per-image gradient norms of each loss term over DP-SGD's parameters."""
from __future__ import annotations

import dataclasses

import torch

from common.config import ExperimentConfig, replace
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.federation import build_experiment_model
from sim.dp_grad_norms import summarise, term_grad_norms

SIZE = 32


def _setup():
    cfg = replace(ExperimentConfig(), **{"data.image_size": SIZE, "model.base_channels": 4, "model.depth": 2})
    torch.manual_seed(0)
    return build_experiment_model(cfg).eval(), to_tensors(make_centre("SynPL", 6, size=SIZE, seed=0), SIZE), cfg.loss


def test_terms_add_up_and_scale_with_their_weight() -> None:
    model, data, loss = _setup()
    rows = term_grad_norms(model, data, loss, "norms", images=4).pivot(index="image", columns="term", values="norm")
    assert len(rows) == 4 and (rows["total"] > 0).all()
    # the norm of a sum is at most the sum of the norms (rest = total − seg − cls)
    assert (rows["total"] <= rows["seg"] + rows["cls"] + rows["rest"] + 1e-5).all()
    tenfold = term_grad_norms(model, data, dataclasses.replace(loss, cls_weight=10 * loss.cls_weight),
                              "norms", images=4).pivot(index="image", columns="term", values="norm")
    assert torch.allclose(torch.tensor(tenfold["cls"].values), 10 * torch.tensor(rows["cls"].values), rtol=1e-4)
    assert torch.allclose(torch.tensor(tenfold["seg"].values), torch.tensor(rows["seg"].values), rtol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # nothing left frozen
    assert model.prior.track_running_stats and not model.training  # restored


def test_summary_names_the_clipped_share() -> None:
    model, data, loss = _setup()
    rows = term_grad_norms(model, data, loss, "all", images=6)
    table = summarise(rows, clip=0.0)  # every image is above C = 0
    totals = table.xs("total", level="term")
    assert (totals["clipped"] == 1.0).all() and totals["count"].sum() == 6
    assert table.xs("seg", level="term")["clipped"].isna().all()


def test_command_on_a_centre_and_its_bad_inputs(tmp_path, capsys, monkeypatch) -> None:
    import pytest

    from common.modelfile import save_model
    from sim.dp_grad_norms import main
    from tests.common.test_data_readers import make_busi

    monkeypatch.setattr("common.data.plausibility.MIN_SIDE", 1)
    make_busi(tmp_path / "data" / "BUSI")
    cfg = replace(ExperimentConfig(), **{"data.image_size": SIZE, "model.base_channels": 4, "model.depth": 2})
    torch.manual_seed(0)
    model = str(save_model(tmp_path / "m.pt", build_experiment_model(cfg), cfg, name="tiny"))
    root = str(tmp_path / "data")
    assert main([model, "--data-root", root, "--centre", "BUSI", "--images", "3"]) == 0
    out = capsys.readouterr().out
    assert "BUSI: per-image gradient norms over 'norms' parameters (C = 1)" in out and "clipped" in out
    assert main([model, "--data-root", root, "--centre", "UDIAT"]) == 2
    assert "['UDIAT'] not found" in capsys.readouterr().err
    assert main([str(tmp_path / "none.pt"), "--data-root", root, "--centre", "BUSI"]) == 2
    for bad in (["--images", "0"], ["--clip", "0"]):
        with pytest.raises(SystemExit) as exit_:
            main([model, "--data-root", root, "--centre", "BUSI", *bad])
        assert exit_.value.code == 2 and "--images must be >= 1" in capsys.readouterr().err
