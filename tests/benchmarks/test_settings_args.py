"""The benchmarks' one configuration door (benchmarks/perfutil.py): --preset/--set through
common.settings.load_settings, and what each benchmark builds from it."""
import argparse
from pathlib import Path

import pytest

from benchmarks import deployment_overhead, perf_train, scale_sites, sim_overhead
from benchmarks.perfutil import add_settings_args, settings_from_args, settings_source, write_settings
from common.federation import spec_from_dict
from common.settings import load_settings


def parse(argv, preset="cpu-fast", default_set=()):
    p = argparse.ArgumentParser()
    add_settings_args(p, preset, default_set)
    return p.parse_args(argv)


def test_default_preset_takes_its_default_overrides_and_an_explicit_one_does_not():
    base = ("data.image_size=128", "train.batch_size=16")
    args = parse(["--set", "train.batch_size=4"], default_set=base)
    assert settings_source(args, ["train.epochs=2"]) == (
        "cpu-fast", ["data.image_size=128", "train.batch_size=16", "train.epochs=2", "train.batch_size=4"])
    s = settings_from_args(args, ["train.epochs=2"])
    assert (s.experiment.data.image_size, s.experiment.train.batch_size, s.experiment.train.epochs) == (128, 4, 2)
    explicit = settings_from_args(parse(["--preset", "smoke"], default_set=base))
    assert explicit == load_settings("smoke")  # taken as it is
    assert settings_from_args(parse([], default_set=base), source="smoke") == load_settings("smoke")


def test_a_bad_setting_exits_with_its_name(capsys):
    with pytest.raises(SystemExit) as exc:
        settings_from_args(parse(["--set", "train.epoch=3"]))
    assert exc.value.code == 2 and "unknown key(s) ['epoch']" in capsys.readouterr().err


def test_written_settings_load_again_as_they_are(tmp_path):
    s = load_settings("recommended", ["train.epochs=3", "sim.seeds=8,9"])
    path = write_settings(s, tmp_path / "sub" / "s.yaml")
    assert settings_from_args(parse(["--preset", str(path)])) == s


def test_perf_train_default_is_the_network_it_always_measured():
    exp = settings_from_args(parse([], perf_train.DEFAULT_PRESET, perf_train.DEFAULT_SET)).experiment
    m = exp.model
    assert (m.arch, m.base_channels, m.depth, exp.data.image_size, exp.train.batch_size) == ("small", 16, 4, 128, 16)
    cfg = perf_train.bench_train(load_settings("recommended"), epochs=1, threads=1)
    assert (cfg.epochs, cfg.num_threads, cfg.device, cfg.progress, cfg.channels_last) == (1, 1, "cpu", False, False)


def test_sim_overhead_spec_is_the_settings_with_every_site_each_round(tmp_path):
    s = load_settings("cpu-fast", ["sim.synthetic_n=10", "federation.strategy=fedprox"])
    spec = sim_overhead.build_spec(tmp_path / "run", 5, s)
    assert spec.experiment.model == s.experiment.model and spec.experiment.train.num_threads == 1
    assert (spec.federation.rounds, spec.federation.local_epochs, spec.federation.strategy) == (4, 2, "fedprox")
    assert (spec.federation.min_sites, spec.federation.central_eval) == (5, False)
    assert [x.synthetic_n for x in spec.sites] == [10] * 5 and len({x.name for x in spec.sites}) == 5


def test_scale_sites_default_is_smoke_with_three_rounds_of_twelve_cases():
    s = settings_from_args(parse([], scale_sites.DEFAULT_PRESET, scale_sites.DEFAULT_SET))
    assert s.experiment == load_settings("smoke").experiment
    assert (s.federation.rounds, s.sim.synthetic_n) == (3, 12)


def test_deployment_spec_puts_federation_under_experiment_and_keeps_the_fixed_conditions():
    args = parse(["--set", "federation.rounds=2", "--set", "federation.min_sites=1"],
                 deployment_overhead.DEFAULT_PRESET, deployment_overhead.DEFAULT_SET)
    doc = deployment_overhead.experiment_doc(*settings_source(args, deployment_overhead.TINY_MODEL), "stock")
    raw = deployment_overhead.run_spec(doc, 8, Path("run"))
    assert set(raw) == {"experiment", "sites", "run_dir"} and doc["preset"] == "smoke"
    spec = spec_from_dict(raw)
    fed, exp = spec.federation, spec.experiment
    assert (fed.rounds, fed.min_sites, fed.central_eval, fed.packed_weights) == (2, 3, False, False)
    assert (exp.model.base_channels, exp.model.depth, exp.train.batch_size, exp.data.augment) == (4, 2, 8, False)
    assert exp.data.image_size == load_settings("smoke").experiment.data.image_size
