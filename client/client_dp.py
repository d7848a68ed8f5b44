"""Client-side clipping for client-level DP, switched on by the round, not by the site.

With ``federation.client_dp.mode: client-fixed`` the server's DP wrapper (server/dp.py) puts
``clipping_norm`` into every train message's config; ``client_dp_mod`` (a mod of the regular
ClientApp, client/app.py) then clips the site's update (reply − sent weights) to that norm before
it leaves. Every other message passes untouched, so a site needs no setting of its own.

It does what Flower's ``fixedclipping_mod`` does, with common/clipping.py instead of Flower's
clipping, which leaves 0-d arrays (the prior's update counter) unclipped. The reply must carry
the sent array names: weights per tensor (``federation.packed_weights: false``) and no FedBN,
which common/config.py requires of client-level DP runs; any other reply is refused here.
"""
from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from common.clipping import clip_update

log = logging.getLogger(__name__)

#: Config key the DP wrapper sends (flwr.supercore.differential_privacy.KEY_CLIPPING_NORM).
KEY_CLIPPING_NORM = "clipping_norm"


class ClippingRefused(ValueError):
    """The reply's weights cannot be clipped against the sent ones (names or shapes differ)."""


def asks_for_clipping(msg: Message) -> bool:
    """A train message whose config carries the client-level DP clipping norm."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return False
    config = msg.content.config_records.get("config")
    return config is not None and KEY_CLIPPING_NORM in config


def client_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the update of a train round that asks for it; other messages pass through."""
    if not asks_for_clipping(msg):
        return call_next(msg, context)
    norm = float(msg.content["config"][KEY_CLIPPING_NORM])  # type: ignore[arg-type]
    if not norm > 0:
        raise ClippingRefused(f"client-level DP: clipping norm {norm!r} is not > 0")
    sent = {k: np.array(a.numpy(), copy=True) for k, a in msg.content["arrays"].items()}  # before training
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    arrays = reply.content.array_records.get("arrays")
    clipped = clip_update({k: a.numpy() for k, a in arrays.items()}, sent, norm) if arrays is not None else None
    if clipped is None:
        raise ClippingRefused("client-level DP: the reply's weights do not match the sent ones, so the update "
                              "cannot be clipped (packed weights or FedBN?)")
    weights, before = clipped
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in weights.items()})
    log.info("client-level DP: update clipped to norm %g (its norm was %.4g)", norm, before)
    return reply
