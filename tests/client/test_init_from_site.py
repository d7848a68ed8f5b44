"""A site never opens the coordinator's model.init_from: its weights arrive in the message."""
from __future__ import annotations

import json

from client.runtime import resolve_site
from common.config import ExperimentConfig, ModelConfig, to_dict


def test_the_site_drops_init_from_like_pretrained_path() -> None:
    exp = ExperimentConfig(model=ModelConfig(init_from="/server/only/public.pt", pretrained_path="/server/x.pt"))
    ctx = resolve_site({"site": "Hosp1", "synthetic-centre": "SynPL"}, None, json.dumps(to_dict(exp)))
    assert ctx.experiment.model.init_from is None and ctx.experiment.model.pretrained_path is None
    assert ctx.experiment.model.arch == exp.model.arch
