"""A site's data as model-ready tensors, loaded once per process and cached on disk.

Flower calls a site once per message (deployment: a fresh process each time), so decoding the
PNGs every round would dominate a round. Tensors are therefore cached on disk with
``cached_tensors`` (when a ``cache_dir`` is given) and memoised in-process (simulation keeps
its workers alive between messages). The split is ``split_cases``: deterministic, grouped by
patient and duplicate image, stratified by label — so the same images are in the validation
split in every round and after a restart.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

from common.config import DataConfig
from common.data import load_site
from common.data.splits import split_cases
from common.data.synthetic import make_centre
from common.data.tensors import TensorData, cached_tensors, to_tensors
from common.federation import SiteSpec
from common.records import Case

log = logging.getLogger(__name__)

_MEMO_SIZE = 8
_memo: OrderedDict[tuple, TensorData | None] = OrderedDict()


def site_cases(site: SiteSpec, data_cfg: DataConfig) -> list[Case]:
    """All cases of a site: its folder read with ``load_site`` or its synthetic centre
    (seeded with ``data_cfg.seed``; the centre's name varies the draw)."""
    if site.synthetic_centre is not None:
        return make_centre(site.synthetic_centre, site.synthetic_n, size=data_cfg.image_size, seed=data_cfg.seed)
    return load_site(site.data_path, fmt=site.data_format, strict=site.strict)


class _EmptyPart(Exception):
    """A split part without cases (to_tensors refuses empty lists)."""


def _tensors(site: SiteSpec, data_cfg: DataConfig, cache_dir: str | None, part: str,
             cases: Callable[[], list[Case]]) -> TensorData | None:
    """Tensors of one part of a site (None when the part has no cases), memoised and cached."""
    key = (site, data_cfg, cache_dir, part)
    if key in _memo:
        _memo.move_to_end(key)
        return _memo[key]

    def load() -> list[Case]:
        out = cases()
        if not out:
            raise _EmptyPart
        return out

    try:
        if cache_dir is None or site.synthetic_centre is not None:
            data: TensorData | None = to_tensors(load(), data_cfg.image_size)
        else:
            tag = (f"{site.name}-{part}-s{data_cfg.image_size}-v{data_cfg.val_fraction}"
                   f"-t{data_cfg.test_fraction}-seed{data_cfg.seed}")
            data = cached_tensors(load, data_cfg.image_size, cache_dir, tag)
    except _EmptyPart:
        data = None
    _memo[key] = data
    while len(_memo) > _MEMO_SIZE:
        _memo.popitem(last=False)
    return data


def load_site_tensors(site: SiteSpec, data_cfg: DataConfig, cache_dir: str | None = None) -> tuple[TensorData, TensorData]:
    """(train, validation) tensors of a site at ``data_cfg.image_size``; the test split
    (``test_fraction``) is held back and not returned. A small site may get an empty
    validation split (length 0); an empty training split is an error."""
    split_memo: list = []

    def split():  # decode and split at most once, and only on a cache miss
        if not split_memo:
            cases = site_cases(site, data_cfg)
            split_memo.append(split_cases(cases, data_cfg.val_fraction, data_cfg.test_fraction, seed=data_cfg.seed))
        return split_memo[0]

    train = _tensors(site, data_cfg, cache_dir, "train", lambda: split().train)
    if train is None:
        raise ValueError(f"site {site.name}: no training cases after the split")
    val = _tensors(site, data_cfg, cache_dir, "val", lambda: split().val)
    return train, val if val is not None else train.subset([])


def load_test_tensors(site: SiteSpec, data_cfg: DataConfig, cache_dir: str | None = None) -> TensorData:
    """All cases of a held-out centre (central evaluation: nothing of it was trained on)."""
    data = _tensors(site, data_cfg, cache_dir, "all", lambda: site_cases(site, data_cfg))
    if data is None:
        raise ValueError(f"site {site.name}: no cases")
    return data


def clear_memo() -> None:
    """Forget in-process tensors (tests; or after a site's data changed on disk)."""
    _memo.clear()
