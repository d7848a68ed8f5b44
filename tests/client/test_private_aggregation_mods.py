"""The regular ClientApp's mods for client-level DP and SecAgg+: they act only on the messages of
runs that ask for them, so a site needs no setting of its own."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from client import secagg_app
from client.client_dp import ClippingRefused, client_dp_mod
from client.secagg_app import is_secagg_message, secagg_router
from common.clipping import clip_update

CONTEXT = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _train(config: dict, arrays: dict[str, torch.Tensor] | None = None, kind: str = MessageType.TRAIN) -> Message:
    arrays = arrays if arrays is not None else {"w": torch.zeros(2), "n": torch.tensor(0.0)}
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(config)}),
                   dst_node_id=7, message_type=kind)


def _site(new: dict[str, torch.Tensor]):
    """A train handler that replies with ``new`` weights."""
    calls: list[Message] = []

    def handler(msg: Message, _context: Context) -> Message:
        calls.append(msg)
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": 4.0})}),
                       reply_to=msg)

    return handler, calls


def test_clip_update_pairs_by_name_clips_0d_arrays_and_keeps_zero_updates() -> None:
    ref = {"w": np.zeros(2, np.float32), "n": np.array(0.0, np.float32)}
    out, norm = clip_update({"n": np.array(4.0, np.float32), "w": np.array([3.0, 0.0], np.float32)}, ref, 1.0)
    assert norm == 5.0 and list(out) == ["n", "w"]
    assert float(out["n"]) == pytest.approx(0.8) and out["n"].shape == () and out["n"].dtype == np.float32
    np.testing.assert_allclose(out["w"], [0.6, 0.0], rtol=1e-6)
    same, zero = clip_update(ref, ref, 1.0)
    assert zero == 0.0 and all(np.array_equal(same[k], ref[k]) for k in ref)
    assert clip_update({"w": ref["w"]}, ref, 1.0) is None  # a name missing
    assert clip_update({"w": np.zeros(3), "n": ref["n"]}, ref, 1.0) is None  # a shape differs
    assert clip_update({"w": np.array([np.nan, 0.0]), "n": ref["n"]}, ref, 1.0) is None


def test_a_round_with_a_clipping_norm_is_clipped_at_the_site() -> None:
    handler, calls = _site({"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(4.0)})  # update norm 5
    reply = client_dp_mod(_train({"clipping_norm": 0.5}), CONTEXT, handler)
    assert len(calls) == 1
    got = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert math.sqrt(float((got["w"] ** 2).sum()) + float(got["n"]) ** 2) == pytest.approx(0.5)
    assert float(got["n"]) == pytest.approx(0.4)  # the 0-d counter is clipped too
    assert reply.content["metrics"]["num-examples"] == 4.0


def test_rounds_without_a_clipping_norm_and_other_messages_pass_untouched() -> None:
    handler, _ = _site({"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(4.0)})
    for msg in (_train({}), _train({"clipping_norm": 0.5}, kind=MessageType.EVALUATE)):
        reply = client_dp_mod(msg, CONTEXT, handler)
        assert float(reply.content["arrays"]["n"].numpy()) == 4.0


def test_a_reply_that_cannot_be_clipped_is_refused() -> None:
    handler, _ = _site({"packed": torch.zeros(3)})
    with pytest.raises(ClippingRefused, match="packed weights or FedBN"):
        client_dp_mod(_train({"clipping_norm": 0.5}), CONTEXT, handler)


def test_the_router_sends_only_secagg_and_legacy_messages_to_the_secagg_app(monkeypatch) -> None:
    seen: list[Message] = []

    def fake_secagg_app(*_args, **_kwargs):
        def app(msg: Message, _context: Context) -> Message:
            seen.append(msg)
            return Message(RecordDict(), reply_to=msg)
        return app

    monkeypatch.setattr(secagg_app, "make_secagg_client_app", fake_secagg_app)
    route = secagg_router()
    regular, calls = _site({"w": torch.zeros(2), "n": torch.tensor(0.0)})
    stage = Message(RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})}),
                    dst_node_id=7, message_type=MessageType.TRAIN)
    legacy = Message(RecordDict({"evaluateins.parameters": ArrayRecord(), "evaluateins.config": ConfigRecord({})}),
                     dst_node_id=7, message_type=MessageType.EVALUATE)
    plain = _train({})
    assert [is_secagg_message(m) for m in (stage, legacy, plain)] == [True, True, False]
    for msg in (stage, legacy, plain):
        route(msg, CONTEXT, regular)
    assert seen == [stage, legacy] and calls == [plain]
