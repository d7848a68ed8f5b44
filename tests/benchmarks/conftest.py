"""The benchmark mains are CLIs: they quiet the ``common.data`` logger and may add a root handler.
Undo both after each test, so later tests that check the data loaders' warnings still see them."""
import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_logging():
    data_log, root = logging.getLogger("common.data"), logging.getLogger()
    level, handlers = data_log.level, list(root.handlers)
    yield
    data_log.setLevel(level)
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)


@pytest.fixture()
def tiny_centres(tmp_path):
    """A data root with tiny BrEaST and BUSI fixtures in their published layouts."""
    from tests.common.test_data_readers import make_breast, make_busi

    root = tmp_path / "data"
    make_breast(root / "BrEaST")
    make_busi(root / "BUSI")
    return root
