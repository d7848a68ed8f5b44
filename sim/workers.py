"""Centralised units side by side: ``sim.workers`` processes, each with its share of the cores.

Two small CPU trainings in two single-thread processes finish sooner than one after the other
with two threads each (convolutions on small batches use a second core poorly), which is how the
recommended recipe's two seeds fit the 2-core budget. Federated units stay in the main process:
Flower's simulation engine starts its own Ray workers. Results come back to the main process,
which alone writes the run folder, so nothing is written twice or half.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path

from common.device import set_threads
from common.settings import Settings
from sim.protocols import PlannedUnit, Runtime
from sim.units import UnitOutput, run_unit

log = logging.getLogger(__name__)


def worker_threads(settings: Settings) -> int:
    """Torch threads of each worker: ``train.num_threads`` or an equal share of the cores."""
    n = settings.experiment.train.num_threads
    return n if n else max(1, (os.cpu_count() or 1) // settings.sim.workers)


def _init(threads: int, level: int) -> None:
    set_threads(threads)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the main process has already named every skipped or odd file while describing the centres
    logging.getLogger("common.data").setLevel(max(level, logging.ERROR))


def run_units(units: Sequence[PlannedUnit], settings: Settings, rt: Runtime, run_dir: Path,
              run: Callable[..., UnitOutput] = run_unit,
              ) -> Iterator[tuple[PlannedUnit, UnitOutput | BaseException]]:
    """(unit, its output or the exception it raised), in the order they finish. One worker (or
    one unit) runs in this process; federated units always do."""
    parallel = [pu for pu in units if not pu.federated] if settings.sim.workers > 1 else []
    if len(parallel) < 2:
        parallel = []
    if parallel:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        with ProcessPoolExecutor(settings.sim.workers, mp_context=ctx, initializer=_init,
                                 initargs=(worker_threads(settings), logging.getLogger().level)) as pool:
            futures: dict[Future[UnitOutput], PlannedUnit] = {
                pool.submit(run, pu, settings, rt, run_dir): pu for pu in parallel}
            for future in as_completed(futures):
                error = future.exception()
                yield futures[future], error if error is not None else future.result()
    for pu in units:
        if pu in parallel:
            continue
        try:
            yield pu, run(pu, settings, rt, run_dir)
        except Exception as exc:  # noqa: BLE001 - one failed unit must not lose the others
            yield pu, exc
