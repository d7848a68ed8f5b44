"""Which node is which hospital: the site registry and the query round that fills it.

Every node is asked its site name and declared image counts before it is sampled; the registry
refuses a name outside the run spec, a second node claiming a connected site, and (with node
authentication) a name that is not its key's registered one. ``gather_sites`` waits, boundedly,
for a quorum of named sites.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.federation import FederationConfig, is_site_name
from server.identity import IdentityCheck

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class SiteRegistry:
    """node id ↔ site name, learned from query replies. With ``allowed`` names (the spec's
    sites) an unexpected name is refused; a name already held by a *connected* node is refused
    (a restarted SuperNode without authentication comes back under a new id: it replaces the
    old id once that one is gone). Nodes whose query failed are retried after ``clear_failed``.
    ``declared``: each site's num-train from its query reply (caps its num-examples), and
    ``declared_val`` its num-val (caps its calibration count when validation images are used);
    ``dropped``: sites no longer sampled (rejected too often), by name, so a reconnect stays out."""

    def __init__(self, allowed: Iterable[str] | None = None) -> None:
        self.allowed = set(allowed) if allowed else None
        self._by_node: dict[int, str] = {}
        self.refused: set[int] = set()
        self.failed: set[int] = set()
        self.declared: dict[str, int] = {}
        self.declared_val: dict[str, int] = {}
        self.dropped: set[str] = set()

    def __contains__(self, node_id: int) -> bool:
        return node_id in self._by_node or node_id in self.refused or node_id in self.failed

    def clear_failed(self) -> None:
        self.failed.clear()

    def register(self, node_id: int, site: str, connected: Iterable[int], declared: int | None = None,
                 declared_val: int | None = None) -> bool:
        if self.allowed is not None and site not in self.allowed:
            log.error("node %d reports site %r, which is not in the run spec: ignored", node_id, site)
            self.refused.add(node_id)
            return False
        live = set(connected)
        for other, name in list(self._by_node.items()):
            if name == site and other != node_id:
                if other in live:
                    log.error("site %s: a second node (%d) claims it: ignored", site, node_id)
                    self.refused.add(node_id)
                    return False
                del self._by_node[other]
                log.info("site %s reconnected as node %d", site, node_id)
        self._by_node[node_id] = site
        if declared is not None:
            self.declared[site] = int(declared)
        if declared_val is not None:
            self.declared_val[site] = int(declared_val)
        return True

    def drop(self, site: str) -> None:
        self.dropped.add(site)

    def name(self, node_id: int) -> str:
        return self._by_node.get(node_id, f"node-{node_id}")

    def connected(self, node_ids: Iterable[int]) -> dict[str, int]:
        """{site: node id} of the registered, not dropped nodes among ``node_ids``, sorted by site."""
        out = {self._by_node[n]: n for n in node_ids if n in self._by_node and self._by_node[n] not in self.dropped}
        return dict(sorted(out.items()))


#: Seconds before a node whose site query failed is queried again while a round waits for its quorum.
QUERY_RETRY_S = 5.0


def gather_sites(
    grid: Grid,
    registry: SiteRegistry,
    fed: FederationConfig,
    base_config: Mapping[str, Any],
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    poll_s: float = 1.0,
    identity: IdentityCheck | None = None,
) -> dict[str, int]:
    """Query new nodes for their site name and wait (at most ``quorum_timeout_s``) until
    ``min_sites`` named sites are connected; returns {site: node id} of those connected.
    With ``identity``, a node whose claimed name is not its key's registered name is refused."""
    deadline = clock() + fed.quorum_timeout_s
    next_note = retry_at = clock()
    while True:
        if clock() >= retry_at:  # a node that was unavailable a moment ago (reconnecting after a
            registry.clear_failed()  # SuperLink restart) is asked again, not shut out of the round
            retry_at = clock() + QUERY_RETRY_S
        connected = list(grid.get_node_ids())
        new = [n for n in connected if n not in registry]
        if new:
            _query(grid, registry, new, base_config, connected, fed.round_timeout_s, identity)
        sites = registry.connected(connected)
        now = clock()
        if len(sites) >= fed.min_sites or now >= deadline:
            return sites
        if now >= next_note:
            log.info("waiting for sites: %s connected, %d needed (giving up in %.0fs)",
                     list(sites), fed.min_sites, deadline - now)
            next_note = now + 10.0
        sleep(min(poll_s, max(deadline - now, 0.0)))


def _query(grid: Grid, registry: SiteRegistry, nodes: list[int], base_config: Mapping[str, Any],
           connected: list[int], timeout: float, identity: IdentityCheck | None = None) -> None:
    content = RecordDict({"config": ConfigRecord(dict(base_config))})
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    answered: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            log.error("node %d could not join: %s", node, reply.error.reason)
            registry.failed.add(node)
            continue
        info = reply.content.config_records.get("info")
        site = str(info.get("site", "")) if info is not None else ""
        if not is_site_name(site):
            log.error("node %d sent no valid site name: ignored", node)
            registry.refused.add(node)
            continue
        if identity is not None and identity.check(node, site) is not None:
            registry.refused.add(node)  # never queried again: its key cannot become another site
            continue
        declared = info.get("num-train")
        if isinstance(declared, bool) or not isinstance(declared, int) or declared < 0:
            log.error("node %d (site %s) declared no valid num-train: ignored", node, site)
            registry.refused.add(node)  # its train replies' num-examples could not be capped
            continue
        val = info.get("num-val")
        val = val if isinstance(val, int) and not isinstance(val, bool) and val >= 0 else None
        if registry.register(node, site, connected, declared=declared, declared_val=val):
            log.info("site %s joined (node %d): %s training / %s validation images, app %s", site, node,
                     info.get("num-train"), info.get("num-val"), info.get("app-version"))
    for node in set(nodes) - answered:
        log.warning("node %d did not answer the site query within %.0fs", node, timeout)
        registry.failed.add(node)
