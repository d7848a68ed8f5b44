from __future__ import annotations

from pathlib import Path

import pytest

from common.demo import demo_spec


def test_demo_spec_is_the_same_for_server_and_sites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDBUS_RUNS", str(tmp_path))
    a, b = demo_spec(5, "r"), demo_spec(5, "r")
    assert a == b
    assert [s.name for s in a.sites] == ["site-1", "site-2", "site-3", "site-4", "site-5"]
    assert a.sites[0].synthetic_centre == a.sites[4].synthetic_centre  # centres reused in turn
    assert a.federation.min_sites == 5 and a.federation.rounds == 1  # smoke: every node joins
    assert Path(a.run_dir) == tmp_path / "r"


def test_demo_spec_needs_a_node() -> None:
    with pytest.raises(ValueError, match="at least one SuperNode"):
        demo_spec(0)
