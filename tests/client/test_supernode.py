"""client/supernode.py: the worker's FAB gate and the timing patches (applied in a child
process, so this test process keeps stock flwr modules)."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from client.supernode import FabRejected, Worker


def _worker(**kw: object) -> Worker:
    return Worker("127.0.0.1:1", None, "udiat", **kw)  # type: ignore[arg-type]


def test_fab_must_match_the_installed_package() -> None:
    version = metadata.version("fedbus")
    worker = _worker()
    worker.check_fab("fedbus/fedbus", version, "ab" * 32)  # same app: accepted
    with pytest.raises(FabRejected, match="site runs fedbus=="):
        worker.check_fab("fedbus/fedbus", version + ".post1", "ab" * 32)
    with pytest.raises(FabRejected, match="coordinator app evil/other"):
        worker.check_fab("evil/other", version, "ab" * 32)


def test_allow_list_of_fab_hashes() -> None:
    version = metadata.version("fedbus")
    worker = _worker(allowed_fab_hashes=["AB" * 32])
    worker.check_fab("fedbus/fedbus", version, "ab" * 32)  # case-insensitive
    with pytest.raises(FabRejected, match="allow-list"):
        worker.check_fab("fedbus/fedbus", version, "cd" * 32)


PATCH_CHECK = """
import functools, time
from client.supernode import patch_supernode, patch_worker
from server.serverapp_exec import patch_grid
import flwr.supernode.start_client_internal as sci
import flwr.supernode.runtime.run_clientapp as rc
import flwr.superlink.grid.http_grid as hg
patch_supernode(0.01)
patch_worker()
patch_grid(0.01)
t0 = time.perf_counter(); sci.time.sleep(3); hg.time.sleep(3); sci.time.sleep(0.5)
assert time.perf_counter() - t0 < 1.0, "sleeps not shortened"
for fn in (sci.pull_objects, rc.pull_and_inflate_object_from_tree, hg.pull_objects):
    assert isinstance(fn, functools.partial) and fn.keywords["initial_backoff"] == 0.05, fn
assert sci.time.time is time.time  # everything else is the real time module
print("ok")
"""


def test_timing_patches_apply_to_the_flwr_modules() -> None:
    res = subprocess.run([sys.executable, "-c", PATCH_CHECK], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
