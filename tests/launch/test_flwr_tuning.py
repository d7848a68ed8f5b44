"""launch/flwr_tuning.py: the sleep stand-in and the heartbeat patch (in a child process)."""
from __future__ import annotations

import subprocess
import sys
import time

from launch.flwr_tuning import ShortSleeps


def test_short_sleeps_maps_idle_and_poll_waits() -> None:
    fake = ShortSleeps(idle_s=0.01, short_s=0.001)
    t0 = time.perf_counter()
    fake.sleep(3)  # stock idle pull
    fake.sleep(0.5)  # stock reply poll
    assert time.perf_counter() - t0 < 0.5
    assert fake.time is time.time and fake.monotonic is time.monotonic


HEARTBEAT_CHECK = """
from launch.flwr_tuning import patch_heartbeat
import flwr.supercore.heartbeat as hb, flwr.supernode.fleet_http_connection as fhc
patch_heartbeat(10.0)
assert hb.HEARTBEAT_DEFAULT_INTERVAL == fhc.HEARTBEAT_DEFAULT_INTERVAL == 10.0
patch_heartbeat(None)  # None keeps what is there
assert hb.HEARTBEAT_DEFAULT_INTERVAL == 10.0
print("ok")
"""


def test_heartbeat_patch_sets_both_announced_and_sent_interval() -> None:
    res = subprocess.run([sys.executable, "-c", HEARTBEAT_CHECK], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
