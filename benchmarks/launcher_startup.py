"""Start-up cost of the launchers, against the imports they avoid, measured in the same run.

``flower-server`` and ``flower-client`` parse YAML into frozen dataclasses and start the
SuperLink / SuperNode / worker processes; the network (torch + MONAI) loads only in the
processes that run it. Each launcher start is paid per site start and per ``--help``, on
machines where the sites' own workers are importing torch at the same moment. Arms (each a
fresh interpreter, CPU seconds of the child: user + system):

- python        ``python -c pass`` (the floor)
- server-help   ``python -m server.cli --help``
- client-help   ``python -m client.cli --help``
- network       ``python -c "import common.model"`` (torch + MONAI: what a launcher would pay
                 if it imported the model, as it did before the imports were made lazy)

The ratio column is each arm's median CPU seconds over ``network``'s.

    python benchmarks/launcher_startup.py [--repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.perfutil import OUT_DIR, format_table, machine_note, write_csv  # noqa: E402

ARMS: dict[str, list[str]] = {
    "python": ["-c", "pass"],
    "server-help": ["-m", "server.cli", "--help"],
    "client-help": ["-m", "client.cli", "--help"],
    "network": ["-c", "import common.model"],
}


def child_cpu_seconds(args: list[str]) -> float:
    """CPU seconds (user + system) of one fresh interpreter running ``args``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="one repeat (a smoke run)")
    p.add_argument("--out", type=Path, default=OUT_DIR / "launcher_startup.csv")
    args = p.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    samples: dict[str, list[float]] = {name: [] for name in ARMS}
    for _ in range(repeats):  # interleaved, so drift in machine load hits every arm alike
        for name, cmd in ARMS.items():
            samples[name].append(child_cpu_seconds(cmd))
    ref = statistics.median(samples["network"])
    rows = [{"arm": name, "median_cpu_s": round(statistics.median(v), 3),
             "min_cpu_s": round(min(v), 3), "ratio_to_network": round(statistics.median(v) / ref, 3)}
            for name, v in samples.items()]
    print(machine_note())
    print(format_table(rows))
    print(f"wrote {write_csv(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
