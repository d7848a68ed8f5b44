"""The launchers stay light: flower-server and flower-client parse configs and start processes,
so they must not import torch or MONAI (≈5 s of CPU each on 2 cores, paid by every site start
and every ``--help``). Checked in a fresh interpreter, since this one has torch loaded already."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "monai", "flwr", "pandas")


@pytest.mark.parametrize("module", [
    "server.cli", "client.cli", "client.site_process", "server.coordinator", "server.coordinator_config", "client.site_config",
    "launch.process", "launch.flwr_env", "launch.audit", "launch.flwr_tuning", "launch.wire",
    "common.runfolder",
])
def test_launcher_modules_do_not_import_torch_monai_or_flwr(module: str) -> None:
    code = (f"import sys, {module}; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "", f"{module} imports {out}"


def test_run_spec_still_builds_the_network_on_demand() -> None:
    from common.config import ExperimentConfig, ModelConfig
    from common.federation import build_experiment_model, norm_keys, state_is_finite

    model = build_experiment_model(ExperimentConfig(model=ModelConfig(base_channels=4, depth=2)))
    assert norm_keys(model) and state_is_finite(model.state_dict())
