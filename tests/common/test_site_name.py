"""common/federation.py: the one site-name rule (SiteSpec, site configs, the coordinator's site
list and the ServerApp's site query all apply it)."""
from __future__ import annotations

import pytest

from common.config import ConfigError
from common.federation import SiteSpec, check_site_name, is_site_name


@pytest.mark.parametrize("name", ["udiat", "BUS-UCLM", "site_2.b", "a", "x" * 64, "0abc"])
def test_valid_names(name: str) -> None:
    assert is_site_name(name) and check_site_name(name, "here") == name


@pytest.mark.parametrize("name", ["", "x" * 65, "-lead", ".hidden", "a b", "a/b", "ü", "all-sites",
                                  "ALL-SITES", "abc\n", None, 7])
def test_invalid_names(name: object) -> None:
    assert not is_site_name(name)
    with pytest.raises(ConfigError, match=r"^sites\.yaml: site name"):
        check_site_name(name, "sites.yaml")


def test_site_spec_applies_the_rule() -> None:
    with pytest.raises(ConfigError, match="site name 'a b'"):
        SiteSpec("a b", synthetic_centre="SynEG")
    assert SiteSpec("a-b", synthetic_centre="SynEG").name == "a-b"
