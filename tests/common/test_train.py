import math
import time

import pytest
import torch

from common.config import PAPER_FEATURES, LossConfig, ModelConfig, TrainConfig, replace
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.losses import MultiTaskLoss
from common.model import build_model
from common.schedule import RunPosition
from common.optim import build_optimizer
from common.train import balanced_pos_weight, train_local

SIZE = 32
TINY = ModelConfig(depth=3, base_channels=8)


@pytest.fixture(scope="module")
def data():
    return to_tensors(make_centre("SynPL", 16, size=SIZE, seed=0), SIZE)


def fresh(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(TINY, PAPER_FEATURES)


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=8, lr=3e-3, progress=False, device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def distance(model, state) -> float:
    return math.sqrt(sum(float(((p.detach() - state[n]) ** 2).sum())
                         for n, p in model.named_parameters()))


def test_loss_decreases_and_result_is_complete(data):
    model = fresh()
    t0 = time.perf_counter()
    res = train_local(model, data, cfg(epochs=4), LossConfig(), augment=False)
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert res.num_examples == 16 and res.epochs == 4 and res.steps == 8
    assert res.loss == pytest.approx(losses[-1])
    assert {"seg", "dice", "bce", "cls", "consistency", "prior_sup", "total", "proximal"} <= set(res.parts)
    assert 0 < res.seconds <= wall and res.images_per_s >= 16 * 4 / wall
    assert all(k in res.history[0] for k in ("epoch", "seconds", "lr"))
    assert model.training


def test_same_seed_same_weights_different_seed_differs(data):
    a, b, c = fresh(), fresh(), fresh()
    train_local(a, data, cfg(epochs=1), LossConfig())
    train_local(b, data, cfg(epochs=1), LossConfig())
    train_local(c, data, cfg(epochs=1, seed=1), LossConfig())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_fedprox_large_mu_stays_near_the_global_weights(data):
    start = fresh()
    global_state = {k: v.clone() for k, v in start.state_dict().items()}
    sgd = cfg(optimizer="sgd", lr=0.02, schedule="constant", epochs=3)
    free, prox = fresh(), fresh()
    r0 = train_local(free, data, sgd, LossConfig(), global_state=global_state, proximal_mu=0.0)
    r1 = train_local(prox, data, sgd, LossConfig(), global_state=global_state, proximal_mu=20.0)
    assert distance(prox, global_state) < 0.5 * distance(free, global_state)
    assert r0.parts["proximal"] == 0.0 and r1.parts["proximal"] > 0.0
    # proximal_mu=None falls back to train_cfg.proximal_mu
    other = fresh()
    r2 = train_local(other, data, cfg(optimizer="sgd", lr=0.02, schedule="constant", epochs=3,
                                      proximal_mu=20.0), LossConfig(), global_state=global_state)
    assert r2.parts["proximal"] == pytest.approx(r1.parts["proximal"])


def test_fedprox_value_is_half_mu_squared_norm(data):
    # with lr 0 nothing moves: the reported term is exactly (mu/2)·||w0 − g||² for a shifted g
    model = fresh()
    g = {k: v + 0.1 for k, v in model.state_dict().items()}
    n = sum(p.numel() for p in model.parameters())
    res = train_local(model, data, cfg(epochs=1, lr=0.0, optimizer="sgd", weight_decay=0.0),
                      LossConfig(), global_state=g, proximal_mu=2.0)
    assert res.parts["proximal"] == pytest.approx(0.5 * 2.0 * n * 0.01, rel=1e-4)


class FakeSession:
    """Records the seam's calls; plain batches, no noise."""

    def __init__(self):
        self.steps, self.wrapped, self.extra, self.filled = 0, False, 0, []

    def wrap(self, model, optimizer, data, *, batch_size, generator, extra_grad):
        from common.data.tensors import batches
        self.wrapped = True

        def before_update(opt, args, kwargs):  # where a DP optimiser has added its noise
            if extra_grad is not None:
                extra_grad()
                self.extra += 1

        optimizer.register_step_pre_hook(before_update)
        return model, optimizer, lambda: batches(data, batch_size, shuffle=True, generator=generator)

    def after_step(self):
        self.steps += 1

    def fill_unused(self, rows):
        self.filled.append(rows)


def test_privacy_seam_is_called_and_keys_stay_plain(data):
    model = fresh()
    keys = list(model.state_dict())
    session = FakeSession()
    g = {k: v.clone() for k, v in model.state_dict().items()}
    res = train_local(model, data, cfg(epochs=1), LossConfig(), privacy=session,
                      global_state=g, proximal_mu=1.0)
    assert session.wrapped and session.steps == res.steps == 2 and session.extra == 2
    assert sum(session.filled) == len(data) and len(session.filled) == 2  # once per pass, its rows
    assert list(model.state_dict()) == keys


def test_balanced_pos_weight():
    assert balanced_pos_weight(torch.tensor([1.0, 0.0, 0.0, 0.0])) == 3.0
    assert balanced_pos_weight(torch.zeros(4)) == 1.0


def test_empty_data_and_bad_optimizer_raise(data):
    with pytest.raises(ValueError, match="no training images"):
        train_local(fresh(), data.subset([]), cfg(), LossConfig())
    with pytest.raises(ValueError, match="optimizer"):
        train_local(fresh(), data, cfg(optimizer="lbfgs"), LossConfig())


def test_on_epoch_end_receives_each_epoch(data):
    seen = []
    model = fresh()
    train_local(model, data, cfg(epochs=2), LossConfig(),
                on_epoch_end=lambda e, rec: (seen.append((e, rec["loss"])), model.eval()))
    assert [e for e, _ in seen] == [1, 2] and model.training


@pytest.mark.parametrize("name,kwargs", [("AdamW", dict(lr=1e-2, weight_decay=1e-2)),
                                         ("SGD", dict(lr=1e-2, momentum=0.9, weight_decay=1e-4))])
def test_eager_optimizer_matches_torch_and_keeps_hooks(name, kwargs):
    """The optimizer without torch's TorchDynamo guards takes exactly torch's steps, is still
    an instance of torch's class (LambdaLR, Opacus) and still runs step hooks."""
    from common.optim import eager

    base = getattr(torch.optim, name)
    cls = eager(base)
    assert cls is not base and issubclass(cls, base)
    torch.manual_seed(0)
    w0, grads = torch.randn(5, 3), [torch.randn(5, 3) for _ in range(4)]
    out = []
    for klass in (base, cls):
        w = torch.nn.Parameter(w0.clone())
        opt = klass([w], **kwargs)
        calls = []
        opt.register_step_post_hook(lambda *_: calls.append(1))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        for g in grads:
            opt.zero_grad(set_to_none=True)
            w.grad = g.clone()
            opt.step()
            sched.step()
        assert len(calls) == len(grads) and not w.grad.requires_grad
        out.append(w.detach().clone())
    assert torch.equal(out[0], out[1])


def test_encoder_lr_scale_puts_the_encoder_in_its_own_group():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="lite0"), PAPER_FEATURES)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(named, cfg(encoder_lr_scale=0.1, lr=1e-3))
    rest, enc = opt.param_groups
    n_enc = sum(1 for n, _ in named if n.startswith("backbone.encoder."))
    assert len(enc["params"]) == n_enc > 0 and len(rest["params"]) == len(named) - n_enc
    assert enc["lr"] == pytest.approx(1e-4) and rest["lr"] == pytest.approx(1e-3)
    assert len(build_optimizer(named, cfg(lr=1e-3)).param_groups) == 1  # default: one group
    with pytest.raises(ValueError, match="no 'backbone.encoder"):
        build_optimizer(list(torch.nn.Linear(2, 2).named_parameters()), cfg(encoder_lr_scale=0.1))


_SCHEDULED = MultiTaskLoss.scheduled_consistency


def _schedule_trace(data, monkeypatch, train_cfg: TrainConfig, loss_cfg: LossConfig,
                    calls: list[tuple[int, RunPosition]]) -> tuple[list[float], list[float]]:
    """(learning rate at every optimiser step, λ of every training step) over ``calls``, each a
    train_local of (epochs, position) continuing the same model."""
    import common.losses as losses_mod
    import common.train as train_mod

    lrs: list[float] = []
    lams: list[float] = []
    make, scheduled = build_optimizer, _SCHEDULED  # the originals, not an earlier trace's spies

    def spy_optimizer(named, cfg_):
        opt = make(named, cfg_)
        opt.register_step_pre_hook(lambda o, *_: lrs.append(o.param_groups[0]["lr"]))
        return opt

    def spy_lambda(self, end):
        lams.append(scheduled(self, end))
        return lams[-1]

    monkeypatch.setattr(train_mod, "build_optimizer", spy_optimizer)
    monkeypatch.setattr(losses_mod.MultiTaskLoss, "scheduled_consistency", spy_lambda)
    model = fresh()
    for epochs, position in calls:
        train_local(model, data, replace(train_cfg, epochs=epochs), loss_cfg, augment=False,
                    position=position)
    return lrs, lams


def test_schedules_count_the_whole_run_not_the_call(data, monkeypatch):
    """16 images in batches of 8: two steps per epoch, 4 epochs. LR warm-up 1 epoch then a cosine
    to 0 at epoch 4; λ = 0.4 after a 1-epoch warm-up and a 2-epoch ramp. One call of 4 epochs and
    two rounds of 2 (``RunPosition.for_round``) take the same LR and λ at every step; round 2
    continues the warm-up and the cosine where round 1 left them."""
    train_cfg = cfg(lr=0.01, schedule="cosine", warmup_epochs=1.0)
    loss_cfg = LossConfig(consistency=0.4, consistency_warmup_epochs=1.0, consistency_ramp_epochs=2.0)
    cos = [0.5 * (1 + math.cos(math.pi * (s - 1) / 3)) for s in (1.5, 2.0, 2.5, 3.0, 3.5)]
    want_lr = [0.01 * f for f in (0.5, 1.0, 1.0, *cos)]
    want_lam = [0.4 * f for f in (0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0)]

    whole = _schedule_trace(data, monkeypatch, train_cfg, loss_cfg, [(4, RunPosition())])
    rounds = _schedule_trace(data, monkeypatch, train_cfg, loss_cfg,
                             [(2, RunPosition.for_round(r, 2, 2)) for r in (1, 2)])
    for lrs, lams in (whole, rounds):
        assert lrs == pytest.approx(want_lr, rel=1e-12)
        assert lams == pytest.approx(want_lam, rel=1e-12)
    assert whole == rounds  # the same floats, not just close
    # a call that ignored its position would restart both warm-ups in round 2
    restarted = _schedule_trace(data, monkeypatch, train_cfg, loss_cfg, [(2, RunPosition())] * 2)
    assert restarted[1][4] == 0.0 and rounds[1][4] > 0.0
    assert restarted[0][4] == pytest.approx(0.005) and rounds[0][4] == pytest.approx(0.0075)


def test_a_call_that_overruns_its_run_is_refused(data):
    with pytest.raises(ValueError, match="overruns"):
        train_local(fresh(), data, cfg(epochs=2), LossConfig(), position=RunPosition(3, 4))
    with pytest.raises(ValueError, match="train.schedule"):
        train_local(fresh(), data, cfg(schedule="step"), LossConfig())


def test_prior_learns_in_classifier_mode_and_is_logged(data):
    model = fresh()
    before = {k: v.clone() for k, v in model.prior.state_dict().items()}
    loss = LossConfig(consistency_grad="classifier", consistency=1.0)
    res = train_local(model, data, cfg(epochs=2), loss, augment=False)
    after = model.prior.state_dict()
    assert not torch.allclose(before["head.raw_weight"], after["head.raw_weight"])
    assert not torch.allclose(before["head.bias"], after["head.bias"])
    assert all(p.requires_grad for p in model.prior.parameters())  # nothing left frozen
    described = model.prior.describe()
    for name in PAPER_FEATURES:
        f = described["features"][name]
        assert res.history[-1][f"prior_w_{name}"] == pytest.approx(f["per_unit"])
        assert f["per_unit"] == pytest.approx(f["weight"] / f["std"])
        assert f"prior_w_{name}" not in res.parts
    assert res.history[0]["prior_bias"] != res.history[1]["prior_bias"]


def test_partial_annotations_train(data):
    # a label-only image: its mask is unknown (zeros), the lesion flag comes from its label
    part = replace_annotations(data, mask=[i % 2 == 0 for i in range(len(data))])
    res = train_local(fresh(), part, cfg(epochs=1), LossConfig(), augment=True)
    assert math.isfinite(res.loss)
    assert part.annotation_counts() == {"mask and label": 8, "mask only": 0, "label only": 8}


def replace_annotations(data, mask):
    from dataclasses import replace as dc_replace

    has_mask = torch.tensor(mask)
    masks = data.masks * has_mask[:, None, None, None]
    return dc_replace(data, masks=masks, has_mask=has_mask)
