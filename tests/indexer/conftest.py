import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # for _helpers

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _kernels_in_the_calling_thread(monkeypatch):
    """The compiled search loops load in the calling thread here (not in the background while
    the numpy paths answer), so a test knows which path answered; the background loading has
    its own test (test_index_hybrid.py::test_kernels_load_in_the_background)."""
    from cbir.indexer import hybrid

    monkeypatch.setattr(hybrid, "BACKGROUND", False)
