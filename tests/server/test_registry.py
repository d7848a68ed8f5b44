"""server/registry.py: site names per node, and the bounded query round that fills them."""
from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from common.federation import FederationConfig
from server.registry import SiteRegistry, gather_sites
from tests.server.local_grid import LocalGrid


def test_registry_refuses_unknown_and_duplicate_sites_and_follows_reconnects() -> None:
    reg = SiteRegistry(["A", "B"])
    assert reg.register(1, "A", [1, 2])
    assert not reg.register(2, "Z", [1, 2])  # not in the spec
    assert not reg.register(3, "A", [1, 3])  # A is still connected as node 1
    assert reg.register(4, "A", [4])  # node 1 gone: A came back as node 4
    assert reg.connected([1, 2, 3, 4]) == {"A": 4}
    assert reg.name(99) == "node-99"


def test_a_node_that_declares_no_training_set_size_is_not_admitted() -> None:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        info = {"site": "AB"[context.node_id - 1]}
        if context.node_id == 1:
            info["num-train"] = 12
        return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)

    grid = LocalGrid(app, {1: {}, 2: {}})
    reg = SiteRegistry(["A", "B"])
    fed = FederationConfig(min_sites=1, quorum_timeout_s=1.0)
    assert gather_sites(grid, reg, fed, {}, sleep=lambda s: None) == {"A": 1}
    assert reg.declared == {"A": 12} and 2 in reg.refused
