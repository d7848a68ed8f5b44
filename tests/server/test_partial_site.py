"""A federated round in which one site holds labels only (its manifest has no lesion masks):
that site trains in every round, and its images teach the model through the classification and
consistency terms only."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from client.app import make_client_app
from common.data.synthetic import make_centre
from common.federation import SiteSpec
from common.records import Label
from common.sitedata import load_site_tensors
from server.app import run_federation
from tests.server.local_grid import SITES, LocalGrid, tiny_spec




def labels_only_site(root: Path, n: int = 16) -> Path:
    """A manifest site from a synthetic centre: every row has a label, no row has a mask."""
    root.mkdir(parents=True)
    rows = ["image,mask,label,patient_id"]
    for i, case in enumerate(make_centre("SynEG", n, size=64, seed=0)):
        Image.fromarray(case.image).save(root / f"img{i}.png")
        rows.append(f"img{i}.png,,{case.label.name.lower()},{case.patient_id}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_a_label_only_site_takes_part_in_every_round(tmp_path) -> None:
    spec = tiny_spec(tmp_path / "run", rounds=2)
    site = SiteSpec("C", data_path=str(labels_only_site(tmp_path / "hospital_c")))
    spec = dataclasses.replace(spec, sites=(*spec.sites[:2], site))
    train, _ = load_site_tensors(site, spec.experiment.data)
    lesions = int((train.labels != int(Label.NORMAL)).sum())
    assert lesions > 0 and train.annotation_counts()["label only"] == lesions
    assert train.annotation_counts()["mask only"] == 0 and float(train.masks.sum()) == 0.0

    n = len(spec.sites)
    grid = LocalGrid(make_client_app(spec),
                     {1000 + i: {"partition-id": i, "num-partitions": n} for i in range(n)})
    folder = run_federation(grid, spec)
    rows = folder.read_metrics()
    for rnd in (1, 2):
        trained = {r.site for r in rows if r.round == rnd and r.phase == "train"}
        assert set(SITES) <= trained
    c_rows = [r for r in rows if r.site == "C" and r.phase == "train" and r.round == 1]
    assert c_rows and all(np.isfinite(r.value) for r in c_rows)
    assert folder.read_status()["state"] == "finished"
