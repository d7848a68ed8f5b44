"""Site-owned privacy: the site YAML's ``privacy:`` terms (common/site_privacy.py), carried in
node_config to the ClientApp, which trains under the coordinator's request within them and
refuses (clearly, audited, no paths) what they forbid."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import MessageType

from client.app import make_client_app
from client.site_config import load_site_config
from common.accounting import epsilon_of, poisson_rate
from common.config import ConfigError, PrivacyConfig
from common.site_privacy import SitePrivacy, SitePrivacyRefused, effective_privacy
from launch.audit import AuditLog, read, verify
from tests.client.test_app import _context, _dp_node, _dp_spec, _expected_epsilon, _init, _msg
from tests.server.local_grid import LocalGrid


# ------------------------------------------------------------------ the rule, by hand
_DP = PrivacyConfig(enabled=True, target_epsilon=50.0, target_delta=1e-3, noise_multiplier=None)


def test_no_terms_leave_the_request_alone() -> None:
    assert effective_privacy(None, _DP, "a") is _DP
    off = PrivacyConfig(enabled=False)
    assert effective_privacy(None, off, "a") is off


def test_required_dp_refuses_a_request_without_it() -> None:
    with pytest.raises(SitePrivacyRefused) as info:
        effective_privacy(SitePrivacy(required=True), PrivacyConfig(enabled=False), "a")
    assert info.value.reason == "the site requires DP-SGD; the coordinator sent privacy.enabled: false"
    off = PrivacyConfig(enabled=False)
    assert effective_privacy(SitePrivacy(required=False, max_epsilon=2.0), off, "a") is off


def test_the_plan_is_the_smaller_epsilon_and_delta_and_the_larger_noise() -> None:
    terms = SitePrivacy(max_epsilon=2.0, delta=1e-5, min_noise_multiplier=0.8)
    plan = effective_privacy(terms, _DP, "a")
    assert (plan.target_epsilon, plan.target_delta, plan.noise_multiplier) == (2.0, 1e-5, None)
    modest = PrivacyConfig(enabled=True, target_epsilon=1.0, target_delta=1e-6, noise_multiplier=0.5)
    plan = effective_privacy(terms, modest, "a")
    assert (plan.target_epsilon, plan.target_delta, plan.noise_multiplier) == (1.0, 1e-6, 0.8)
    uncapped = PrivacyConfig(enabled=True, target_epsilon=None, noise_multiplier=1.0)
    assert effective_privacy(terms, uncapped, "a").target_epsilon == 2.0  # a fixed sigma gets a cap


def test_terms_travel_through_node_config_and_are_validated() -> None:
    terms = SitePrivacy(required=False, max_epsilon=3.0, min_noise_multiplier=1.5, delta=1e-6)
    node = terms.node_config()
    assert node == {"privacy-required": False, "privacy-max-epsilon": 3.0,
                    "privacy-min-noise-multiplier": 1.5, "privacy-delta": 1e-6}
    assert SitePrivacy.from_node_config({"site": "a", **node}) == terms
    assert SitePrivacy.from_node_config({"site": "a"}) is None
    with pytest.raises(ConfigError, match="privacy-required"):
        SitePrivacy.from_node_config({"privacy-required": "maybe"})
    with pytest.raises(ConfigError, match="max_epsilon"):
        SitePrivacy(max_epsilon=0.0)
    with pytest.raises(ConfigError, match="delta"):
        SitePrivacy(delta=1.0)


# ------------------------------------------------------------------ the site YAML
def test_site_yaml_privacy_section_reaches_node_config(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("site: udiat\ninsecure: true\ndata: {path: /d}\n"
                    "privacy: {max_epsilon: 2.5, delta: 1.0e-5}\n")
    node = load_site_config(path).node_config()
    assert node["privacy-required"] is True and node["privacy-max-epsilon"] == 2.5
    assert node["privacy-delta"] == 1e-5 and "privacy-min-noise-multiplier" not in node
    path.write_text("site: udiat\ninsecure: true\ndata: {path: /d}\nprivacy: {max_eps: 2}\n")
    with pytest.raises(ConfigError, match=r"site\.yaml.*max_eps"):
        load_site_config(path)
    path.write_text("site: udiat\ninsecure: true\ndata: {path: /d}\n")
    assert not any(k.startswith("privacy") for k in load_site_config(path).node_config())


# ------------------------------------------------------------------ the ClientApp enforces them
def _audited_node(tmp_path: Path, **terms: Any) -> dict[str, Any]:
    node = _dp_node(tmp_path, **terms)
    AuditLog(Path(node["state-dir"]) / "audit.jsonl", actor="site:Hosp1").append("site_start")
    return node


def test_site_requiring_dp_refuses_a_coordinator_that_turns_it_off(spec, tmp_path) -> None:
    node = _audited_node(tmp_path, required=True)
    grid = LocalGrid(make_client_app(), {5: node})
    assert not spec.experiment.privacy.enabled
    reply = list(grid.send_and_receive([_msg(MessageType.TRAIN, spec, _init(spec), dst_node_id=5)]))[0]
    assert reply.has_error() and not reply.has_content()
    assert "site Hosp1: train refused (SitePrivacyRefused: the site requires DP-SGD" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason
    audit = tmp_path / "state" / "audit.jsonl"
    refused = [e for e in read(audit) if e["event"] == "privacy_refused"]
    assert len(refused) == 1 and refused[0]["refusal"] == "SitePrivacyRefused"
    assert verify(audit) == []
    assert not (tmp_path / "state" / "privacy" / "accountant.json").exists()


def test_site_cap_holds_across_runs_against_a_coordinator_asking_for_more(spec, tmp_path) -> None:
    app = make_client_app()
    one, two = (_expected_epsilon(app, spec, _dp_node(tmp_path / "probe"), r) for r in (1, 2))
    cap = (one + two) / 2  # one round fits, two do not
    node, init = _audited_node(tmp_path, max_epsilon=cap), _init(spec)
    greedy = _dp_spec(spec, target_epsilon=50.0)
    grid = LocalGrid(app, {5: node})
    first = list(grid.send_and_receive([_msg(MessageType.TRAIN, greedy, init, dst_node_id=5,
                                             **{"run-key": "run1"})]))[0]
    assert not first.has_error() and first.content["metrics"]["epsilon"] == pytest.approx(one, rel=1e-6)
    grid = LocalGrid(app, {6: node})  # a later run, a fresh SuperNode process
    later = list(grid.send_and_receive([_msg(MessageType.TRAIN, greedy, init, dst_node_id=6,
                                             **{"run-key": "run2"})]))[0]
    assert later.has_error()
    assert "SitePrivacyRefused: the site's privacy budget (max eps" in later.error.reason
    ledger = json.loads((tmp_path / "state" / "privacy" / "accountant.json").read_text())
    assert ledger["epsilon"] == pytest.approx(one, rel=1e-6)  # nothing spent by the refusal
    refused = [e for e in read(tmp_path / "state" / "audit.jsonl") if e["event"] == "privacy_refused"]
    assert [(e["run_key"], e["round"]) for e in refused] == [("run2", 1)]


def test_site_noise_floor_and_delta_apply_to_the_accountant(spec, tmp_path) -> None:
    app = make_client_app()
    node, init = _dp_node(tmp_path), _init(spec)
    dp = _dp_spec(spec)  # sigma 1.0, delta 1e-3
    assert app(_msg(MessageType.TRAIN, dp, init), _context(node)).content["metrics"]["epsilon"] == \
        pytest.approx(_expected_epsilon(app, spec, node, 1), rel=1e-6)
    # the hospital now sets a floor of sigma 2 and delta 1e-5: round 2 runs at sigma 2 although
    # the ledger's sigma is 1, and epsilon is read at the site's delta
    strict = {**node, **SitePrivacy(min_noise_multiplier=2.0, delta=1e-5).node_config()}
    eps = app(_msg(MessageType.TRAIN, dp, init, **{"server-round": 2}), _context(strict))
    n = app(_msg(MessageType.QUERY, spec), _context(node)).content["info"]["num-train"]
    q, steps = poisson_rate(n, spec.experiment.train.batch_size)
    expected = epsilon_of([[1.0, q, steps], [2.0, q, steps]], 1e-5)
    assert eps.content["metrics"]["epsilon"] == pytest.approx(expected, rel=1e-6)
    ledger = json.loads((tmp_path / "state" / "privacy" / "accountant.json").read_text())
    assert ledger["noise_multiplier"] == 2.0 and ledger["delta"] == 1e-5
