"""benchmarks/external_validation.py end to end on tiny fixtures in the published layouts: both
arms, every BrEaST image trained (--val-fraction 0 --select last), the near-field splice on, and
the paired p-value of the consistency arm computed by case id."""
import logging

import numpy as np
import pandas as pd
import pytest

from benchmarks.external_validation import main
from tests.common.test_data_readers import make_breast, make_busi


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() is a CLI: it quiets the ``common.data`` logger and may add a root handler. Undo both
    so later tests that check the data loaders' warnings still see them."""
    data_log, root = logging.getLogger("common.data"), logging.getLogger()
    level, handlers = data_log.level, list(root.handlers)
    yield
    data_log.setLevel(level)
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)


def test_all_images_last_epoch_both_arms(tmp_path):
    root = tmp_path / "data"
    make_breast(root / "BrEaST")
    make_busi(root / "BUSI")
    common = ["--data-root", str(root), "--epochs", "1", "--size", "16", "--arch", "small",
              "--batch-size", "2", "--val-fraction", "0", "--cache-dir", "", "--threads", "1",
              "--depth-splice", "0.5"]
    assert main(common + ["--out", str(tmp_path / "refused")]) == 2  # no validation images for --select val
    assert main(common + ["--select", "last", "--out", str(tmp_path / "run")]) == 0
    table = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert set(table.arm) == {"plain", "consistency"} and set(table.centre) == {"BUSI"}
    assert (table.epoch == 1).all()
    assert table[table.arm == "plain"].p_dice_vs_plain.isna().all()
    per_image = pd.read_csv(tmp_path / "run" / "per_image.csv")
    assert len(per_image) == 2 * 5  # BUSI fixture: 5 images, 3 with a lesion
    assert np.isfinite(per_image[per_image.has_lesion].dice).all()
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert "val_dice" not in history.columns and len(history) == 2
