"""The on-disk snapshot: round trip, and every kind of damage refused with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from clustermap.model import Node, Service
from clustermap.sidecar.snapshot import SnapshotError, load, save

SERVICES = [Service("a", (Node("10.0.0.1", 80, 2, "drain", {"z": "1"}),), revision=3)]


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "s.snap"
    save(path, SERVICES, "epoch", 42)
    snap = load(path)
    assert (snap.epoch, snap.revision, list(snap.services)) == ("epoch", 42, SERVICES)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-3], "checksum"),
        (lambda b: b"XXXXXXXX" + b[8:], "not a ClusterMap snapshot"),
        (lambda b: b[:20] + b"\x00" + b[21:], "checksum"),
        (lambda b: b"", "not a ClusterMap snapshot"),
    ],
)
def test_damaged_snapshots_are_refused(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "s.snap"
    save(path, SERVICES, "e", 1)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SnapshotError, match=message):
        load(path)


def test_missing_snapshot(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError):
        load(tmp_path / "none")
