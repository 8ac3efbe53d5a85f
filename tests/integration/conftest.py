from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def region_dir() -> Iterator[Path]:
    """A fresh directory on tmpfs (/dev/shm), as in production."""
    d = Path(tempfile.mkdtemp(prefix="cm-test-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def region_path(region_dir: Path) -> Path:
    return region_dir / "test.region"
