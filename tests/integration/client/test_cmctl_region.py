"""cmctl's region commands, run as the real console script against real region files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import clustermap
from clustermap.model import Node, Service
from clustermap.region.layout import Meta
from clustermap.region.writer import RegionWriter
from tests.support.procs import Child

CMCTL = str(Path(sys.executable).with_name("cmctl"))


def cmctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CMCTL, *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def region(region_path: Path) -> Path:
    with RegionWriter(region_path) as w:
        w.publish(
            [
                Service(
                    "user-svc",
                    (Node("10.0.0.1", 80, meta={"zone": "a"}), Node("10.0.0.2", 80, 2, "drain")),
                ),
                Service(
                    "cache",
                    tuple(Node(f"10.0.1.{i}", 11211) for i in range(5)),
                    strategy="consistent_hash",
                ),
            ],
            meta=Meta(revision=42, epoch="e", server="127.0.0.1:7700"),
            sync_ns=1,
        )
    return region_path


def test_dump_json_is_the_documented_shape(region: Path) -> None:
    out = cmctl("--region", str(region), "dump", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["revision"] == 42
    node = doc["services"]["user-svc"]["nodes"][1]
    assert node == {
        "host": "10.0.0.2",
        "port": 80,
        "address": "10.0.0.2:80",
        "weight": 2,
        "status": "drain",
        "meta": {},
        "ejected": False,
        "half_open": False,
    }
    only = json.loads(cmctl("--region", str(region), "dump", "cache", "--json").stdout)
    assert list(only["services"]) == ["cache"]


def test_status_json_reports_age_and_staleness(region: Path) -> None:
    doc = json.loads(cmctl("--region", str(region), "status", "--json").stdout)
    assert doc["revision"] == 42
    assert doc["stale"] is True  # last sync at t=1 ns: decades ago
    assert doc["age_seconds"] > 1e6
    assert doc["writer_alive"] is False
    assert {"revision", "age_seconds", "stale", "writer_pid", "protected"} <= set(doc)
    text = cmctl("--region", str(region), "status").stdout
    assert "stale        yes" in text


def test_pick_prints_what_a_worker_picks(region: Path) -> None:
    cm = clustermap.open(region)
    for key in ("u:1", "u:2", "user:42", "ünïcode"):
        out = cmctl("--region", str(region), "pick", "cache", "--key", key)
        assert out.stdout.strip() == cm.pick("cache", key).address
    out = cmctl("--region", str(region), "pick", "user-svc", "--count", "3")
    assert out.stdout.split() == ["10.0.0.1:80"] * 3  # the drained node is never picked


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("missing", ["status"], "no region"),
        ("garbage", ["dump"], "not a ClusterMap region"),
        ("truncated", ["status"], "truncated"),
        ("ok", ["dump", "nope"], "unknown service 'nope'"),
        ("ok", ["pick", "nope"], "unknown service 'nope'"),
    ],
)
def test_errors_are_one_line_without_traceback(
    region: Path, setup: str, args: list[str], message: str
) -> None:
    target = region
    if setup == "missing":
        target = region.with_name("missing.region")
    elif setup == "garbage":
        target = region.with_name("garbage.region")
        target.write_bytes(b"\x00garbage" * 1024)
    elif setup == "truncated":
        target = region.with_name("short.region")
        target.write_bytes(region.read_bytes()[:100])
    out = cmctl("--region", str(target), *args)
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_watch_prints_published_changes(region: Path) -> None:
    with Child([CMCTL, "--region", str(region), "watch", "--count", "1"]) as watch:
        watch.expect("revision 42")
        with RegionWriter(region) as w:
            w.publish([Service("user-svc", (Node("10.0.0.9", 81),))], meta=Meta(revision=43))
        change = watch.expect("generation")
        assert watch.wait() == 0
    assert "user-svc" in change
    assert "revision 43" in change


def test_status_sees_a_live_writer_from_another_pid_namespace(region: Path) -> None:
    """A worker container asking about the sidecar container: /proc/locks would hide the lock."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], check=False)
    if probe.returncode:
        pytest.skip("creating a PID namespace is not permitted here")
    argv = [
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        CMCTL,
        "--region",
        str(region),
        "status",
        "--json",
    ]
    with RegionWriter(region):  # a live writer, in this (the parent) namespace
        alive = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    gone = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    assert alive["writer_alive"] is True
    assert gone["writer_alive"] is False


def test_dump_text_escapes_control_and_bidi_characters(region_path: Path) -> None:
    hostile = "a\x1b]0;pwned\x07\x1b[2J\u202eb\nc\x00"
    with RegionWriter(region_path) as w:
        w.publish(
            [Service("svc", (Node("10.0.0.1", 80, meta={"note": hostile, "ok": "héllo ✓"}),))],
            meta=Meta(revision=1, epoch="e", server="127.0.0.1:7700"),
            sync_ns=1,
        )
    out = cmctl("--region", str(region_path), "dump")
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if "10.0.0.1:80" in x)
    assert line.isprintable()
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\u202eb\\nc\\x00" in line
    assert "ok=héllo ✓" in line
