"""One of three sites holds pathology labels and no masks: every round it is sent the model, its
reply arrives and is aggregated with its own num-examples, it contributes classification and
consistency but no segmentation loss, and the run finishes with the learned prior recorded per
round, for the global model and for each site's update (server/prior_rows.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from flwr.app import MessageType
from PIL import Image

from client.app import make_client_app
from common.data.synthetic import make_centre
from common.device import seed_everything
from common.federation import AGGREGATE_SITE, SiteSpec, build_experiment_model
from common.losses import trained_parts
from common.modelfile import read_model
from common.records import Label
from common.sitedata import load_site_tensors
from server.app import run_federation
from server.prior_rows import describe_rows
from server.report import write_report
from tests.server.local_grid import SITES, LocalGrid, tiny_spec

ROUNDS = 2


def lesions_with_labels_only(root: Path, n: int = 20) -> Path:
    """A manifest site of the lesion images of a synthetic centre: a label on every row, no mask
    on any (so no image of this site can give a segmentation loss)."""
    root.mkdir(parents=True)
    rows = ["image,mask,label,patient_id"]
    for i, case in enumerate(c for c in make_centre("SynEG", n, size=64, seed=1) if c.label != Label.NORMAL):
        Image.fromarray(case.image).save(root / f"img{i}.png")
        rows.append(f"img{i}.png,,{case.label.name.lower()},{case.patient_id}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_label_only_site_is_aggregated_every_round(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path / "run", rounds=ROUNDS)
    site = SiteSpec("C", data_path=str(lesions_with_labels_only(tmp_path / "hospital_c")))
    spec = dataclasses.replace(spec, sites=(*spec.sites[:2], site))
    train, _ = load_site_tensors(site, spec.experiment.data)
    assert len(train) > 0 and not bool(train.has_mask.any()) and bool(train.has_label.all())
    assert train.annotation_counts() == {"mask and label": 0, "mask only": 0, "label only": len(train)}

    nodes = {1000 + i: {"partition-id": i, "num-partitions": len(SITES)} for i in range(len(SITES))}
    grid = LocalGrid(make_client_app(spec), nodes)
    folder = run_federation(grid, spec)
    assert folder.read_status()["state"] == "finished"

    # every round: C was sent a train message and its reply (no error) came back
    c_node = 1002
    train_sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN and m.metadata.dst_node_id == c_node]
    c_replies = [r for r in grid.replies if r.metadata.src_node_id == c_node and r.metadata.message_type == MessageType.TRAIN]
    assert len(train_sent) == ROUNDS and len(c_replies) == ROUNDS
    assert not any(r.has_error() for r in c_replies)

    rows = folder.read_metrics()

    def value(rnd: int, phase: str, site: str, metric: str) -> float:
        (v,) = [r.value for r in rows if (r.round, r.phase, r.site, r.metric) == (rnd, phase, site, metric)]
        return v

    for rnd in range(1, ROUNDS + 1):
        assert value(rnd, "train", AGGREGATE_SITE, "sites_ok") == 3.0
        assert not [r for r in rows if r.round == rnd and r.metric in ("failed", "rejected")]
        assert value(rnd, "train", "C", "num-examples") == float(len(train))
        # C's decoder is weighted by the images the consistency term reached through the mask
        # (none under the classifier route: server/part_weights.py), its head by its labels
        expected = trained_parts(train, spec.experiment.loss)
        assert value(rnd, "train", "C", "n_decoder") == expected["n_decoder"] > 0  # this spec: grad "both"
        assert value(rnd, "train", "C", "n_head") == len(train)
        assert 0 < value(rnd, "train", "A", "n_decoder") <= value(rnd, "train", "A", "num-examples")
        counts = [value(rnd, "train", s, "num-examples") for s in SITES]
        assert value(rnd, "train", AGGREGATE_SITE, "num-examples") == sum(counts)
        # no mask: no segmentation loss at C, while the masked sites have one
        assert value(rnd, "train", "C", "seg") == 0.0 and value(rnd, "train", "A", "seg") > 0.0
        assert value(rnd, "train", "C", "cls") > 0.0 and value(rnd, "train", "C", "consistency") > 0.0
        # the prior per round: the global model's and each site's update
        for s in (AGGREGATE_SITE, *SITES):
            assert {r.metric for r in rows if (r.round, r.phase, r.site) == (rnd, "prior", s)} >= {"bias", "bias_per_unit"}

    # the last round's global prior rows are those of the final model file
    state, _meta = read_model(folder.path / "model.pt")
    model = build_experiment_model(spec.experiment)
    model.load_state_dict(state)
    final = describe_rows(model.prior.describe())
    for metric, v in final.items():
        assert value(ROUNDS, "prior", AGGREGATE_SITE, metric) == pytest.approx(v, rel=1e-5, abs=1e-7), metric
    # ... and site C's own update moved its prior away from the one it was sent (round 1's start)
    seed_everything(spec.experiment.train.seed)  # the server's initial weights
    start = describe_rows(build_experiment_model(spec.experiment).prior.describe())
    assert any(value(1, "prior", "C", m) != pytest.approx(v, abs=1e-9)
               for m, v in start.items() if m.startswith("weight_") or m == "bias")

    text = write_report(folder.path).read_text()
    assert "## What this model learned about malignancy" in text and "| C |" in text

