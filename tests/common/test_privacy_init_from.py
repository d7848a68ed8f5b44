"""model.init_from (common/init_from.py): public → private fine-tuning from an earlier model,
strict and refused before training with the path named."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from common.checkpoint import save_checkpoint
from common.config import (
    PAPER_FEATURES,
    ConfigError,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
)
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.federation import build_experiment_model, load_run_spec
from common.init_from import InitFromError
from common.model import build_model
from common.modelfile import save_model
from common.privacy import PrivacySession
from common.train import ENCODER_PREFIX, train_local

SIZE = 32
TINY = ModelConfig(base_channels=4, depth=2, num_groups=2, dropout=0.0)
EXP = ExperimentConfig(model=TINY)


def trained_public(seed: int = 1) -> torch.nn.Module:
    """A tiny model with weights unlike a fresh initialisation (a different init seed)."""
    torch.manual_seed(seed)
    model = build_model(TINY, PAPER_FEATURES)
    with torch.no_grad():
        model.prior.running_mean.add_(0.5)  # buffers travel too
    return model


def built_from(path, features=PAPER_FEATURES) -> torch.nn.Module:
    """The experiment's network started from ``path`` (the one place init_from is read)."""
    model = dataclasses.replace(TINY, init_from=str(path))
    return build_experiment_model(dataclasses.replace(EXP, model=model, loss=LossConfig(features=tuple(features))))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_model_file_sets_every_weight(tmp_path) -> None:
    public = trained_public()
    path = save_model(tmp_path / "public.pt", public, EXP, name="public")
    torch.manual_seed(0)
    assert not same_weights(build_model(TINY, PAPER_FEATURES), public)
    built = build_experiment_model(dataclasses.replace(EXP, model=dataclasses.replace(TINY, init_from=str(path))))
    assert same_weights(built, public)


def test_a_training_checkpoint_sets_every_weight(tmp_path) -> None:
    public = trained_public(2)
    path = save_checkpoint(tmp_path / "ck.pt", public.state_dict(), EXP, round=3)
    built = built_from(path)
    assert same_weights(built, public)


@pytest.mark.parametrize("bad", ["missing", "text", "foreign", "other_arch", "other_features", "tampered"])
def test_unusable_files_are_refused_naming_the_path(tmp_path, bad) -> None:
    path = tmp_path / f"{bad}.pt"
    features = PAPER_FEATURES
    if bad == "text":
        path.write_text("not a model")
    elif bad == "foreign":
        torch.save(trained_public().state_dict(), path)  # a bare state_dict: no format, no provenance
    elif bad == "other_arch":
        other = dataclasses.replace(TINY, base_channels=8)
        save_model(path, build_model(other, PAPER_FEATURES), dataclasses.replace(EXP, model=other), name="x")
    elif bad == "other_features":
        save_model(path, trained_public(), EXP, name="x")
        features = ("area", "roughness", "compactness", "posterior")  # same count, other meaning
    elif bad == "tampered":
        save_model(path, trained_public(), EXP, name="x")
        payload = torch.load(path, weights_only=True)
        payload["state_dict"]["head.fc.bias"].add_(1.0)  # an edit after writing
        torch.save(payload, path)
    match = {"missing": "no such file", "text": "not a readable", "foreign": "neither a fedbus model file",
             "other_arch": "another network", "other_features": "features", "tampered": "SHA-256"}[bad]
    with pytest.raises(InitFromError, match=match) as err:
        built_from(path, features)
    assert str(path) in str(err.value) and "model.init_from" in str(err.value)


def test_init_from_must_be_a_path_and_a_run_spec_resolves_it_against_its_folder(tmp_path) -> None:
    with pytest.raises(ConfigError, match="model.init_from"):
        ModelConfig(init_from=" ")
    (tmp_path / "spec.yaml").write_text(
        "experiment: {preset: smoke, model: {init_from: models/public.pt}}\n"
        "sites: [{name: A, synthetic_centre: SynPL}, {name: B, synthetic_centre: SynEG}]\n")
    spec = load_run_spec(tmp_path / "spec.yaml")
    assert spec.experiment.model.init_from == str(tmp_path / "models" / "public.pt")


def test_public_to_private_fine_tune_with_a_frozen_encoder(tmp_path) -> None:
    """The recipe end to end on tiny data: a public model file, DP-SGD fine-tuning of the
    decoder, heads and prior at the private site; the encoder stays the public one."""
    data = to_tensors(make_centre("SynPL", 24, size=SIZE, seed=0), SIZE)
    public = trained_public()
    path = save_model(tmp_path / "public.pt", public, EXP, name="public")
    model = built_from(path)
    cfg = PrivacyConfig(enabled=True, target_epsilon=8.0, target_delta=1e-3, planned_epochs=1, trainable="decoder")
    sess = PrivacySession(cfg, num_examples=len(data), batch_size=8, epochs=1, site="private")
    train_local(model, data, TrainConfig(epochs=1, batch_size=8, lr=0.05, optimizer="sgd", progress=False,
                                         device="cpu", num_threads=1), LossConfig(pos_weight=1.0),
                privacy=sess, augment=False)
    sess.close()
    before, after = public.state_dict(), model.state_dict()
    enc = [k for k in after if k.startswith(ENCODER_PREFIX) and k.endswith("weight")]
    rest = [k for k in after if not k.startswith(ENCODER_PREFIX) and k.endswith("weight")]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in rest)
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone after training
    assert 0 < sess.epsilon() <= 8.0
