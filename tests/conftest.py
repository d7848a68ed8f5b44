"""Shared fixtures. ``data_root``: the real datasets, or a clean skip where they are absent."""
from __future__ import annotations

import os
from pathlib import Path

# Flower reads these once, at import: set them before any test imports flwr.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def find_data_root() -> Path | None:
    """$FEDBUS_DATA_ROOT if set, else ../shared/data beside the repository; None if missing."""
    env = os.environ.get("FEDBUS_DATA_ROOT")
    candidate = Path(env) if env else REPO.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder holding the real centres (BrEaST/, BUSI/, BUS-UCLM/ ...); skips when absent."""
    root = find_data_root()
    if root is None:
        pytest.skip("real data not found (set FEDBUS_DATA_ROOT or provide ../shared/data)")
    return root
