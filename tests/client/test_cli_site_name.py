"""client/cli.py: ``--site`` must agree with the site YAML (an error, never a rename), and the
YAML's privacy terms reach the SuperNode's node_config."""
from __future__ import annotations

from pathlib import Path

import pytest

from client.cli import build_parser, main, resolve_config
from client.site_process import supernode_args


def _yaml(tmp_path: Path, site: str, extra: str = "") -> Path:
    path = tmp_path / f"site-{site}.yaml"
    path.write_text(f"site: {site}\ninsecure: true\ndata: {{synthetic_centre: SynES1, synthetic_n: 8}}\n"
                    f"state_dir: state\n{extra}")
    return path


def test_site_flag_naming_another_site_than_the_yaml_is_exit_2(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = _yaml(tmp_path, "udiat")
    assert main(["--site", "nope", "--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "'udiat'" in err and "'nope'" in err and str(path) in err
    assert not (tmp_path / "state").exists()  # nothing started, nothing written


def test_matching_site_flag_runs_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--site", "udiat", "--config", str(_yaml(tmp_path, "udiat")), "--check"]) == 0
    assert "synthetic data" in capsys.readouterr().out


def test_command_line_only_config_takes_the_site_flag(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--site", "busi", "--data", str(tmp_path), "--insecure"])
    assert resolve_config(args).site == "busi"


def test_yaml_privacy_terms_are_on_the_supernode_command_line(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "udiat", "privacy: {max_epsilon: 2.0, min_noise_multiplier: 0.9}\n")
    cfg = resolve_config(build_parser().parse_args(["--site", "udiat", "--config", str(path)]))
    node_config = supernode_args(cfg)[supernode_args(cfg).index("--node-config") + 1]
    assert "privacy-required=true" in node_config and "privacy-max-epsilon=2.0" in node_config
    assert "privacy-min-noise-multiplier=0.9" in node_config and "privacy-delta" not in node_config
