"""The sidecar's settings: sources, validation, and the generated reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from clustermap.model import parse_address
from clustermap.sidecar.config import SidecarSettings

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-config-docs"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def test_environment_lists_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTERMAP_SERVER", "10.0.0.1:7700, [::1]:7701")
    s = SidecarSettings()
    assert s.server == ["10.0.0.1:7700", "[::1]:7701"]
    assert parse_address("[::1]:7701") == ("::1", 7701)
    monkeypatch.setenv("CLUSTERMAP_SERVER", "nope")
    with pytest.raises(ValidationError, match="not HOST:PORT"):
        SidecarSettings()


def test_unknown_keys_in_the_file_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "s.toml"
    config.write_text("intervall = 1\n")  # a typo must not be ignored silently
    monkeypatch.setenv("CLUSTERMAP_CONFIG", str(config))
    with pytest.raises(ValidationError, match="intervall"):
        SidecarSettings()
