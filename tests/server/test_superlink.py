"""server/superlink.py: the SuperLink command line and the Flower configuration file."""
from __future__ import annotations

import tomllib
from pathlib import Path

from server.superlink import SuperLinkLaunch, write_flwr_config


def test_flower_config(tmp_path: Path) -> None:
    path = write_flwr_config(tmp_path / "home", "127.0.0.1:9093", tmp_path / "ca.crt")
    conf = tomllib.loads(path.read_text())
    assert conf["superlink"]["default"] == "fedbus"
    assert conf["superlink"]["fedbus"] == {"address": "127.0.0.1:9093",
                                           "root-certificates": str((tmp_path / "ca.crt").resolve())}
    insecure = tomllib.loads(write_flwr_config(tmp_path / "h2", "127.0.0.1:1", None).read_text())
    assert insecure["superlink"]["fedbus"]["insecure"] is True


def test_superlink_command_is_secure_by_default(tmp_path: Path) -> None:
    tls = SuperLinkLaunch("0.0.0.0", 9093, tmp_path / "s.db", tmp_path / "ca", tmp_path / "crt",
                          tmp_path / "key", exec_secret_file=tmp_path / "sec").command()
    assert "--enable-supernode-auth" in tls and "--insecure" not in tls
    assert "--disable-runtime-dependency-installation" in tls
    assert tls[tls.index("--isolation") + 1] == "process" and "--superexec-auth-secret-file" in tls
    plain = SuperLinkLaunch("127.0.0.1", 1, None, None, None, None, isolation="subprocess").command()
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain and "--database" not in plain
    assert SuperLinkLaunch("0.0.0.0", 9, None, None, None, None).local_address == "127.0.0.1:9"
