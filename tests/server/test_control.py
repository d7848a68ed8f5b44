"""server/control.py (offline parts) and server/cli.py configuration."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from common.config import ConfigError
from common.federation import FederationConfig, RunSpec
from server.coordinator_config import default_run_timeout, load_coordinator_config
from server.control import ControlError, _json_tail, fab_preflight, key_fingerprint

REPO = Path(__file__).resolve().parents[2]


def _pki():
    spec = importlib.util.spec_from_file_location("fedbus_pki", REPO / "deploy" / "pki.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_site_key_fingerprint_matches_the_superlinks_pem(tmp_path: Path) -> None:
    key, pub = _pki().make_site_key("udiat", tmp_path)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")  # NIST curve: flwr refuses Ed25519
    public = serialization.load_ssh_public_key(pub.read_bytes())
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key_fingerprint(pub.read_bytes()) == key_fingerprint(pem)
    _other, pub2 = _pki().make_site_key("busi", tmp_path)
    assert key_fingerprint(pub2.read_bytes()) != key_fingerprint(pem)
    with pytest.raises(FileExistsError):
        _pki().make_site_key("udiat", tmp_path)  # keys are never overwritten


def test_server_certificate_names_loopback(tmp_path: Path) -> None:
    from cryptography import x509

    pki = _pki()
    pki.make_ca(tmp_path)
    crt, _key = pki.make_server_cert(tmp_path, tmp_path, ["fl.example.org"], ["10.0.0.5"])
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)


def test_json_tail_skips_chatter() -> None:
    assert _json_tail('Loading...\n{"success": true, "run-id": "12"}\n') == {"success": True, "run-id": "12"}
    with pytest.raises(ControlError):
        _json_tail("no json here")


def _app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "pkg" / "__init__.py").write_text("")
    (app / "pyproject.toml").write_text(
        '[project]\nname = "toy"\nversion = "0.1.0"\n[tool.flwr.app]\npublisher = "me"\n'
        '[tool.flwr.app.components]\nserverapp = "pkg.s:app"\nclientapp = "pkg.c:app"\n'
        '[tool.flwr.app.config]\nx = 1\n')
    return app


def test_fab_preflight_checks_size_and_depth(tmp_path: Path) -> None:
    app = _app(tmp_path)
    size, sha = fab_preflight(app)
    assert 0 < size < 10 * 1024 * 1024 and len(sha) == 64
    assert fab_preflight(app) == (size, sha)  # deterministic: the hash flwr run will submit
    deep = app.joinpath(*[f"d{i}" for i in range(11)])
    deep.mkdir(parents=True)
    (deep / "m.py").write_text("x = 1\n")
    with pytest.raises(ControlError, match="cannot build"):
        fab_preflight(app)


def test_fab_preflight_refuses_oversized_bundles(tmp_path: Path) -> None:
    app = _app(tmp_path)
    (app / "pkg" / "big.json").write_bytes(os.urandom(11 * 1024 * 1024))
    with pytest.raises(ControlError, match="cannot build"):
        fab_preflight(app)


def test_repository_fab_is_within_limits() -> None:
    size, _sha = fab_preflight(REPO)
    assert size < 10 * 1024 * 1024


def test_coordinator_config_paths_and_tls(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "coordinator.yaml"
    conf.parent.mkdir()
    conf.write_text("state_dir: state\ntls: {ca_cert: pki/ca.crt, server_cert: pki/s.pem, "
                    "server_key: pki/s.key}\nsites: {udiat: keys/udiat.pub}\n")
    cfg = load_coordinator_config(conf, {"port": 9100})
    base = conf.parent.resolve()
    assert cfg.port == 9100 and cfg.state == base / "state"
    assert cfg.database == str(base / "state" / "state.db")
    assert cfg.audit_log == str(base / "state" / "audit.jsonl")
    assert cfg.tls.ca_cert == str(base / "pki" / "ca.crt") and cfg.sites == {"udiat": str(base / "keys" / "udiat.pub")}
    conf.write_text("state_dir: state\n")
    with pytest.raises(ConfigError, match="TLS needs"):
        load_coordinator_config(conf, {})
    assert load_coordinator_config(conf, {"insecure": True}).ca is None
    conf.write_text("insecure: true\nprot: 1\n")
    with pytest.raises(ConfigError, match=r"coordinator\.yaml.*prot"):
        load_coordinator_config(conf, {})


def test_run_deadline_covers_every_bounded_wait() -> None:
    fed = FederationConfig(rounds=2, quorum_timeout_s=10.0, round_timeout_s=20.0)
    assert default_run_timeout(RunSpec(federation=fed)) >= 2 * (10.0 + 2 * 20.0)
