"""The leave-centre-out CLI: settings through the one door, the unit plan, tiny synthetic runs of
each protocol (every output file), resume without retraining, and the real-data smoke (integration)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import sim.leave_center_out as lco
from common.config import ConfigError, ExperimentConfig
from common.settings import Settings, SimConfig, load_settings, settings_to_dict
from sim.federated import federated_spec, missing_updates, run_simulation_spec
from sim.protocols import Runtime, arm_config, auc_ci, metric_rows, plan_units

TINY = ["--preset", "smoke", "--no-progress"]
DATA_ROOT = Path(os.environ.get("FEDBUS_DATA_ROOT", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def _run_folder(out: Path) -> Path:
    (folder,) = sorted(out.glob("lco-*"))
    return folder


def _settings(argv: list[str]) -> Settings:
    return lco.resolve_settings(lco.build_parser().parse_args(argv))


# ----------------------------------------------------------------------------- settings
def test_help_lists_the_few_options(capsys):
    with pytest.raises(SystemExit) as exc:
        lco.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--preset", "--set", "--data-root", "--protocols", "--seeds", "--threads", "--out", "--resume",
                 "--list-presets", "--no-progress"):
        assert flag in text
    assert "--epochs" not in text and "--depth-tta" not in text  # config fields enter through --set only


def test_list_presets_prints_one_line_each(capsys):
    assert lco.main(["--list-presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert {line.split()[0] for line in lines} >= {"smoke", "cpu-fast", "recommended", "paper", "dp"}
    assert all(len(line.split()) > 3 for line in lines)


def test_defaults_are_cpu_fast_on_synthetic_and_recommended_on_real_data(tmp_path):
    assert _settings([]) == load_settings("cpu-fast")
    real = _settings(["--data-root", str(tmp_path)])
    assert real.experiment == load_settings("recommended").experiment
    assert real.sim.data_root == str(tmp_path.resolve())


def test_precedence_preset_then_set_then_shortcuts(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"preset": "smoke", "train": {"epochs": 7, "lr": 0.01},
                                    "sim": {"seeds": [1, 2]}}))
    s = _settings(["--preset", str(path), "--set", "train.epochs=9", "--set", "sim.seeds=3,4", "--seeds", "5,6"])
    assert s.experiment.train.epochs == 9  # --set beats the file
    assert s.experiment.train.lr == 0.01  # the file beats its preset
    assert s.sim.seeds == (5, 6)  # the shortcut beats --set
    assert s.experiment.data.image_size == load_settings("smoke").experiment.data.image_size  # inherited


def test_a_run_folders_config_loads_again(tmp_path):
    s = _settings([*TINY, "--seeds", "3"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings_to_dict(s)))
    assert _settings(["--preset", str(path)]) == s


@pytest.mark.parametrize("argv, message", [
    (["--set", "train.epochs=0"], "train.epochs"),
    (["--set", "trian.epochs=1"], "unknown section 'trian'"),
    (["--set", "sim.strategies=fedsgd"], "sim.strategies"),
    (["--preset", "fast"], "unknown preset 'fast'"),
    (["--seeds", "0,1.5"], "sim.seeds"),
    (["--set", "train.device=cuda:7"], "train.device"),
    (["--protocols", "federated", "--set", "sim.held_out=Atlantis"], "Atlantis"),
    (["--set", "sim.centres=Atlantis"], "Atlantis"),
])
def test_bad_settings_exit_2_before_any_output(tmp_path, capsys, argv, message):
    out = tmp_path / "runs"
    assert lco.main([*TINY, *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_unknown_sim_keys_name_the_key():
    with pytest.raises(ConfigError, match="sim.protocols"):
        SimConfig(protocols=("papers",))


def test_arm_configs():
    cfg = ExperimentConfig()
    seg = arm_config(cfg, "seg_only").loss
    assert seg.cls_weight == 0 and seg.consistency == 0
    assert arm_config(cfg, "multitask").loss.consistency == 0
    assert arm_config(cfg, "consistency").loss.consistency == 0.5
    assert "area" not in arm_config(cfg, "consistency-no-area").loss.features
    assert arm_config(cfg, "consistency-lambda2").loss.consistency == 2.0
    with pytest.raises(ConfigError):
        arm_config(cfg, "consistency-no-posterior")  # not one of the configured features


def test_plan_counts_units():
    cfg = ExperimentConfig()
    opts = SimConfig(seeds=(0, 1), ablate_features=True, lambda_sweep=(1.0,))
    plan = plan_units(Settings(experiment=cfg, sim=opts), ["A", "B", "C", "D"], "A")
    by = pd.Series([pu.unit.protocol for pu in plan]).value_counts().to_dict()
    n_paper_arms = 3 + len(cfg.loss.features) + 1
    assert by == {"paper": n_paper_arms * 2, "fedavg": 4 * 2, "fedprox": 4 * 2, "local": 4 * 2, "pooled": 4 * 2}
    paper = [pu for pu in plan if pu.unit.protocol == "paper"]
    assert all(pu.test_sites == ("B", "C", "D") and pu.train_sites == ("A",) for pu in paper)
    fed = [pu for pu in plan if pu.unit.protocol == "fedavg" and pu.test_sites == ("B",)]
    assert {pu.unit.train_set for pu in fed} == {"A+C+D"}
    assert len({pu.unit.key for pu in plan}) == len(plan)
    only = plan_units(Settings(sim=SimConfig(protocols=("federated",), held_out=("C",))), ["A", "B", "C"], "A")
    assert [(pu.unit.protocol, pu.test_sites) for pu in only] == [("fedavg", ("C",)), ("fedprox", ("C",))]
    every = SimConfig(protocols=("federated",), held_out=("C",),
                      strategies=("fedavg", "fedprox", "fedbn", "fedadam", "fedavgm", "fedmedian"))
    assert [pu.unit.protocol for pu in plan_units(Settings(sim=every), ["A", "B", "C"], "A")] == list(every.strategies)
    pooled = SimConfig(protocols=("pooled",), held_out=("C",))  # the pooled rows without the local-only ones
    assert [(pu.unit.protocol, pu.unit.train_set) for pu in plan_units(Settings(sim=pooled), ["A", "B", "C"], "A")] \
        == [("pooled", "A+B")]


def test_metric_rows_by_hand():
    per_image = pd.DataFrame({
        "has_lesion": [True, True, True, False],
        "dice": [0.2, 0.4, 0.6, float("nan")], "iou": [0.1, 0.2, 0.3, float("nan")],
        "hd95_px": [1.0, 2.0, 3.0, float("nan")], "hd95_mm": [0.5, 1.0, float("nan"), float("nan")],
        "malignant": [1, 0, 1, 0], "p_malignant": [0.9, 0.2, 0.4, 0.6],
    })
    summary = {"dice": 0.4, "iou": 0.2, "hd95": 2.0, "auc": 0.75, "sensitivity": 0.5, "specificity": 0.5,
               "accuracy": 0.5}
    rows = {r["metric"]: r for r in metric_rows(per_image, summary, "X", True, 200, 0)}
    assert set(rows) == {"dice", "iou", "hd95", "auc", "sensitivity", "specificity", "accuracy"}  # no hd95_mm: a gap
    assert rows["dice"]["n"] == 3 and rows["auc"]["n"] == 4 and rows["sensitivity"]["n"] == 2
    assert 0.2 <= rows["dice"]["ci_low"] <= 0.4 <= rows["dice"]["ci_high"] <= 0.6
    assert rows["auc"]["value"] == 0.75
    seg_only = metric_rows(per_image, summary, "X", False, 50, 0)
    assert {r["metric"] for r in seg_only} == {"dice", "iou", "hd95"}


def test_auc_ci_stratified():
    y = np.array([1, 1, 0, 0, 0])
    assert auc_ci(y, np.array([0.9, 0.8, 0.1, 0.2, 0.3]), 100, 0) == (1.0, 1.0)  # separable in every resample
    lo, hi = auc_ci(y, np.array([0.9, 0.1, 0.5, 0.2, 0.95]), 500, 0)
    assert 0.0 <= lo < hi <= 1.0
    assert all(np.isnan(auc_ci(np.zeros(3), np.ones(3), 10, 0)))


def test_finished_federation_is_reused_without_simulating(tmp_path, monkeypatch):
    import flwr.simulation

    def boom(**_):
        raise AssertionError("simulation started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", boom)
    cfg = ExperimentConfig()
    settings = load_settings("smoke", ["federation.rounds=2", "sim.protocols=[federated]", "sim.strategies=[fedavg]",
                                       "sim.held_out=[SynPL]"])
    sites = lco.site_specs(settings.sim)
    (pu,) = plan_units(settings, list(sites), "SynPL")
    rt = Runtime(sites=sites, cache_dir=None, scratch=tmp_path)
    spec = federated_spec(pu, cfg, settings, rt)
    Path(spec.run_dir).mkdir(parents=True)
    (Path(spec.run_dir) / "status.json").write_text(json.dumps({"state": "finished", "round": 2, "message": ""}))
    assert run_simulation_spec(spec) == Path(spec.run_dir)
    (Path(spec.run_dir) / "status.json").write_text(json.dumps({"state": "finished", "round": 1, "message": ""}))
    with pytest.raises(AssertionError, match="simulation started"):  # fewer rounds than asked: run again
        run_simulation_spec(spec)


# ----------------------------------------------------------------------------- runs
EXPECTED_FILES = ("results.csv", "per_image.csv", "curves.csv", "report.md", "config.yaml", "provenance.json")


def test_centralised_protocols_write_everything_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "runs"
    argv = [*TINY, "--protocols", "paper,reference", "--out", str(out)]
    assert lco.main(argv) == 0
    folder = _run_folder(out)
    for name in EXPECTED_FILES:
        assert (folder / name).is_file(), name
    for png in ("dice_box_paper.png", "curves_paper.png", "curves_reference.png", "examples.png",
                "heatmap_local_consistency.png"):
        assert (folder / png).stat().st_size > 1000, png

    res = pd.read_csv(folder / "results.csv")
    assert list(res.columns) == ["protocol", "arm", "train_set", "test_centre", "seed", "metric", "value",
                                 "ci_low", "ci_high", "n"]
    paper = res[res["protocol"] == "paper"]
    assert set(paper["arm"]) == {"seg_only", "multitask", "consistency"}
    assert paper["train_set"].nunique() == 1
    train_centre = paper["train_set"].iloc[0]
    assert train_centre not in set(paper["test_centre"])  # no fine-tuning, no internal test
    assert "auc" not in set(paper[paper["arm"] == "seg_only"]["metric"])  # untrained head not scored
    local = res[(res["protocol"] == "local") & (res["metric"] == "dice")]
    n_centres = local["train_set"].nunique()
    assert n_centres >= 3 and len(local) == n_centres * n_centres  # the full matrix
    assert (res["ci_low"].dropna() <= res["value"][res["ci_low"].notna()] + 1e-9).all()

    report = (folder / "report.md").read_text()
    assert "over lesion images only" in report and "published Dice" in report
    assert "### Consistency vs plain multi-task" in report
    for centre in set(paper["test_centre"]):
        assert f"#### Tested on {centre}" in report
    prov = json.loads((folder / "provenance.json").read_text())
    assert set(prov["data_fingerprints"]) == set(res["test_centre"])
    assert "torch" in prov["versions"]
    assert len(prov["units"]) == res.groupby(["protocol", "arm", "train_set", "seed"]).ngroups

    # Resume a complete run: nothing retrains.
    calls: list[str] = []
    real_run_unit = lco.run_unit

    def counting(pu, *a, **k):
        calls.append(pu.unit.key)
        return real_run_unit(pu, *a, **k)

    monkeypatch.setattr(lco, "run_unit", counting)
    assert lco.main(["--resume", str(folder), "--no-progress"]) == 0
    assert calls == []
    # Drop one unit from results.csv (as if stopped mid-unit): only that one retrains.
    gone = ("paper", "multitask")
    keep = ~((res["protocol"] == gone[0]) & (res["arm"] == gone[1]))
    res[keep].to_csv(folder / "results.csv", index=False)
    assert lco.main(["--resume", str(folder), "--no-progress"]) == 0
    assert calls == [f"paper__multitask__{train_centre}__s0"]
    res2 = pd.read_csv(folder / "results.csv")
    assert len(res2) == len(res)
    assert len(pd.read_csv(folder / "per_image.csv").query("arm == 'multitask' and protocol == 'paper'")) == len(
        pd.read_csv(folder / "per_image.csv").query("arm == 'consistency' and protocol == 'paper'"))
    events = [e["event"] for e in json.loads((folder / "provenance.json").read_text())["events"]]
    assert events.count("resume") == 2


def test_a_site_left_out_of_a_round_is_found(tmp_path):
    """A site that missed a round's deadline in simulation changes the experiment: the unit must
    fail rather than report a model that one site trained alone."""
    pd.DataFrame({"round": [1, 1, 1, 2, 2], "phase": ["train", "train", "train", "train", "evaluate"],
                  "site": ["A", "B", "all-sites", "A", "B"], "metric": ["train_loss"] * 4 + ["dice"],
                  "value": [1.0] * 5}).to_csv(tmp_path / "metrics.csv", index=False)
    assert missing_updates(tmp_path, ["A", "B"], 2) == [(2, "B")]
    assert missing_updates(tmp_path / "none", ["A"], 1) == [(1, "A")]


@pytest.mark.xdist_group("ray")  # one Ray cluster at a time under pytest -n
def test_federated_protocol_runs_flower_simulation(tmp_path):
    out = tmp_path / "runs"
    sites = list(lco.site_specs(SimConfig()))[:3]
    assert lco.main([*TINY, "--protocols", "federated", "--set", "sim.strategies=fedprox",
                     "--set", f"sim.centres={','.join(sites)}", "--set", f"sim.held_out={sites[0]}",
                     "--set", "sim.epsilons=3", "--out", str(out)]) == 0
    folder = _run_folder(out)
    for name in EXPECTED_FILES:
        assert (folder / name).is_file(), name
    assert (folder / "dice_box_federated.png").is_file() and (folder / "curves_federated.png").is_file()
    res = pd.read_csv(folder / "results.csv")
    assert set(res["protocol"]) == {"fedprox"}
    assert set(res["test_centre"]) == {sites[0]} and set(res["train_set"]) == {"+".join(sites[1:])}
    # DP arm: every simulated site ran DP-SGD from the experiment the server sent, within budget
    assert set(res["arm"]) == {"consistency", "consistency-eps3"}
    spent = res[res["metric"] == "epsilon"]["value"]
    assert len(spent) == 1 and 0 < spent.iloc[0] <= 3.0
    dp_dir = folder / "federated" / f"fedprox__consistency-eps3__{'+'.join(sites[1:])}__s0"
    ledgers = [json.loads(p.read_text()) for p in dp_dir.glob("site-state/*/privacy/accountant.json")]
    assert len(ledgers) == 2 and max(s["epsilon"] for s in ledgers) == pytest.approx(spent.iloc[0])
    assert "## Utility cost of sample-level DP-SGD" in (folder / "report.md").read_text()
    # The server app ran the rounds and wrote its own run folder inside ours.
    server_dir = folder / "federated" / f"fedprox__consistency__{'+'.join(sites[1:])}__s0"
    status = json.loads((server_dir / "status.json").read_text())
    assert status["state"] == "finished" and (server_dir / "checkpoint.pt").is_file()
    assert missing_updates(server_dir, sites[1:], 1) == []
    curves = pd.read_csv(folder / "curves.csv")
    assert list(curves["step_kind"].unique()) == ["round"] and curves["val_dice"].notna().all()
    assert "Protocol 2" in (folder / "report.md").read_text()


@pytest.mark.integration
def test_real_data_quick_smoke(tmp_path):
    if not DATA_ROOT.is_dir():
        pytest.skip(f"no real data at {DATA_ROOT}")
    out = tmp_path / "runs"
    # BrEaST and BUSI only: sites load strictly and BUS-UCLM has 4 unalignable masks.
    assert lco.main(["--data-root", str(DATA_ROOT), *TINY, "--protocols", "paper",
                     "--set", "sim.arms=multitask,consistency", "--set", "sim.centres=BrEaST,BUSI",
                     "--out", str(out)]) == 0
    folder = _run_folder(out)
    res = pd.read_csv(folder / "results.csv")
    assert set(res["train_set"]) == {"BrEaST"}
    assert set(res["test_centre"]) == {"BUSI"}
    assert "published Dice" in (folder / "report.md").read_text()
