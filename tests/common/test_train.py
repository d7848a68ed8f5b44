import math

import pytest
import torch

from common.config import PAPER_FEATURES, LossConfig, ModelConfig, TrainConfig
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.model import build_model
from common.train import _optimizer, balanced_pos_weight, train_local

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
    res = train_local(model, data, cfg(epochs=4), LossConfig(), augment=False)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert res.num_examples == 16 and res.epochs == 4 and res.steps == 8
    assert res.loss == pytest.approx(losses[-1])
    assert {"seg", "dice", "bce", "cls", "consistency", "prior_sup", "total", "proximal"} <= set(res.parts)
    assert res.seconds > 0 and res.images_per_s > 0
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
        self.steps, self.wrapped, self.extra = 0, False, 0

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


def test_privacy_seam_is_called_and_keys_stay_plain(data):
    model = fresh()
    keys = list(model.state_dict())
    session = FakeSession()
    g = {k: v.clone() for k, v in model.state_dict().items()}
    res = train_local(model, data, cfg(epochs=1), LossConfig(), privacy=session,
                      global_state=g, proximal_mu=1.0)
    assert session.wrapped and session.steps == res.steps == 2 and session.extra == 2
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
    from common.train import _eager

    base = getattr(torch.optim, name)
    cls = _eager(base)
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
    opt = _optimizer(named, cfg(encoder_lr_scale=0.1, lr=1e-3))
    rest, enc = opt.param_groups
    n_enc = sum(1 for n, _ in named if n.startswith("backbone.encoder."))
    assert len(enc["params"]) == n_enc > 0 and len(rest["params"]) == len(named) - n_enc
    assert enc["lr"] == pytest.approx(1e-4) and rest["lr"] == pytest.approx(1e-3)
    assert len(_optimizer(named, cfg(lr=1e-3)).param_groups) == 1  # default: one group
    with pytest.raises(ValueError, match="no 'backbone.encoder"):
        _optimizer(list(torch.nn.Linear(2, 2).named_parameters()), cfg(encoder_lr_scale=0.1))


@pytest.mark.parametrize("calm_epochs, splices", [(1, [0.5, 0.5, 0.0]), (0, [0.5] * 3), (5, [0.0] * 3)])
def test_calm_epochs_turn_the_centre_shift_transforms_off_at_the_end(data, monkeypatch, calm_epochs, splices):
    """16 images in batches of 8: two augment calls per epoch; the last ``calm_epochs`` epochs
    (all of them when it exceeds the epochs) get the geometry without splice/paste/stretch and
    with everything else kept."""
    import common.train as train_mod
    from common.config import AugmentConfig
    seen: list[AugmentConfig] = []
    real = train_mod.augment_batch

    def spy(raw, mask, generator, geometry):
        seen.append(geometry)
        return real(raw, mask, generator, geometry)

    monkeypatch.setattr(train_mod, "augment_batch", spy)
    geometry = AugmentConfig(depth_splice=0.5, lesion_paste=0.3, stretch=0.2, sharpness=0.4,
                             calm_epochs=calm_epochs)
    train_local(fresh(), data, cfg(epochs=3), LossConfig(), augment=geometry)
    assert [g.depth_splice for g in seen] == [s for s in splices for _ in range(2)]
    calm = [g for g in seen if g.depth_splice == 0]
    assert all(g.lesion_paste == 0 and g.stretch == 0 and g.sharpness == 0.4 for g in calm)


@pytest.mark.parametrize("low_res_epochs", [0, 2])
def test_low_res_epochs_train_the_first_epochs_on_shrunk_batches(low_res_epochs):
    """64-px images, scale 0.5: the first ``low_res_epochs`` epochs feed the network 32-px batches
    (masks shrunk with them, so the loss sees matching shapes), the rest 64 px."""
    data64 = to_tensors(make_centre("SynPL", 8, size=64, seed=0), 64)
    model = fresh()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[-1])))
    result = train_local(model, data64, cfg(epochs=3, low_res_epochs=low_res_epochs, low_res_scale=0.5),
                         LossConfig())
    expected = [32] * low_res_epochs + [64] * (3 - low_res_epochs)
    assert seen == expected and len(result.history) == 3
    assert all(math.isfinite(h["loss"]) for h in result.history)
