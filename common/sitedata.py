"""A site's data as model-ready tensors, loaded once per process and cached on disk.

Flower calls a site once per message (deployment: a fresh process each time), so decoding the
PNGs every round would dominate a round. Tensors are therefore cached on disk with
``cached_tensors`` (when a ``cache_dir`` is given) and memoised in-process (simulation keeps
its workers alive between messages). Both are keyed by the data's fingerprint (file list,
sizes, modification times, reader version; ``common.data.fingerprint``), taken with ``stat``
before either is consulted, so a withdrawn or changed image is never served again. The split
is ``split_cases``: deterministic, grouped by patient and duplicate image, stratified by label
— so the same images are in the validation split in every round and after a restart.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from common.config import DataConfig
from common.data import load_site
from common.data.fingerprint import files_fingerprint
from common.data.partial import hide_annotations
from common.data.splits import Split, split_cases
from common.data.synthetic import make_centre
from common.data.tensors import TensorData, cached_tensors, to_tensors
from common.federation import SiteSpec
from common.records import Case, DataError

log = logging.getLogger(__name__)

_MEMO_SIZE = 8
_memo: OrderedDict[tuple, TensorData | None] = OrderedDict()


def site_cases(site: SiteSpec, data_cfg: DataConfig) -> list[Case]:
    """All cases of a site: its folder read with ``load_site`` or its synthetic centre
    (seeded with ``data_cfg.seed``; the centre's name varies the draw)."""
    if site.synthetic_centre is not None:
        return make_centre(site.synthetic_centre, site.synthetic_n, size=data_cfg.image_size, seed=data_cfg.seed)
    return load_site(site.data_path, fmt=site.data_format, strict=site.strict, exclude=site.exclude)


class _EmptyPart(Exception):
    """A split part without cases (to_tensors refuses empty lists)."""


def user_tensor_cache() -> Path:
    """The per-user tensor cache: $FEDBUS_CACHE_DIR, else $XDG_CACHE_HOME/fedbus/tensors, else
    ~/.cache/fedbus/tensors; created private (0700), as its files hold patient images. Shared by
    runs safely because every key holds the data fingerprint."""
    env = os.environ.get("FEDBUS_CACHE_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fedbus" / "tensors"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def data_stamp(site: SiteSpec, cache_dir: str | None) -> str:
    """What the site's tensors depend on besides the data config: its settings (path, format,
    strictness, ...) and its files' fingerprint; "" for a synthetic centre (a pure function of
    its settings)."""
    if site.synthetic_centre is not None:
        return ""
    settings = hashlib.sha256(repr(site).encode()).hexdigest()[:8]
    return f"{settings}-{files_fingerprint(str(site.data_path), exclude=cache_dir)}"


def _tensors(site: SiteSpec, data_cfg: DataConfig, cache_dir: str | None, part: str,
             cases: Callable[[], list[Case]], stamp: str) -> TensorData | None:
    """Tensors of one part of a site (None when the part has no cases), memoised and cached
    under ``stamp`` (``data_stamp``: changes whenever the site's files do)."""
    key = (site, data_cfg, cache_dir, part, stamp)
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
            settings, _, files = stamp.partition("-")  # settings in the key: two data roots coexist
            tag = (f"{site.name}-{part}-s{data_cfg.image_size}-v{data_cfg.val_fraction}"
                   f"-t{data_cfg.test_fraction}-seed{data_cfg.seed}-{settings}"
                   + (_partial_tag(data_cfg) if part == "train" else ""))
            data = cached_tensors(load, data_cfg.image_size, cache_dir, tag, fingerprint=files)
    except _EmptyPart:
        data = None
    _memo[key] = data
    while len(_memo) > _MEMO_SIZE:
        _memo.popitem(last=False)
    return data


def _partial_tag(data_cfg: DataConfig) -> str:
    """Cache-key suffix of hidden annotations ("" when all are kept: older keys stay valid)."""
    if data_cfg.mask_fraction == 1.0 and data_cfg.label_fraction == 1.0:
        return ""
    return f"-m{data_cfg.mask_fraction}-l{data_cfg.label_fraction}"


def _split(site: SiteSpec, data_cfg: DataConfig) -> Split:
    """The site's one train / validation / test split (decoded now; callers cache the parts)."""
    return split_cases(site_cases(site, data_cfg), data_cfg.val_fraction, data_cfg.test_fraction,
                       seed=data_cfg.seed)


def load_site_tensors(site: SiteSpec, data_cfg: DataConfig, cache_dir: str | None = None) -> tuple[TensorData, TensorData]:
    """(train, validation) tensors of a site at ``data_cfg.image_size``; the test split
    (``test_fraction``) is held back and not returned. A small site may get an empty
    validation split (length 0); an empty training split is an error."""
    split_memo: list = []
    if not site.masks:
        data_cfg = dataclasses.replace(data_cfg, mask_fraction=0.0)

    def split():  # decode and split at most once, and only on a cache miss
        if not split_memo:
            split_memo.append(_split(site, data_cfg))
        return split_memo[0]

    stamp = data_stamp(site, cache_dir)
    train = _tensors(site, data_cfg, cache_dir, "train", lambda: hide_annotations(
        split().train, data_cfg.mask_fraction, data_cfg.label_fraction, data_cfg.seed), stamp)
    if train is None:
        raise ValueError(f"site {site.name}: no training cases after the split")
    val = _tensors(site, data_cfg, cache_dir, "val", lambda: split().val, stamp)
    return train, val if val is not None else train.subset([])


def load_own_test_tensors(site: SiteSpec, data_cfg: DataConfig, cache_dir: str | None = None) -> TensorData:
    """The site's own test split: the cases ``load_site_tensors`` holds back at
    ``data_cfg.test_fraction`` (> 0), from the same ``split_cases`` call, so never trained on."""
    if data_cfg.test_fraction <= 0:
        raise ValueError(f"site {site.name}: data.test_fraction is 0, the site holds back no test split")
    data = _tensors(site, data_cfg, cache_dir, "test", lambda: _split(site, data_cfg).test,
                    data_stamp(site, cache_dir))
    if data is None:
        raise ValueError(f"site {site.name}: its test split ({data_cfg.test_fraction:g}) is empty")
    return data


def load_test_tensors(site: SiteSpec, data_cfg: DataConfig, cache_dir: str | None = None) -> TensorData:
    """All cases of a held-out centre (central evaluation: nothing of it was trained on)."""
    data = _tensors(site, data_cfg, cache_dir, "all", lambda: site_cases(site, data_cfg),
                    data_stamp(site, cache_dir))
    if data is None:
        raise ValueError(f"site {site.name}: no cases")
    return data


def require_cases(sites: dict[str, SiteSpec] | list[SiteSpec], data_cfg: DataConfig,
                  cache_dir: str | None = None) -> None:
    """Refuse, before anything is written, a centre with no usable case (an empty folder, or
    every file invalid): ``DataError`` naming each such centre and its folder."""
    empty = []
    for site in (sites.values() if isinstance(sites, dict) else sites):
        try:
            load_test_tensors(site, data_cfg, cache_dir)
        except DataError:
            raise  # strict loading: the message already lists every bad file
        except ValueError:
            empty.append(f"{site.name} ({site.data_path or site.synthetic_centre})")
    if empty:
        raise DataError(f"no usable images at centre(s) {', '.join(empty)}: each folder is empty "
                        "or every file in it is invalid (its log lines above name them)")


def clear_memo() -> None:
    """Forget in-process tensors (tests; or after a site's data changed on disk)."""
    _memo.clear()
