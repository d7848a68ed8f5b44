"""``fedbus-pki``: certificates and SuperNode keys for a fedbus federation, a site's starter
kit, and site (de)registration.

Needs only the Python ``cryptography`` package (installed with flwr) and, for register/revoke,
the ``flwr`` CLI. Private keys are written with mode 0600 and never overwritten.

  fedbus-pki ca      --out pki/                      # coordinator: CA (keep ca.key offline)
  fedbus-pki server  --ca pki/ --out pki/ --host fl.example.org --ip 10.0.0.5
  fedbus-pki kit     udiat --out /etc/fedbus --superlink fl.example.org:9092 --ca ca.crt
                                                     # at the hospital: site.yaml, ca.crt, key pair
  fedbus-pki site    udiat --out keys/               # at the hospital: keys/udiat(.pub) only
  fedbus-pki register udiat keys/udiat.pub --flwr-home STATE/flwr-home
  fedbus-pki revoke   udiat --flwr-home STATE/flwr-home
  fedbus-pki list     --flwr-home STATE/flwr-home

The server certificate always carries DNS:localhost and IP:127.0.0.1 besides the given names,
because the SuperLink's own ServerApp process reaches the Runtime API over loopback with TLS.
SuperNode keys are EC P-384 in OpenSSH format: `flwr supernode register` refuses Ed25519.
(``python deploy/pki.py ...`` runs the same commands from a checkout.)
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import ConfigError
from common.federation import check_site_name

__all__ = ["CONNECTION", "key_fingerprint", "list_sites", "main", "make_ca", "make_server_cert", "make_site_key",
           "make_site_kit", "register", "revoke"]

CONNECTION = "fedbus"  # connection name flower-server writes into its FLWR_HOME/config.toml


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600; refuses to overwrite an existing key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"{path}: exists; remove it first to replace it")
    path.write_bytes(data)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbus federation")])


def make_ca(out: Path, cn: str = "fedbus federation CA", days: int = 3650) -> tuple[Path, Path]:
    """Self-signed CA (EC P-384). Returns (ca.crt, ca.key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return _write_pair(out / "ca.crt", out / "ca.key", cert, key)


def _write_pair(crt_path: Path, key_path: Path, cert: x509.Certificate,
                key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    """Certificate (public) and its unencrypted PKCS#8 key (owner-only); returns both paths."""
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_public(crt_path, cert.public_bytes(serialization.Encoding.PEM))
    return crt_path, key_path


def make_server_cert(ca_dir: Path, out: Path, hosts: list[str], ips: list[str],
                     days: int = 825) -> tuple[Path, Path]:
    """Server certificate signed by the CA in ``ca_dir``. Returns (server.pem, server.key)."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    dns = list(dict.fromkeys(["localhost", *hosts]))
    addrs = list(dict.fromkeys(["127.0.0.1", *ips]))
    san = [x509.DNSName(h) for h in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in addrs]
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "fedbus superlink"))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                       critical=False)
        .sign(ca_key, hashes.SHA384())  # type: ignore[arg-type]
    )
    return _write_pair(out / "server.pem", out / "server.key", cert, key)


def make_site_key(site: str, out: Path) -> tuple[Path, Path]:
    """EC P-384 OpenSSH key pair for one SuperNode. Returns (private key, public key .pub)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH) + f" {site}\n".encode()
    key_path, pub_path = out / site, out / f"{site}.pub"
    _write_private(key_path, priv)
    _write_public(pub_path, pub)
    return key_path, pub_path


def key_fingerprint(key_bytes: bytes) -> str:
    """sha256 hex of a public key's DER SubjectPublicKeyInfo, from OpenSSH or PEM text: the value
    the coordinator's audit log and node list show (server/control.py computes it the same way)."""
    if key_bytes.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(key_bytes)
    else:
        key = serialization.load_ssh_public_key(key_bytes)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


#: The site YAML a kit starts from: deploy/site.example.yaml's keys (client/site_config.py);
#: strings are JSON-quoted (valid YAML for any host, path or IPv6 address).
_SITE_YAML = """\
# {site}'s site configuration (client/site_config.py), written by fedbus-pki kit:
#   flower-client --site {site} --config {config}
# Relative paths are resolved against this file's folder.
site: {site_q}
superlink: {superlink}               # coordinator Fleet API (host:port)
ca_cert: ca.crt                      # the federation CA certificate (public)
private_key: {site_q}                  # this site's SuperNode key: SECRET, mode 0600, never sent
data:
  path: {data}                   # images + masks (or a manifest CSV); never leaves the site
  format: {format}                     # auto | BrEaST | BUSI | BUS-UCLM | UDIAT | manifest
cache_dir: cache                     # preprocessed tensors (site-local)
state_dir: state                     # logs, site audit log, FedBN norm layers
runtime_port: {runtime_port}                   # local Runtime API (127.0.0.1); unique per host
device: auto                         # auto | cpu | cuda | cuda:N
num_threads: null
allowed_fab_hashes: []               # optional allow-list of coordinator app bundles (sha256)
after_run: wait                      # when a run ends: wait quietly for the next one, or exit (status 0)
tuning:
  fast: true                         # warm ClientApp worker + short polls; false: stock Flower
  idle_pull_s: 0.5
  worker_poll_s: 0.25
  heartbeat_s: null                  # null: Flower's 30 s (a dead site is noticed after 2x)
  reconnect_timeout_s: 3600          # then exit (systemd restarts the service)
  coordinator_gone_s: 60             # after a run ended: coordinator unreachable this long, stop retrying
  coordinator_probe_s: 15            # ... and check for it this often
# privacy:                           # optional: this hospital's own DP terms (docs/privacy.md)
#   required: true
#   max_epsilon: 4.0
#   min_noise_multiplier: 0.8
#   delta: 1.0e-5
"""


def make_site_kit(site: str, out: Path, superlink: str, ca: Path, data: str | None = None,
                  data_format: str = "auto", runtime_port: int = 9094) -> dict[str, Path]:
    """A site's starter folder in one step: ``site.yaml`` (relative paths into ``out``),
    ``ca.crt`` (a copy of the federation certificate, never its key) and the SuperNode key pair.
    Nothing is written when any of them exists already. Returns the four paths by role."""
    check_site_name(site, "fedbus-pki kit")
    host, sep, port = superlink.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--superlink must be HOST:PORT, got {superlink!r}")
    if not 0 < runtime_port < 65536:
        raise ValueError(f"--runtime-port {runtime_port} out of range")
    ca_file = ca / "ca.crt" if ca.is_dir() else ca
    ca_bytes = ca_file.read_bytes()
    cert = x509.load_pem_x509_certificate(ca_bytes)  # refuse anything but a certificate (a key, say)
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise ValueError(f"{ca_file}: not a CA certificate")
    except x509.ExtensionNotFound:
        raise ValueError(f"{ca_file}: not a CA certificate (no basicConstraints)") from None
    paths = {"config": out / "site.yaml", "ca_cert": out / "ca.crt",
             "private_key": out / site, "public_key": out / f"{site}.pub"}
    present = [str(p) for p in paths.values() if p.exists()]
    if present:
        raise FileExistsError(f"already there, remove to replace: {', '.join(present)}")
    make_site_key(site, out)
    _write_public(paths["ca_cert"], ca_bytes)
    text = _SITE_YAML.format(site=site, site_q=json.dumps(site), superlink=json.dumps(superlink), config=paths["config"].resolve(),
                             data=json.dumps(data or f"/data/{site}"), format=json.dumps(data_format),
                             runtime_port=int(runtime_port))
    _write_public(paths["config"], text.encode("utf-8"))
    return paths


def _flwr(args: list[str], flwr_home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1")
    flwr = Path(sys.executable).with_name("flwr")
    cmd = [str(flwr) if flwr.exists() else "flwr", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


def list_sites(flwr_home: Path, connection: str = CONNECTION) -> list[dict]:
    """Registered SuperNodes with their names. `flwr supernode list --format json` (1.41) drops
    the names, so this asks the Control API directly, at the address in FLWR_HOME/config.toml."""
    import tomllib

    from flwr.proto.control_pb2 import ListNodesRequest
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    conf = tomllib.loads((flwr_home / "config.toml").read_text())["superlink"][connection]
    insecure = bool(conf.get("insecure", False))
    client = ControlHttpClient.from_server_address(
        server_address=conf["address"], insecure=insecure,
        root_certificates=None if insecure else conf.get("root-certificates"),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
    try:
        nodes = client.ListNodes(ListNodesRequest()).nodes_info
    finally:
        client.close()
    return [{"node-id": int(n.node_id), "name": n.name, "status": n.status,
             "key-sha256": hashlib.sha256(bytes(n.public_key)).hexdigest()[:16]} for n in nodes]


def register(site: str, pub: Path, flwr_home: Path, connection: str = CONNECTION) -> str:
    res = _flwr(["supernode", "register", str(pub), connection, "--name", site,
                 "--format", "json"], flwr_home)
    if res.returncode != 0:
        raise RuntimeError(f"registering {site} failed: {res.stdout}{res.stderr}")
    return res.stdout


def revoke(site: str, flwr_home: Path, connection: str = CONNECTION,
           audit_log: Path | None = None, reason: str = "operator request") -> list[int]:
    """Unregister every node registered under ``site``; returns their node ids. Each revocation
    is an entry ``site_revoked`` (site, node id, ``reason``) in the coordinator's audit log
    (default: the one beside ``flwr_home``, STATE_DIR/audit.jsonl)."""
    ids = [n["node-id"] for n in list_sites(flwr_home, connection)
           if n["name"] == site and n["status"] != "unregistered"]
    if not ids:
        raise LookupError(f"no SuperNode registered under the name {site!r}")
    audit = _audit(audit_log or Path(flwr_home).resolve().parent / "audit.jsonl")
    for node_id in ids:
        res = _flwr(["supernode", "unregister", str(node_id), connection], flwr_home)
        if res.returncode != 0:
            raise RuntimeError(f"unregistering {site} ({node_id}) failed: {res.stdout}{res.stderr}")
        audit.append("site_revoked", site=site, node_id=node_id, reason=reason, by="fedbus-pki")
    return ids


def _audit(path: Path) -> Any:
    """The coordinator's AuditLog (launch.audit), written as the operator running this command."""
    from launch.audit import AuditLog, process_identity

    return AuditLog(path, actor=f"operator:{process_identity()['user']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedbus-pki", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ca", help="create the federation CA")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--days", type=int, default=3650)
    s = sub.add_parser("server", help="create the SuperLink TLS certificate")
    s.add_argument("--ca", type=Path, required=True, help="folder with ca.crt and ca.key")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--host", action="append", default=[], help="DNS name (repeatable)")
    s.add_argument("--ip", action="append", default=[], help="IP address (repeatable)")
    s.add_argument("--days", type=int, default=825)
    k = sub.add_parser("site", help="create a site's SuperNode key pair (run at the hospital)")
    k.add_argument("site")
    k.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("kit", help="write a site's starter folder: site.yaml, ca.crt, key pair (at the hospital)")
    t.add_argument("site")
    t.add_argument("--out", type=Path, required=True, help="the site's folder (created)")
    t.add_argument("--superlink", required=True, help="coordinator Fleet API, HOST:PORT")
    t.add_argument("--ca", type=Path, required=True, help="the federation's ca.crt, or a folder holding it")
    t.add_argument("--data", default=None, help="the site's images + masks (default: /data/SITE, edit later)")
    t.add_argument("--format", default="auto", help="data format (auto | BrEaST | BUSI | ... | manifest)")
    t.add_argument("--runtime-port", type=int, default=9094, help="local Runtime API port, unique per host")
    for name in ("register", "revoke", "list"):
        r = sub.add_parser(name, help=f"{name} site(s) on a running SuperLink")
        if name != "list":
            r.add_argument("site")
        if name == "register":
            r.add_argument("public_key", type=Path)
        r.add_argument("--flwr-home", type=Path, required=True,
                       help="flower-server's Flower home (STATE_DIR/flwr-home)")
        r.add_argument("--connection", default=CONNECTION)
        if name == "revoke":
            r.add_argument("--audit-log", type=Path, default=None,
                           help="coordinator audit log (default: audit.jsonl beside --flwr-home)")
            r.add_argument("--reason", default="operator request",
                           help="why, for the audit log (e.g. \"key lost\", \"left the consortium\")")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except (OSError, LookupError, RuntimeError, ValueError, ConfigError) as exc:
        print(f"fedbus-pki {args.cmd}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "ca":
        print(*make_ca(args.out, days=args.days), sep="\n")
    elif args.cmd == "server":
        print(*make_server_cert(args.ca, args.out, args.host, args.ip, days=args.days), sep="\n")
    elif args.cmd == "site":
        key, pub = make_site_key(args.site, args.out)
        print(f"private key (keep at the site): {key}\npublic key (send to coordinator): {pub}")
    elif args.cmd == "kit":
        kit = make_site_kit(args.site, args.out, args.superlink, args.ca, data=args.data,
                            data_format=args.format, runtime_port=args.runtime_port)
        fp = key_fingerprint(kit["public_key"].read_bytes())
        print(f"site folder: {args.out}\n  config:       {kit['config']}  (check data.path)\n"
              f"  CA:           {kit['ca_cert']}\n  private key:  {kit['private_key']}  (secret, never sent)\n"
              f"  public key:   {kit['public_key']}  (send to the coordinator)\n"
              f"key fingerprint (sha256): {fp}\n"
              f"read out by phone to the coordinator: {' '.join(fp[i:i + 4] for i in range(0, 16, 4))}")
    elif args.cmd == "register":
        print(register(args.site, args.public_key, args.flwr_home, args.connection))
    elif args.cmd == "revoke":
        print("unregistered node ids:", revoke(args.site, args.flwr_home, args.connection,
                                                     args.audit_log, args.reason))
    else:
        print(json.dumps(list_sites(args.flwr_home, args.connection), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
