"""ε sweep of the leave-centre-out runner (DP arms, ε-utility table), best-validation epoch
selection, and that example picking leaves the model as it was."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import sim.leave_center_out as lco
import sim.units as units
from common.config import ConfigError, ExperimentConfig, replace
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.federation import build_experiment_model
from sim.examples import pick_examples
from sim.federated import federated_spec
from common.settings import Settings, SimConfig, load_settings
from sim.protocols import Runtime, arm_config, plan_units, split_dp_arm, with_dp_arms
from sim.report_dp import epsilon_table
from sim.selection import EpochSelector, selection_score

SMALL = {"data.image_size": 32, "model.base_channels": 8, "model.depth": 3,
         "train.batch_size": 8, "train.progress": False}


# ----------------------------------------------------------------------------- arms and plan
def test_dp_arm_names_plan_and_config():
    opts = SimConfig(epsilons=(8.0, 1.0, math.inf), dp_arms=("consistency",))
    assert with_dp_arms(["multitask", "consistency"], opts) == [
        "multitask", "consistency", "consistency-eps1", "consistency-eps8"]
    assert split_dp_arm("consistency-eps0.5") == ("consistency", 0.5)
    assert split_dp_arm("consistency-lambda2") == ("consistency-lambda2", math.inf)
    plan = plan_units(Settings(sim=opts), ["A", "B", "C"], "A")
    arms = {(pu.unit.protocol, pu.unit.arm) for pu in plan}
    for protocol in ("paper", "fedavg", "fedprox", "local", "pooled"):
        assert {(protocol, "consistency-eps1"), (protocol, "consistency-eps8")} <= arms
    assert ("paper", "multitask-eps1") not in arms  # only dp_arms get variants

    cfg = ExperimentConfig()
    dp = arm_config(cfg, "consistency-eps3", planned_epochs=12)
    assert dp.privacy.enabled and dp.privacy.target_epsilon == 3.0 and dp.privacy.planned_epochs == 12
    assert dp.loss == arm_config(cfg, "consistency").loss
    assert not arm_config(cfg, "consistency").privacy.enabled
    with pytest.raises(ConfigError, match="planned epochs"):
        arm_config(cfg, "consistency-eps3")
    with pytest.raises(ConfigError, match="sim.epsilons"):
        SimConfig(epsilons=(0.0,))
    with pytest.raises(ConfigError, match="sim.selection"):
        SimConfig(selection="best")


def test_federated_dp_unit_plans_its_noise_over_every_round(tmp_path):
    settings = load_settings("smoke", ["sim.protocols=federated", "sim.strategies=fedavg", "sim.epsilons=2",
                                       "federation.rounds=3", "federation.local_epochs=2", "sim.held_out=SynPL"])
    sites = lco.site_specs(settings.sim)
    (pu,) = [p for p in plan_units(settings, list(sites), "SynPL") if p.unit.arm.endswith("eps2")]
    spec = federated_spec(pu, units.unit_config(pu, settings), settings,
                          Runtime(sites=sites, cache_dir=None, scratch=tmp_path))
    # the server sends spec.experiment with every message; client/app.py runs DP-SGD from it
    assert spec.experiment.privacy.enabled and spec.experiment.privacy.target_epsilon == 2.0
    assert spec.experiment.privacy.planned_epochs == 6


# ----------------------------------------------------------------------------- the sweep
def test_epsilon_sweep_tiny_run(tmp_path):
    out = tmp_path / "runs"
    sites = list(lco.site_specs(SimConfig()))[:3]
    assert lco.main(["--preset", "smoke", "--no-progress", "--protocols", "paper", "--set", "sim.arms=consistency",
                     "--set", "sim.epsilons=3,.inf", "--set", f"sim.centres={','.join(sites)}",
                     "--out", str(out)]) == 0
    (folder,) = sorted(out.glob("lco-*"))
    res = pd.read_csv(folder / "results.csv")
    assert set(res["arm"]) == {"consistency", "consistency-eps3"}
    spent = res[res["metric"] == "epsilon"]
    assert set(spent["arm"]) == {"consistency-eps3"} and set(spent["test_centre"]) == set(sites[1:])
    assert (spent["value"] > 0).all() and (spent["value"] <= 3.0 + 1e-9).all()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["sim"]["epsilons"] == [3.0, math.inf] and config["sim"]["selection"] == "best_val"
    report = (folder / "report.md").read_text()
    assert "## Utility cost of sample-level DP-SGD" in report
    table = report.split("## Utility cost")[1]
    for centre in sites[1:]:
        assert f"| {centre} | 3 | {spent['value'].iloc[0]:.2f} |" in table
        assert f"| {centre} | ∞ (no DP) | – |" in table
    curves = pd.read_csv(folder / "curves.csv")
    assert curves.groupby("arm")["selected"].sum().to_dict() == {"consistency": 1, "consistency-eps3": 1}


def test_epsilon_table_by_hand():
    def row(arm, centre, metric, value, n=10):
        return {"protocol": "paper", "arm": arm, "train_set": "A", "test_centre": centre, "seed": 0,
                "metric": metric, "value": value, "ci_low": value - 0.1, "ci_high": value + 0.1, "n": n}

    rows = [row(arm, "B", m, v) for arm, m, v in [
        ("consistency", "dice", 0.7), ("consistency", "auc", 0.8),
        ("consistency-eps8", "dice", 0.5), ("consistency-eps8", "auc", 0.6), ("consistency-eps8", "epsilon", 7.9),
        ("consistency-eps1", "dice", 0.2), ("consistency-eps1", "auc", 0.5), ("consistency-eps1", "epsilon", 0.99),
        ("multitask", "dice", 0.6)]]
    table = epsilon_table(pd.DataFrame(rows))
    assert list(table["target ε"]) == ["1", "8", "∞ (no DP)"]  # multitask has no DP arm: not shown
    assert list(table["ε spent"]) == ["0.99", "7.90", "–"]
    assert list(table["Dice (lesion imgs)"]) == ["0.200 [0.100, 0.300]", "0.500 [0.400, 0.600]", "0.700 [0.600, 0.800]"]
    assert epsilon_table(pd.DataFrame(rows[:2])).empty


# ----------------------------------------------------------------------------- selection
def _net() -> torch.nn.Module:
    return torch.nn.Linear(1, 1, bias=False)


def _feed(selector: EpochSelector, net: torch.nn.Module, summaries) -> None:
    for epoch, summary in enumerate(summaries, start=1):
        with torch.no_grad():
            net.weight.fill_(float(epoch))  # the weights "of" epoch k are k
        selector.update(epoch, 1.0 / epoch, summary, net)


SEQUENCE = [{"dice": 0.50, "auc": 0.60},   # 0.55
            {"dice": 0.70, "auc": 0.50},   # 0.60  <- best mean
            {"dice": 0.80, "auc": 0.30},   # 0.55  (best Dice alone)
            {"dice": 0.40, "auc": float("nan")}]  # 0.40 (AUC undefined: Dice alone)


def test_best_val_selection_by_hand():
    assert selection_score({"dice": 0.4, "auc": float("nan")}) == 0.4
    assert selection_score({"dice": float("nan"), "auc": float("nan")}) == -math.inf
    assert selection_score({"dice": 0.0, "auc": 0.9}) == 0.0  # empty masks: AUC cannot rescue them
    assert selection_score({"dice": 0.1, "auc": 0.1}) > selection_score({"dice": 0.0, "auc": 0.9})
    net = _net()
    best = EpochSelector("best_val")
    _feed(best, net, SEQUENCE)
    assert best.restore(net) == 2 and net.weight.item() == 2.0
    curves = best.curves()
    assert curves["selected"].tolist() == [False, True, False, False]
    assert curves["val_score"].round(6).tolist() == [0.55, 0.6, 0.55, 0.4]

    seg = EpochSelector("best_val", classify=False)  # seg_only: the untrained head's AUC is ignored
    _feed(seg, net, SEQUENCE)
    assert seg.restore(net) == 3 and net.weight.item() == 3.0

    tie = EpochSelector("best_val")
    _feed(tie, net, [{"dice": 0.5, "auc": 0.5}, {"dice": 0.5, "auc": 0.5}, {"dice": 0.1, "auc": 0.1}])
    assert tie.restore(net) == 2  # ties go to the later epoch

    last = EpochSelector("last")
    _feed(last, net, SEQUENCE)
    assert last.restore(net) == 4 and net.weight.item() == 4.0


def test_centralised_training_keeps_the_best_validation_epoch(monkeypatch):
    """The real train_local loop with a scripted validation score: the returned model holds the
    weights it had after epoch 2, the best of the script."""
    cfg = replace(ExperimentConfig(), **{**SMALL, "train.epochs": 3})
    data = to_tensors(make_centre("SynPL", 12, size=32, seed=0), 32)
    snapshots: list[dict[str, torch.Tensor]] = []
    script = iter([{"dice": 0.3, "auc": 0.5}, {"dice": 0.6, "auc": 0.7}, {"dice": 0.2, "auc": 0.9}])

    def fake_predict(model, *_args, **_kw):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return None, None

    monkeypatch.setattr(units, "predict", fake_predict)
    monkeypatch.setattr(units, "score", lambda *_a, **_k: type("R", (), {"summary": next(script)})())
    pu = plan_units(Settings(experiment=cfg, sim=SimConfig(protocols=("paper",), arms=("consistency",))),
                    ["SynPL", "X"], "SynPL")[0]
    rt = Runtime(sites={}, cache_dir=None, scratch=Path("."), device="cpu", progress=False)
    trained = units.train_centralised(pu, cfg, data.subset(torch.arange(8)), data.subset(torch.arange(8, 12)), rt)
    assert len(snapshots) == 3
    final = trained.model.state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[2][k]) for k in final)  # training moved on after epoch 2
    assert trained.curves["selected"].tolist() == [False, True, False] and math.isnan(trained.epsilon)


def test_pick_examples_leaves_the_model_as_it_was():
    cfg = replace(ExperimentConfig(), **SMALL)
    model = build_experiment_model(cfg).train()
    data = to_tensors(make_centre("SynPL", 8, size=32, seed=1), 32)
    n = len(data)
    per_image = pd.DataFrame({"has_lesion": data.has_lesion.numpy(), "malignant": data.malignant.numpy().astype(int),
                              "dice": np.full(n, 0.5), "case_id": list(data.case_ids)})
    probs = np.random.default_rng(0).random((n, 1, 32, 32)).astype(np.float32)
    ex = pick_examples(model, data, probs, np.full(n, 0.5, np.float32), per_image, 2, "SynPL")
    assert ex and len(ex["phi"]) == min(2, int(data.has_lesion.sum()))
    assert model.training and model.prior.training
