from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clustermap.region import writer as writer_module

# The fault tests run churn.py as a child and import it as a module.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def table_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per Maglev table the region writer builds (the real build still runs)."""
    builds: list[int] = []
    real = writer_module.build_table

    def counting(given: object) -> bytes:
        builds.append(1)
        return real(given)  # type: ignore[arg-type]

    monkeypatch.setattr(writer_module, "build_table", counting)
    return builds
