"""sim.public_centres: public pretraining without DP, then every paper arm fine-tunes from it."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import sim.leave_center_out as lco
from common.config import ConfigError
from common.modelfile import read_model
from common.settings import SimConfig, load_settings
from sim.protocols import plan_units
from sim.public import public_config

SYN = list(lco.site_specs(SimConfig()))[:3]  # three embedded synthetic centres


def test_the_plan_checks_public_centres_and_leaves_them_out_of_the_tests(tmp_path) -> None:
    train, public, test = SYN
    settings = load_settings("smoke", ["sim.protocols=paper", f"sim.public_centres={public}"])
    plan = plan_units(settings, SYN, train)
    assert plan and all(pu.test_sites == (test,) for pu in plan)
    for sets, match in ((f"sim.public_centres={train}", "is the private site"),
                        ("sim.public_centres=Nowhere", "not among the centres"),
                        (f"sim.public_centres={public},{test}", "no centre is left to test"),
                        (f"model.init_from={tmp_path / 'missing.pt'}", "missing.pt: no such file")):
        with pytest.raises(ConfigError, match=match):
            plan_units(load_settings("smoke", ["sim.protocols=paper", sets]), SYN, train)
    model_file = tmp_path / "m.pt"
    model_file.write_bytes(b"")
    with pytest.raises(ConfigError, match="both set the initial weights"):
        plan_units(load_settings("smoke", ["sim.protocols=paper", f"sim.public_centres={public}",
                                           f"model.init_from={model_file}"]), SYN, train)


def test_dp_refusals_stop_the_plan_before_anything_runs() -> None:
    settings = load_settings("smoke", ["sim.protocols=paper", "sim.epsilons=3", "train.channels_last=true"])
    with pytest.raises(ConfigError, match="privacy.enabled: train.channels_last"):
        plan_units(settings, SYN, SYN[0])


def test_the_public_pretraining_has_its_own_epochs_and_learning_rate() -> None:
    train, public, _test = SYN
    sets = ["sim.protocols=paper", f"sim.public_centres={public}", "sim.arms=consistency", "sim.epsilons=8",
            "train.lr=0.005", "train.epochs=3"]
    settings = load_settings("smoke", [*sets, "sim.public_epochs=7", "sim.public_lr=0.001"])
    private = next(pu for pu in plan_units(settings, SYN, train) if pu.unit.arm == "consistency-eps8")
    cfg = public_config(private, settings)
    assert (cfg.train.lr, cfg.train.epochs, cfg.privacy.enabled) == (0.001, 7, False)
    default = load_settings("smoke", sets)  # without them the public model trains as the arm does
    assert public_config(private, default).train.lr == 0.005
    with pytest.raises(ConfigError, match="sim.public_lr"):
        load_settings("smoke", [*sets, "sim.public_lr=0"])


def test_public_then_private_tiny_run(tmp_path) -> None:
    train, public, test = SYN
    out = tmp_path / "runs"
    assert lco.main(["--preset", "smoke", "--no-progress", "--protocols", "paper",
                     "--set", "sim.arms=consistency", "--set", "sim.epsilons=8,.inf",
                     "--set", f"sim.centres={','.join(SYN)}", "--set", f"sim.train_centre={train}",
                     "--set", f"sim.public_centres={public}", "--set", "sim.public_epochs=2",
                     "--set", "privacy.trainable=decoder", "--out", str(out)]) == 0
    (folder,) = sorted(out.glob("lco-*"))
    res = pd.read_csv(folder / "results.csv")
    assert set(res["arm"]) == {"consistency", "consistency-eps8"} and set(res["test_centre"]) == {test}
    (public_file,) = (folder / "public").glob("*.pt")  # one public model, shared by both arms
    pub_state, pub_meta = read_model(public_file)
    assert pub_meta["source"]["stage"] == "public" and not pub_meta["privacy"]["dp_sgd"]
    assert pub_meta["experiment"]["train"]["epochs"] == 2
    for arm in ("consistency", "consistency-eps8"):
        state, meta = read_model(folder / "models" / f"paper__{arm}__{train}__s0.pt")
        assert meta["source"]["init_from"] == str(public_file.resolve())  # provenance, not a dependency
        assert meta["experiment"]["model"]["init_from"] is None
        enc = [k for k in state if k.startswith("backbone.encoder.")]
        same = all(torch.equal(state[k], pub_state[k]) for k in enc)
        assert same == (arm == "consistency-eps8")  # DP trains the decoder only; without DP all trains


def test_two_workers_needing_the_same_public_model_train_it_once(tmp_path) -> None:
    import threading
    import time

    from common.federation import build_experiment_model
    from sim.public import public_model

    train, public, _ = SYN
    settings = load_settings("smoke", ["sim.protocols=paper", f"sim.public_centres={public}"])
    pu = next(p for p in plan_units(settings, SYN, train) if p.unit.arm == "consistency")
    calls: list[int] = []

    def fit(unit, cfg):
        calls.append(1)
        time.sleep(0.5)  # the other worker arrives meanwhile
        return build_experiment_model(cfg), {public: {"train": 1, "val": 0}}

    paths: list = []
    workers = [threading.Thread(target=lambda: paths.append(public_model(pu, settings, fit, tmp_path)))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert len(calls) == 1 and len(paths) == 2 and paths[0] == paths[1] and paths[0].is_file()
