from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@pytest.fixture
def region_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh region path on tmpfs (/dev/shm), as in production."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="cm-test-", dir="/dev/shm"))
    yield d / "test.region"
    shutil.rmtree(d, ignore_errors=True)
