"""Fixtures of the client tests: each test starts with an empty tensor memo and a Flower task
identity (Messages outside a runtime need one), and ``spec`` is the three-site tiny RunSpec."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from common.federation import RunSpec
from common.sitedata import clear_memo
from tests.server.local_grid import task_identity, tiny_spec


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    clear_memo()
    with task_identity():
        yield


@pytest.fixture()
def spec(tmp_path) -> RunSpec:
    return tiny_spec(tmp_path / "run")
