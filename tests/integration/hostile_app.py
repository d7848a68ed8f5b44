"""A hostile site's ClientApp for tests/integration/test_poisoning.py: the installed ClientApp
(client/app.py) answers every message, then each train reply is poisoned, the poison chosen by
the round (``MODES``): NaN weights, weights of 1e30, the global weights plus noise x10 claiming
1e9 examples. The metrics stay the honest ones (bar the count), so only the weights give it away.

Loaded by the site's warm worker (``client.supernode worker --app``) that
tests/integration/hostile_site.py starts; nothing in the product refers to it."""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp

from client.app import app as honest

#: The poison sent in each round (later rounds: the last one).
MODES: dict[int, str] = {1: "nan", 2: "huge", 3: "noise"}
CLAIMED_EXAMPLES = 10**9


def poison(sent: Message, reply: Message, mode: str) -> Message:
    """``reply`` with its float arrays poisoned in place of the trained weights."""
    glob = {k: a.numpy() for k, a in sent.content["arrays"].items()}
    rng = np.random.default_rng(0)
    arrays = {}
    for key, array in reply.content["arrays"].items():
        value = array.numpy().copy()
        if value.dtype.kind == "f":
            if mode == "nan":
                value.reshape(-1)[::7] = np.nan
            elif mode == "huge":
                value[...] = 1e30
            elif mode == "noise":
                base = glob.get(key, value)
                value = (base + 10 * rng.normal(size=value.shape)).astype(value.dtype)
            else:
                raise ValueError(f"unknown poison {mode!r}")
        arrays[key] = Array(np.asarray(value, order="C"))
    reply.content["arrays"] = ArrayRecord(arrays)
    if mode == "noise":
        reply.content["metrics"]["num-examples"] = CLAIMED_EXAMPLES
    return reply


class HostileApp(ClientApp):
    """The honest ClientApp with every successful train reply poisoned."""

    def __call__(self, message: Message, context: Context) -> Message:
        reply = honest(message=message, context=context)
        if message.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        server_round = int(message.content["config"]["server-round"])
        return poison(message, reply, MODES.get(server_round, MODES[max(MODES)]))


app = HostileApp()
