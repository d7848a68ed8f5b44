"""Every server test starts (and ends) with an empty tensor memo and runs under a Flower task
identity (Messages built outside a runtime need one); modules that need only the identity
define their own ``_identity``."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from common.sitedata import clear_memo
from tests.server.local_grid import task_identity


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    clear_memo()
    with task_identity():
        yield
    clear_memo()
