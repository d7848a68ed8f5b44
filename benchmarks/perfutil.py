"""Shared helpers of the benchmarks: the settings arguments, process-tree memory, tables, CSV.

Every benchmark takes its configuration through ``common.settings.load_settings``: ``--preset
NAME|FILE`` and repeatable ``--set section.key=value`` (``add_settings_args``, ``settings_from_args``).

Memory is read from ``/proc`` (Linux; psutil is not a dependency): the RSS of this process and
of every descendant (Ray's raylet, GCS and worker processes in a simulation), sampled by a
background thread, so the peak is the largest *sum* seen at one sampling instant.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from common.config import ConfigError
from common.settings import Settings, load_settings, settings_to_dict

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "runs" / "benchmarks"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def add_settings_args(parser: argparse.ArgumentParser, default_preset: str,
                      default_set: Sequence[str] = (), default_text: str | None = None) -> None:
    """Add ``--preset NAME|FILE`` and repeatable ``--set KEY=VALUE`` to ``parser``. Without
    ``--preset`` the benchmark runs ``default_preset`` with ``default_set`` under the ``--set``
    items (what it has always measured); a ``--preset`` given is taken as it is.
    ``default_text`` replaces the help's description of the default."""
    shown = default_text or " ".join([default_preset, *(f"--set {item}" for item in default_set)])
    parser.add_argument("--preset", default=None, metavar="NAME|FILE",
                        help=f"settings preset or YAML file (default: {shown})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set train.batch_size=4 (repeatable)")
    parser.set_defaults(settings_default=(default_preset, tuple(default_set)))


def settings_source(args: argparse.Namespace, extra: Sequence[str] = (),
                    source: str | Path | None = None) -> tuple[str, list[str]]:
    """(preset or file, ``--set`` items in order) of ``add_settings_args``' options: the preset
    (``source`` replaces the default one and its default overrides), then ``extra`` (a benchmark
    mode such as ``--quick``), then the user's ``--set`` items, which win."""
    preset, default_set = args.settings_default
    if args.preset is not None:
        preset, default_set = args.preset, ()
    elif source is not None:
        preset, default_set = str(source), ()
    return str(preset), [*default_set, *extra, *args.overrides]


def settings_from_args(args: argparse.Namespace, extra: Sequence[str] = (),
                       source: str | Path | None = None) -> Settings:
    """The Settings of ``settings_source(args, extra, source)``; a bad key or value exits with
    the message naming it."""
    preset, items = settings_source(args, extra, source)
    try:
        return load_settings(preset, items)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def write_settings(settings: Settings, path: str | Path) -> Path:
    """``settings`` as a resolved YAML document at ``path``: a child process given
    ``--preset path`` loads exactly these settings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings_to_dict(settings), sort_keys=False), encoding="utf-8")
    return path


def _children() -> dict[int, list[int]]:
    """{ppid: [pid, ...]} of every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 if it has gone)."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(root: int | None = None) -> tuple[int, int]:
    """(bytes, number of processes): RSS summed over ``root`` (default: this process) and all of
    its descendants. Shared pages (torch's libraries in every Ray worker) count once per process,
    as each process's RSS does: an upper bound of the physical memory used."""
    root = os.getpid() if root is None else root
    tree, total, count, todo = _children(), 0, 0, [root]
    while todo:
        pid = todo.pop()
        total += _rss(pid)
        count += 1
        todo.extend(tree.get(pid, []))
    return total, count


class PeakMemory:
    """Context manager sampling ``tree_rss(root)`` every ``interval`` s (root: this process by
    default); ``peak_bytes``, ``peak_procs``.
    Also reports this process's own peak (``ru_maxrss``) and its descendants' that have exited
    (``RUSAGE_CHILDREN``: the largest single child)."""

    def __init__(self, interval: float = 0.25, root: int | None = None) -> None:
        self.interval = interval
        self.root = root
        self.peak_bytes = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            total, procs = tree_rss(self.root)
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_procs = total, procs
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    @staticmethod
    def self_peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    @staticmethod
    def children_peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write dict rows (union of keys, first-seen order) to ``path``; returns it."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    return path


def machine_note() -> str:
    """One line: CPUs visible, load average, torch threads (timings depend on all three)."""
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"cpus={os.cpu_count()} loadavg={load[0]:.2f} torch_threads={torch.get_num_threads()} "
            f"torch={torch.__version__} time={time.strftime('%Y-%m-%d %H:%M:%S')}")
