"""The federation's calibration step: once after the last round, the final model goes to every
connected site with the query action "calibrate"; each site answers with its summed log-loss on
the temperature grid and its image count (``common.calibration``, client/app.py), never per-image
values. Replies are checked (the grid's length, finite sums >= 0, a count no larger than the
site's declared training images), summed, and the fitted temperature is written into the run's
model file and its card (``common.modelfile.set_temperature``).

A site that fails, refuses (its terms require DP: the sums are not noised) or sends an invalid
reply is left out and logged; with no usable reply the model stays at temperature 1.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import calibration
from common.config import ExperimentConfig
from common.modelfile import set_temperature
from server.registry import SiteRegistry

log = logging.getLogger(__name__)

MESSAGE_TYPE = f"{MessageType.QUERY}.{calibration.CALIBRATE}"


def gather_stats(grid: Grid, registry: SiteRegistry, base_config: Mapping[str, Any],
                 state_dict: Mapping[str, torch.Tensor], timeout: float,
                 on_validation: bool = False) -> dict[str, calibration.GridStats]:
    """{site: its checked statistics} of the connected sites that answered the calibration
    query for the model ``state_dict`` with a valid reply. A site's count is capped by the
    images it declared when joining: validation images when ``on_validation``, else training."""
    declared = registry.declared_val if on_validation else registry.declared
    sites = registry.connected(grid.get_node_ids())
    if not sites:
        log.warning("calibration: no site connected; the model keeps temperature 1")
        return {}
    content = RecordDict({"arrays": ArrayRecord(dict(state_dict)), "config": ConfigRecord(dict(base_config))})
    messages = [Message(content=content, message_type=MESSAGE_TYPE, dst_node_id=n) for n in sites.values()]
    got: dict[str, calibration.GridStats] = {}
    answered: set[str] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        site = registry.name(reply.metadata.src_node_id)
        if site not in sites:
            continue  # a node that is no longer the site it was asked as
        answered.add(site)
        if reply.has_error():
            log.warning("calibration: site %s sent no statistics: %s", site, reply.error.reason)
            continue
        record = reply.content.metric_records.get("calibration")
        try:
            got[site] = calibration.from_record(record if record is not None else {},
                                                declared.get(site, 0))
        except calibration.CalibrationError as exc:
            log.error("calibration: site %s: reply refused: %s", site, exc)
    for site in sorted(set(sites) - answered):
        log.warning("calibration: site %s left out (no reply within %.0fs)", site, timeout)
    return got


def calibrate_model(grid: Grid, registry: SiteRegistry, base_config: Mapping[str, Any],
                    state_dict: Mapping[str, torch.Tensor], model_path: Path, experiment: ExperimentConfig,
                    timeout: float) -> float:
    """Query the sites, fit the temperature on their summed statistics and write it (with how
    it was fitted) into ``model_path`` and its card; returns it (1.0 when nothing usable came).
    Never raises for the query itself (e.g. the run stopped from outside meanwhile): the rounds
    are done and the model file stands, uncalibrated."""
    if not calibration.calibrates(experiment.data):
        log.info("calibration: the run keeps no validation images (data.val_fraction 0); the model "
                 "keeps temperature 1")
        return 1.0
    try:
        got = gather_stats(grid, registry, base_config, state_dict, timeout,
                           on_validation=experiment.data.val_fraction > 0)
    except Exception:  # noqa: BLE001 - the finished run's outcome must not depend on this step
        log.error("calibration: the query failed; the model keeps temperature 1", exc_info=True)
        return 1.0
    if not got:
        return 1.0
    merged = calibration.merge(got.values())
    temperature = calibration.fit_temperature(merged)
    split = calibration.split_name(experiment.data)
    info = {**calibration.summary(merged, temperature, split, {s: st.count for s, st in got.items()}),
            "federated": True}
    set_temperature(model_path, temperature, info)
    log.info("calibration: temperature %.3f from %d site(s) (%d %s images); written to %s",
             temperature, len(got), merged.count, split, model_path)
    return temperature
