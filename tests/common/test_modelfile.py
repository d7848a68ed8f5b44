"""common/modelfile.py: the model file (weights + metadata + digests), ensemble manifests, the
training lesions' percentiles and the explanation of φ (common/prediction.py), and the
deployment's model.pt (server/state.py), on a smoke-sized network."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from common.checkpoint import save_checkpoint
from common.config import ALL_FEATURES, replace
from common.federation import FederationConfig, RunSpec, SiteSpec, build_experiment_model
from common.loaded_model import load_model, write_ensemble
from common.modelfile import FORMAT, PERCENTILES, ModelFileError, feature_stats, read_model, save_model
from common.prediction import ModelInfo, explain, percentile
from common.settings import load_settings
from server.state import MetricRow, ServerRunFolder

CFG = load_settings("smoke").experiment


def squares(sides: list[int], size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N,1,S,S) with a bright square of each side at the centre, and its mask."""
    images = torch.full((len(sides), 1, size, size), 0.2)
    masks = torch.zeros_like(images)
    for i, a in enumerate(sides):
        lo = (size - a) // 2
        masks[i, 0, lo:lo + a, lo:lo + a] = 1.0
    images += 0.6 * masks
    return images, masks


@pytest.fixture()
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_experiment_model(CFG)
    with torch.no_grad():  # a prior that has seen features: not the initial 0/1 statistics
        net.prior.running_mean.copy_(torch.arange(4.0))
        net.prior.running_var.fill_(4.0)
    return net.eval()


def test_round_trip_carries_weights_config_prior_and_provenance(tmp_path, model) -> None:
    data = {"centres": {"SynPL": {"train": 12, "val": 4}}}
    path = save_model(tmp_path / "m.pt", model, CFG, name="unit-a", data=data, epsilon=math.nan)
    state, meta = read_model(path)
    assert meta["format"] == FORMAT and meta["name"] == "unit-a"
    assert meta["preprocessing"]["image_size"] == 32 and meta["features"] == list(CFG.loss.features)
    assert meta["inference"] == {"flip": False, "depth_shifts": [], "largest_component": False,
                                 "ensemble": False, "threshold": 0.5}
    prior = meta["prior"]
    assert prior["mean"] == {"area": 0.0, "roughness": 1.0, "compactness": 2.0, "texture": 3.0}
    assert prior["std"]["area"] == pytest.approx(2.0, abs=1e-6)  # √(4 + 1e-6)
    assert prior["weights"] == pytest.approx(model.prior.weights()) and prior["clinical_sign"]["area"] == 1
    assert meta["data"] == data and meta["privacy"]["epsilon"] is None and meta["feature_stats"] is None
    assert meta["provenance"]["versions"]["torch"] == torch.__version__
    assert "SynPL" in json.dumps(meta) and ".png" not in json.dumps(meta)
    loaded = load_model(path)
    assert loaded.members[0].config == CFG and loaded.image_size == 32
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x), loaded.members[0].network()(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_changed_or_foreign_file_is_refused_with_the_reason(tmp_path, model) -> None:
    path = save_model(tmp_path / "m.pt", model, CFG, name="m")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["prior.head.bias"] = payload["state_dict"]["prior.head.bias"] + 1.0
    torch.save(payload, tmp_path / "weights.pt")
    with pytest.raises(ModelFileError, match=r"weights\.pt: SHA-256 mismatch.*tampered"):
        load_model(tmp_path / "weights.pt")
    payload = torch.load(path, weights_only=True)
    payload["metadata"] = payload["metadata"].replace('"image_size": 32', '"image_size": 64')
    torch.save(payload, tmp_path / "meta.pt")
    with pytest.raises(ModelFileError, match="SHA-256 mismatch"):
        load_model(tmp_path / "meta.pt")
    payload = torch.load(path, weights_only=True)
    payload["format"] = "fedbus-model/2"
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(ModelFileError, match=r"format 'fedbus-model/2', this fedbus reads 'fedbus-model/1'"):
        load_model(tmp_path / "future.pt")
    save_checkpoint(tmp_path / "checkpoint.pt", model.state_dict(), CFG)
    with pytest.raises(ModelFileError, match="training checkpoint, not a model file"):
        load_model(tmp_path / "checkpoint.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:4000])
    with pytest.raises(ModelFileError, match="cut.pt: not a readable model file"):
        load_model(tmp_path / "cut.pt")
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "absent.pt")


def test_feature_stats_are_the_percentiles_of_the_true_lesions_only() -> None:
    sides = list(range(4, 24))
    images, masks = squares([*sides, 0, 0])  # two images without a lesion
    stats = feature_stats(images, masks)
    assert stats["n_lesions"] == 20 and stats["percentiles"] == list(PERCENTILES)
    # area = √(a² / 32²) for a square of side a (− 1e-3, + 1e-6 inside the root)
    expected = np.percentile([a / 32 for a in sides], PERCENTILES)
    np.testing.assert_allclose(stats["quantiles"]["area"], expected, atol=2e-3)
    assert set(stats["quantiles"]) == set(ALL_FEATURES)
    assert feature_stats(*squares([0, 0])) is None


def test_percentile_and_explain_by_hand() -> None:
    prior = {"features": ["area", "margin_sharpness"], "weights": {"area": 1.0, "margin_sharpness": -2.0},
             "mean": {"area": 0.5, "margin_sharpness": 1.0}, "std": {"area": 0.1, "margin_sharpness": 1.0},
             "clip": 3.0, "clinical_sign": {"area": 1, "margin_sharpness": -1}}
    info = ModelInfo({"image_size": 32, "inference": {}, "priors": [prior],
                      "feature_stats": {"percentiles": [5, 50, 95],
                                        "quantiles": {"area": [0.1, 0.3, 0.5]}}})
    assert percentile(0.2, "area", info) == pytest.approx(27.5)  # halfway between P5 and P50
    assert percentile(0.9, "area", info) == 95.0 and percentile(0.2, "texture", info) is None
    feats = np.zeros(len(ALL_FEATURES))
    feats[ALL_FEATURES.index("area")] = 0.6  # z = 1
    feats[ALL_FEATURES.index("margin_sharpness")] = 1.5  # z = 0.5
    (first, second) = explain(feats, info)
    assert first[0] == "margin_sharpness" and first[3] == -1
    assert first[2] == pytest.approx(-2.0 * 3.0 * math.tanh(0.5 / 3.0))
    assert second[:2] == ("area", 0.6) and second[2] == pytest.approx(3.0 * math.tanh(1 / 3.0))


def test_an_ensemble_manifest_names_its_members_relative_to_itself(tmp_path, model) -> None:
    (tmp_path / "models").mkdir()
    a = save_model(tmp_path / "models" / "a.pt", model, CFG, name="a")
    b = save_model(tmp_path / "models" / "b.pt", model, replace(CFG, **{"train.seed": 5}), name="b")
    views = replace(CFG.inference, flip=True, ensemble=True)
    path = write_ensemble(tmp_path / "models" / "ens.yaml", [a, b], views, "arm-ens")
    assert "members:\n- a.pt\n- b.pt" in path.read_text()
    moved = tmp_path / "elsewhere"
    (tmp_path / "models").rename(moved)  # the folder travels as a whole
    ens = load_model(moved / "ens.yaml")
    assert ens.name == "arm-ens" and ens.inference.flip and [m.config.train.seed for m in ens.members] == [0, 5]
    assert len(ens.describe()["priors"]) == 2
    (moved / "b.pt").unlink()
    with pytest.raises(ModelFileError, match="b.pt: no such model file"):
        load_model(moved / "ens.yaml")
    (moved / "bad.yaml").write_text("format: something-else\n")
    with pytest.raises(ModelFileError, match="not a fedbus-ensemble/1 manifest"):
        load_model(moved / "bad.yaml")


def test_the_deployment_writes_model_pt_with_the_sites_counts(tmp_path, model) -> None:
    spec = RunSpec(experiment=CFG, federation=FederationConfig(rounds=2, strategy="fedbn"),
                   sites=(SiteSpec("A", synthetic_centre="SynPL"), SiteSpec("B", synthetic_centre="SynEG")),
                   run_dir=str(tmp_path))
    folder = ServerRunFolder(tmp_path)
    folder.append_metrics([MetricRow(1, "train", "A", "num-examples", 10), MetricRow(2, "train", "A", "num-examples", 11),
                           MetricRow(2, "train", "B", "num-examples", 7), MetricRow(2, "evaluate", "A", "n_images", 3),
                           MetricRow(2, "train", "A", "epsilon", 1.5), MetricRow(2, "train", "B", "epsilon", 2.5),
                           MetricRow(2, "train", "all-sites", "num-examples", 18)])
    path = folder.write_model(2, model.state_dict(), spec, "k1")
    assert path == tmp_path / "model.pt"
    _, meta = read_model(path)
    assert meta["data"] == {"centres": {"A": {"train": 11, "val": 3}, "B": {"train": 7}}}
    assert meta["privacy"]["epsilon"] == 2.5 and meta["source"]["round"] == 2
    assert meta["source"]["kind"] == "deployment" and "FedBN" in meta["source"]["note"]
