"""common/privacy.py: DP-SGD on the real model, ε accounting across rounds/restarts, budget stop."""
from __future__ import annotations

import json
import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from common.accounting import group_epsilon, per_patient_bound, plan_noise_multiplier, poisson_rate
from common.config import PAPER_FEATURES, ConfigError, LossConfig, ModelConfig, PrivacyConfig, TrainConfig
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.model import build_model
from common.privacy import PrivacyBudgetExceeded, PrivacySession, unwrap_state_dict
from common.privacy_state import load_state, most_spent, save_state, state_from_text, state_to_text
from common.train import train_local

SIZE = 32
TINY = ModelConfig(base_channels=4, depth=2, num_groups=2)
N, B = 24, 8


@pytest.fixture(scope="module")
def data():
    return to_tensors(make_centre("SynPL", N, size=SIZE, seed=0), SIZE)


def fresh(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY, PAPER_FEATURES)


def tcfg(epochs: int = 1, seed: int = 0, **kw) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=B, lr=1e-3, progress=False, device="cpu",
                       seed=seed, num_threads=1, **kw)


def pcfg(**kw) -> PrivacyConfig:
    base = dict(enabled=True, target_epsilon=3.0, target_delta=1e-3, planned_epochs=2, max_grad_norm=1.0)
    base.update(kw)
    return PrivacyConfig(**base)


def session(cfg: PrivacyConfig, state=None, epochs: int = 1, n: int = N, b: int = B) -> PrivacySession:
    return PrivacySession(cfg, num_examples=n, batch_size=b, epochs=epochs, state=state, site="A")


def one_round(data, cfg: PrivacyConfig, state=None, seed: int = 0, epochs: int = 1):
    model, sess = fresh(), session(cfg, state, epochs)
    res = train_local(model, data, tcfg(epochs, seed), LossConfig(pos_weight=1.0), privacy=sess, augment=False)
    sess.close()
    return model, sess, res


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta)


# ------------------------------------------------------------------ training with the real model
def test_dp_training_runs_on_the_real_model_and_returns_plain_keys(data) -> None:
    plain = fresh()
    model, sess, res = one_round(data, pcfg())
    state = model.state_dict()
    assert list(state) == list(plain.state_dict())  # no "_module." prefixes
    assert list(unwrap_state_dict(model)) == list(state)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any(not torch.equal(state[k], v) for k, v in plain.state_dict().items())
    assert sess.steps == sess.planned_steps == 3  # q = 1/3: 3 steps per epoch
    assert 0 < res.steps <= sess.steps  # empty Poisson draws are noise-only steps
    # the prior's running statistics are not updated from private batches
    assert torch.equal(state["prior.running_mean"], plain.state_dict()["prior.running_mean"])
    assert model.prior.track_running_stats  # restored by close()


def test_channels_last_is_refused_under_dp_because_opacus_per_sample_gradients_break(data) -> None:
    # Opacus 1.6 computes wrong conv per-sample gradients for channels-last tensors (their batch
    # mean is not the true gradient), so DP must not train channels-last: refused, nothing spent.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8),
                              torch.nn.Conv2d(8, 4, 3, padding=1, stride=2)).to(memory_format=torch.channels_last)
    gsm = GradSampleModule(net, loss_reduction="mean")
    (gsm(torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)) ** 2).mean().backward()
    conv = gsm._module[0].weight
    assert not torch.allclose(conv.grad_sample.mean(0), conv.grad, rtol=1e-3, atol=1e-4)
    model, sess = fresh(), session(pcfg())
    with pytest.raises(ValueError, match="refused before training: train.channels_last"):
        train_local(model, data, tcfg(channels_last=True), LossConfig(pos_weight=1.0), privacy=sess, augment=False)
    assert sess.steps == 0 and sess.epsilon() == 0.0


def test_opacus_per_sample_conv_gradients_average_to_the_gradient_on_contiguous_tensors() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8),
                              torch.nn.Conv2d(8, 4, 3, padding=1, stride=2))
    gsm = GradSampleModule(net, loss_reduction="mean")
    (gsm(torch.randn(4, 3, 16, 16)) ** 2).mean().backward()
    for p in gsm.parameters():
        torch.testing.assert_close(p.grad_sample.mean(0), p.grad, rtol=1e-4, atol=1e-5)


def test_unwrap_state_dict_strips_the_grad_sample_prefix() -> None:
    model = fresh()
    gsm = GradSampleModule(model)
    assert all(k.startswith("_module.") for k in gsm.state_dict())
    assert list(unwrap_state_dict(gsm)) == list(model.state_dict())


def test_epsilon_matches_a_fresh_opacus_accountant_for_the_same_steps(data) -> None:
    _, sess, _ = one_round(data, pcfg())
    q, _ = poisson_rate(N, B)
    expected = opacus_epsilon(sess.noise_multiplier, q, sess.steps, 1e-3)
    assert sess.epsilon() == pytest.approx(expected, rel=1e-9)
    assert sess.epsilon_this_round == pytest.approx(expected)
    assert sess.metrics() == {"epsilon": sess.epsilon(), "epsilon_round": sess.epsilon_this_round}


def test_accountant_survives_a_process_restart_and_epsilon_continues(data, tmp_path) -> None:
    cfg = pcfg(planned_epochs=3)
    _, s1, _ = one_round(data, cfg)
    path = save_state(tmp_path / "privacy" / "accountant.json", s1.state_dict())
    restored = load_state(path)  # what the next process reads
    assert restored == json.loads(json.dumps(s1.state_dict()))
    assert state_from_text(state_to_text(restored)) == restored
    _, s2, _ = one_round(data, cfg, state=restored, seed=1)
    assert s2.noise_multiplier == s1.noise_multiplier  # planned once, reused
    assert s2.epsilon_before == pytest.approx(s1.epsilon())
    total = opacus_epsilon(s1.noise_multiplier, poisson_rate(N, B)[0], s1.steps + s2.steps, 1e-3)
    assert s2.epsilon() == pytest.approx(total, rel=1e-9) and s2.epsilon() > s1.epsilon()
    assert s2.epsilon_this_round == pytest.approx(total - s1.epsilon())
    ledger = s2.state_dict()["rounds"]
    assert [r["steps"] for r in ledger] == [3, 3] and ledger[-1]["epsilon"] == pytest.approx(total)


def test_noise_is_planned_for_the_whole_budget_and_the_site_stops_before_exceeding_it(data) -> None:
    cfg = pcfg(target_epsilon=3.0, planned_epochs=2)
    _, s1, _ = one_round(data, cfg)
    q, steps = poisson_rate(N, B)
    assert s1.noise_multiplier == get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-3, sample_rate=q, steps=2 * steps, epsilon_tolerance=0.01)
    _, s2, _ = one_round(data, cfg, state=s1.state_dict(), seed=1)
    assert 0 < s1.epsilon() < s2.epsilon()
    assert 2.9 < s2.epsilon() <= 3.0  # the plan lands just under the target
    s3 = session(cfg, s2.state_dict())
    assert s3.predicted_epsilon() > 3.0
    with pytest.raises(PrivacyBudgetExceeded, match=r"site A: privacy budget exhausted .*eps=3\b"):
        s3.check_budget()
    model, before = fresh(), fresh().state_dict()
    with pytest.raises(PrivacyBudgetExceeded):  # train_local refuses before any step
        train_local(model, data, tcfg(), LossConfig(pos_weight=1.0), privacy=s3, augment=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert s3.epsilon() == pytest.approx(s2.epsilon())  # nothing spent
    assert session(pcfg(target_epsilon=5.0, planned_epochs=2), s2.state_dict()).noise_multiplier == \
        s1.noise_multiplier  # a changed config does not re-plan the noise


def test_an_empty_poisson_draw_is_a_noise_only_step_and_is_accounted(data) -> None:
    small = data.subset(torch.arange(2))
    cfg = pcfg(target_epsilon=None, noise_multiplier=1.0)
    sess = PrivacySession(cfg, num_examples=2, batch_size=1, epochs=8, site="A")  # q = 1/2
    res = train_local(fresh(), small, TrainConfig(epochs=8, batch_size=1, progress=False, device="cpu",
                                                  seed=3, num_threads=1),
                      LossConfig(pos_weight=1.0), privacy=sess, augment=False)
    assert sess.steps == sess.planned_steps == 16
    assert res.steps < sess.steps  # some draws were empty (P = 1/4 each) and not trained on
    assert sess.epsilon() == pytest.approx(opacus_epsilon(1.0, 0.5, 16, 1e-3))


def test_extra_grad_runs_once_per_step_after_the_noise(data) -> None:
    model = fresh()
    sess = session(pcfg())
    calls: list[bool] = []

    def extra() -> None:  # the noised, scaled gradient is in .grad when it runs
        calls.append(all(p.grad is not None for p in model.parameters() if p.requires_grad))

    from common.losses import MultiTaskLoss

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    module, dp_opt, epoch = sess.wrap(model, opt, data, batch_size=B, generator=torch.Generator().manual_seed(0),
                                      extra_grad=extra)
    loss_fn = MultiTaskLoss(LossConfig(pos_weight=1.0), 1.0)
    for batch in epoch():
        dp_opt.zero_grad(set_to_none=True)
        total, _ = loss_fn(*module(batch["image"]), batch, model.prior)
        total.backward()
        dp_opt.step()
        sess.after_step()
    assert len(calls) == sess.steps == 3 and all(calls)
    with pytest.raises(RuntimeError, match="once"):
        sess.wrap(model, opt, data, batch_size=B, generator=torch.Generator(), extra_grad=None)


# ------------------------------------------------------------------ accounting helpers
def test_plan_matches_the_verified_opacus_value_and_fixed_sigma_is_kept() -> None:
    # flower notes §2: eps 8, delta 1e-3, q 0.125, 5 epochs -> sigma 0.757, eps 7.99
    sigma = plan_noise_multiplier(pcfg(target_epsilon=8.0, planned_epochs=5), 0.125, 8)
    assert sigma == pytest.approx(0.757, abs=1e-3)
    assert opacus_epsilon(sigma, 0.125, 40, 1e-3) == pytest.approx(7.99, abs=0.01)
    assert plan_noise_multiplier(pcfg(noise_multiplier=1.3), 0.125, 8) == 1.3


def test_poisson_rate_follows_opacus_rounding() -> None:
    assert poisson_rate(24, 8) == (1 / 3, 3)
    q, steps = poisson_rate(93 * 4, 4)  # int(1/(1/93)) == 92 in floating point, as in Opacus
    assert q == 1 / 93 and steps == int(1 / q)


@pytest.mark.parametrize("kw, match", [
    (dict(target_epsilon=None, noise_multiplier=None), "target_epsilon"),
    (dict(target_delta=1.0), "target_delta"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(accountant="moments"), "accountant"),
    (dict(planned_epochs=0), "planned_epochs"),
])
def test_invalid_privacy_configs_are_refused(kw, match) -> None:
    with pytest.raises(ConfigError, match=match):
        session(pcfg(**kw))


def test_group_privacy_bound_is_hand_computable() -> None:
    assert group_epsilon(1.0, 1e-5, 1) == (1.0, 1e-5)
    eps, delta = group_epsilon(1.0, 1e-5, 3)
    assert eps == 3.0 and delta == pytest.approx(3 * math.exp(2) * 1e-5)
    assert per_patient_bound(2.0, 1e-6, ["p1", "p2", "p1", "p3"]) == group_epsilon(2.0, 1e-6, 2)


def test_state_files_are_atomic_validated_and_the_larger_spend_wins(tmp_path) -> None:
    assert load_state(tmp_path / "none.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_state(bad)
    a = {"format": 1, "history": [[1.0, 0.5, 4]]}
    b = {"format": 1, "history": [[1.0, 0.5, 4], [1.0, 0.5, 2]]}
    save_state(tmp_path / "s.json", a)
    assert load_state(tmp_path / "s.json") == a
    assert [p.name for p in tmp_path.iterdir()].count("s.json") == 1
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    assert most_spent(a, None, b) == b and most_spent(None) is None
    with pytest.raises(ValueError, match="history"):
        state_from_text(json.dumps({"format": 1, "history": [[1.0, 0.5]]}))


def test_dp_trains_the_prior_in_classifier_mode(data) -> None:
    # the consistency term reaches the prior's weights in every mode, so under DP they need
    # (and get) per-sample gradients instead of being frozen
    model, sess = fresh(), session(pcfg())
    before = model.prior.head.raw_weight.detach().clone()
    train_local(model, data, tcfg(), LossConfig(pos_weight=1.0, consistency_grad="classifier"),
                privacy=sess, augment=False)
    sess.close()
    assert not torch.equal(model.prior.head.raw_weight.detach(), before)
