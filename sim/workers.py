"""Units in ``sim.workers`` processes: centralised units side by side, each federated unit in a
child process of its own, every child in a process group of its own.

Two small CPU trainings in two single-thread processes finish sooner than one after the other
with two threads each (convolutions on small batches use a second core poorly), which is how the
recommended recipe's two seeds fit the 2-core budget. A federated unit runs in a child because
Flower's simulation engine starts a Ray cluster (raylet, GCS, agents, actors) from the process
that calls it, and Ray's own SIGTERM handler aborts that process and leaves parts of the cluster
running: in a child's process group the whole cluster is ended with the group
(sim/stopping.py ``end_group``), whether the run finishes or is stopped. Results come back to
the main process, which alone writes the run folder, so nothing is written twice or half.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from common.device import set_threads
from common.settings import Settings
from sim.protocols import PlannedUnit, Runtime
from sim.stopping import end_group
from sim.units import UnitOutput, run_unit

log = logging.getLogger(__name__)

#: Seconds a child's group gets between SIGTERM and SIGKILL (Ray's daemons exit in about one).
GRACE_S = 10.0


def worker_threads(settings: Settings) -> int:
    """Torch threads of each worker: ``train.num_threads`` or an equal share of the cores."""
    n = settings.experiment.train.num_threads
    return n if n else max(1, (os.cpu_count() or 1) // settings.sim.workers)


def _init(threads: int, level: int) -> None:
    os.setpgid(0, 0)  # a group of its own: ending it ends everything this worker started
    set_threads(threads)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the main process has already named every skipped or odd file while describing the centres
    logging.getLogger("common.data").setLevel(max(level, logging.ERROR))
    logging.getLogger("flwr").propagate = False  # as in the main process: Flower prints its own lines
    if level > logging.INFO:  # the server app raises its loggers to INFO for its own log file only
        logging.getLogger("flwr").setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:
            handler.setLevel(level)


class UnitPool:
    """A spawn ProcessPoolExecutor whose workers each lead a process group; ``close`` ends the
    groups (after the workers finished, or at once when ``force``)."""

    def __init__(self, workers: int, threads: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        self.executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init,
                                            initargs=(threads, logging.getLogger().level))
        self.groups: set[int] = set()

    def submit(self, fn: Callable[..., UnitOutput], *args: Any) -> Future[UnitOutput]:
        future = self.executor.submit(fn, *args)
        self.groups.update((getattr(self.executor, "_processes", None) or {}).keys())
        return future

    def close(self, force: bool = False) -> None:
        self.groups.update((getattr(self.executor, "_processes", None) or {}).keys())
        if force:  # stopped: end the groups first, the executor then finds its workers gone
            for pgid in sorted(self.groups):
                end_group(pgid, GRACE_S)
        self.executor.shutdown(wait=True, cancel_futures=True)
        for pgid in sorted(self.groups):  # stragglers of finished units (a Ray actor still exiting)
            end_group(pgid, GRACE_S)
        self.groups.clear()


def run_units(units: Sequence[PlannedUnit], settings: Settings, rt: Runtime, run_dir: Path,
              run: Callable[..., UnitOutput] = run_unit,
              ) -> Iterator[tuple[PlannedUnit, UnitOutput | BaseException]]:
    """(unit, its output or the exception it raised), in the order they finish. Centralised
    units run side by side with ``sim.workers`` > 1, else in this process; federated units each
    in a child. Closing the generator early (an exception, ``Stopped``) ends every child."""
    parallel = [pu for pu in units if not pu.federated] if settings.sim.workers > 1 else []
    if len(parallel) < 2:
        parallel = []
    pools: list[UnitPool] = []
    finished = False
    try:
        if parallel:
            pools.append(UnitPool(settings.sim.workers, worker_threads(settings)))
            futures = {pools[-1].submit(run, pu, settings, rt, run_dir): pu for pu in parallel}
            for future in as_completed(futures):
                error = future.exception()
                yield futures[future], error if error is not None else future.result()
            pools.pop().close()
        for pu in units:
            if pu in parallel:
                continue
            if not pu.federated:
                try:
                    yield pu, run(pu, settings, rt, run_dir)
                except Exception as exc:  # noqa: BLE001 - one failed unit must not lose the others
                    yield pu, exc
                continue
            if not pools:  # the main process's torch threads: the same results as in-process
                pools.append(UnitPool(1, torch.get_num_threads()))
            future = pools[-1].submit(run, pu, settings, rt, run_dir)
            error = future.exception()
            if isinstance(error, BrokenProcessPool):  # the child died: the next unit gets a new one
                pools.pop().close(force=True)
            yield pu, error if error is not None else future.result()
        finished = True
    finally:
        for pool in pools:
            pool.close(force=not finished)
