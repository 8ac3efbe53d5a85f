from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.http_clients.harness import Stack


@pytest.fixture
def stack(region_path: Path) -> Iterator[Stack]:
    s = Stack(region_path)
    try:
        yield s
    finally:
        s.close()
