"""The coordinator's view of its SuperLink through the Control API.

Registration, revocation and run submission go through the ``flwr`` CLI (the supported
interface; it validates keys and builds the FAB). Polling (run status, which sites are online)
uses flwr's Control HTTP client in-process, because the CLI's JSON drops the node names and a
CLI call per poll costs a Python start-up. Nothing here starts or stops processes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from launch.audit import AuditLog
from launch.flwr_env import flwr_env, kv_config
from launch.process import bin_path
from server.superlink import CONNECTION

logger = logging.getLogger(__name__)


class ControlError(RuntimeError):
    """A Control API call or flwr CLI command failed; the message has its output."""


@dataclass(frozen=True)
class NodeRow:
    node_id: int
    name: str
    status: str  # "registered" | "online" | "offline" | "unregistered"
    key_sha256: str  # fingerprint of the registered public key (DER bytes)
    last_activated_at: str
    last_deactivated_at: str


@dataclass(frozen=True)
class RunRow:
    run_id: int
    status: str  # pending | starting | running | finished
    sub_status: str  # "" | completed | failed | stopped
    details: str
    fab_id: str
    fab_version: str
    fab_hash: str

    @property
    def finished(self) -> bool:
        return self.status == "finished"


class Control:
    """In-process Control API client for the SuperLink at ``address`` (host:port)."""

    def __init__(self, address: str, ca_cert: str | Path | None) -> None:
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

        self._client = ControlHttpClient.from_server_address(
            server_address=address, insecure=ca_cert is None,
            root_certificates=None if ca_cert is None else str(ca_cert),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    def close(self) -> None:
        self._client.close()

    def nodes(self) -> list[NodeRow]:
        from flwr.proto.control_pb2 import ListNodesRequest

        res = self._client.ListNodes(ListNodesRequest())
        return [NodeRow(int(n.node_id), n.name, n.status,
                        key_fingerprint(bytes(n.public_key)),
                        n.last_activated_at, n.last_deactivated_at) for n in res.nodes_info]

    def run(self, run_id: int) -> RunRow | None:
        from flwr.proto.control_pb2 import ListRunsRequest

        res = self._client.ListRuns(ListRunsRequest(run_id=run_id))
        for proto in res.run_dict.values():
            if int(proto.run_id) == run_id:
                return RunRow(int(proto.run_id), proto.status.status, proto.status.sub_status,
                              proto.status.details, proto.fab_id, proto.fab_version, proto.fab_hash)
        return None

    def runs(self) -> list[RunRow]:
        from flwr.proto.control_pb2 import ListRunsRequest

        res = self._client.ListRuns(ListRunsRequest())
        return [RunRow(int(p.run_id), p.status.status, p.status.sub_status, p.status.details,
                       p.fab_id, p.fab_version, p.fab_hash) for p in res.run_dict.values()]

    def register(self, name: str, pub_path: str | Path) -> int:
        """Register an OpenSSH EC public key under ``name`` (what `flwr supernode register`
        does, in-process: same NIST-curve check, same key encoding); returns the node id."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.proto.control_pb2 import RegisterNodeRequest
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

        try:
            key = serialization.load_ssh_public_key(Path(pub_path).read_bytes())
        except (OSError, ValueError) as exc:
            raise ControlError(f"{pub_path}: not an OpenSSH public key ({exc})") from exc
        if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
            raise ControlError(f"{pub_path}: SuperNode keys must be EC keys on a NIST curve "
                               "(ssh-keygen -t ecdsa -b 384, or deploy/pki.py site)")
        res = self._client.RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(key),
                                                            name=name))
        if not res.node_id:
            raise ControlError(f"the SuperLink did not register {name}")
        return int(res.node_id)

    def unregister(self, node_id: int, audit: AuditLog | None = None, site: str = "",
                   reason: str = "operator request") -> None:
        """Revoke a node; with ``audit``, logged as ``site_revoked`` (site, node id, reason)."""
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        self._client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
        if audit is not None:
            audit.append("site_revoked", site=site, node_id=node_id, reason=reason)

    def stop_run(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        self._client.StopRun(StopRunRequest(run_id=run_id))


def flwr_cli(args: list[str], flwr_home: str | Path, timeout: float = 120.0,
             cwd: str | Path | None = None) -> str:
    """Run ``flwr ARGS`` with our Flower home and environment; stdout, or ControlError."""
    cmd = [bin_path("flwr"), *args]
    try:
        res = subprocess.run(cmd, env=flwr_env(flwr_home), capture_output=True, text=True,  # noqa: S603
                             timeout=timeout, check=False, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise ControlError(f"`flwr {' '.join(args)}` timed out after {timeout:.0f}s") from exc
    if res.returncode != 0:
        raise ControlError(f"`flwr {' '.join(args)}` failed ({res.returncode}):\n"
                           f"{res.stdout}{res.stderr}")
    return res.stdout


def _json_tail(text: str) -> dict[str, Any]:
    """The JSON object a `--format json` command printed (possibly after other lines)."""
    start = text.find("{")
    if start < 0:
        raise ControlError(f"no JSON in flwr output:\n{text}")
    return dict(json.loads(text[start:]))


def key_fingerprint(key_bytes: bytes) -> str:
    """``launch.pki.key_fingerprint``, imported when first needed (cryptography stays out of the
    coordinator's start-up)."""
    from launch.pki import key_fingerprint as fingerprint

    return fingerprint(key_bytes)


def register_site(name: str, pub_path: str | Path, flwr_home: str | Path,
                  connection: str = CONNECTION) -> int:
    """`flwr supernode register KEY.pub CONNECTION --name NAME`; returns the node id."""
    out = flwr_cli(["supernode", "register", str(Path(pub_path).resolve()), connection,
                    "--name", name, "--format", "json"], flwr_home)
    data = _json_tail(out)
    if not data.get("success"):
        raise ControlError(f"registering {name} failed: {out}")
    return int(data["node-id"])


def unregister_node(node_id: int, flwr_home: str | Path, connection: str = CONNECTION,
                    audit: AuditLog | None = None, site: str = "", reason: str = "operator request") -> None:
    """`flwr supernode unregister`; with ``audit``, logged as ``site_revoked`` (site, node id, reason)."""
    flwr_cli(["supernode", "unregister", str(node_id), connection], flwr_home)
    if audit is not None:
        audit.append("site_revoked", site=site, node_id=node_id, reason=reason)


def submit_run(app_dir: str | Path, run_config: Mapping[str, object], flwr_home: str | Path,
               connection: str = CONNECTION) -> int:
    """`flwr run APP CONNECTION --run-config ... --format json`; returns the run id."""
    args = ["run", str(Path(app_dir).resolve()), connection, "--format", "json"]
    if run_config:
        args += ["--run-config", kv_config(run_config)]
    data = _json_tail(flwr_cli(args, flwr_home, timeout=300.0))
    if not data.get("success") or data.get("run-id") is None:
        raise ControlError(f"flwr run did not start a run: {data}")
    return int(data["run-id"])


def fab_preflight(app_dir: str | Path) -> tuple[int, str]:
    """Build the FAB the way ``flwr run`` will (same files, fixed zip dates) and return
    (size in bytes, sha256); raises ControlError if it breaks the 10 MB / depth-10 limits."""
    from flwr.cli.build import build_fab_from_disk

    try:
        fab = build_fab_from_disk(Path(app_dir))
    except Exception as exc:  # noqa: BLE001 - AppPathDepthError, size ValueError, bad pyproject
        raise ControlError(f"{app_dir}: cannot build the Flower app bundle: {exc}") from exc
    return len(fab), hashlib.sha256(fab).hexdigest()
