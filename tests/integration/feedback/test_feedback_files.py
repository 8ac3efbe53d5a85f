"""Broken feedback files never break a pick: the worker says why feedback is off and goes on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import clustermap
from clustermap.feedback import layout as FL
from clustermap.feedback.status import feedback_status
from clustermap.model import Node, Service
from clustermap.region.writer import RegionWriter
from clustermap.sidecar.feedback import FeedbackHub
from clustermap.sidecar.outlier import OutlierPolicy

NODES = tuple(Node("10.0.0.1", 80 + i) for i in range(3))


@pytest.fixture
def region(region_path: Path) -> Path:
    hub = FeedbackHub(
        str(region_path),
        rows=4,
        entries=8,
        capacity=64,
        mode=0o660,
        group=None,
        policy=OutlierPolicy(),
    )
    with RegionWriter(region_path) as w:
        w.publish([hub.decorate(Service("api", NODES))])
    hub.close()
    return region_path


def old_version(path: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, (2).to_bytes(4, "little"), 8)
    finally:
        os.close(fd)


def works_without_feedback(cm: clustermap.ClusterMap) -> None:
    ports = {n.port for n in NODES}
    with cm.call("api") as node:
        assert node.port in ports
    with pytest.raises(ZeroDivisionError), cm.call("api"):
        1 / 0  # noqa: B018 - the block's own exception still propagates
    assert cm.report("api", cm.pick("api"), ok=False) is False
    assert {cm.pick("api", strategy="least_request").port for _ in range(100)} == ports
    assert {cm.pick("api").port for _ in range(3)} == ports


def test_feedback_on_with_healthy_files(region: Path) -> None:
    cm = clustermap.open(region)
    assert cm.feedback_status().startswith("on: row")
    assert cm.report("api", cm.pick("api"), ok=True, latency=0.01) is True
    assert cm.report("api", NODES[0], ok=True) is True  # an equal node built by the caller
    assert cm.report("api", NODES[0]._replace(port=1), ok=True) is False  # not in the map
    assert cm.report("nope", NODES[0], ok=True) is False


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda p: os.unlink(str(p) + ".feedback"), "does not exist"),
        (lambda p: os.unlink(str(p) + ".load"), "does not exist"),
        (lambda p: Path(str(p) + ".feedback").write_bytes(b"garbage" * 100), "bad magic"),
        (lambda p: os.truncate(str(p) + ".feedback", 4096), "truncated"),
        (lambda p: os.chmod(str(p) + ".load", 0o666), "world-writable"),
        # A file of the release before: its workers added call() latencies, now the sidecar's.
        (lambda p: old_version(str(p) + ".feedback"), "format version 2 is not supported"),
    ],
    ids=[
        "rows-missing",
        "load-missing",
        "rows-garbage",
        "rows-truncated",
        "load-world-writable",
        "rows-version-2",
    ],
)
def test_broken_files_turn_feedback_off_and_picks_go_on(
    region: Path, damage: object, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    damage(region)  # type: ignore[operator]
    cm = clustermap.open(region)
    works_without_feedback(cm)
    assert why in cm.feedback_status(), cm.feedback_status()
    offs = [r for r in caplog.records if "feedback is off" in r.getMessage()]
    assert len(offs) == 1, offs  # one line per process, however many calls
    assert feedback_status(str(region))["state"] == "off"


def my_entry(cm: clustermap.ClusterMap, region: Path) -> tuple[int, int, int, int]:
    """(in flight, successes, failures, streak) of this process's only entry, from the file."""
    e = my_raw_entry(cm, region)
    return e.in_flight, e.ok, e.failed, e.streak


def my_raw_entry(cm: clustermap.ClusterMap, region: Path) -> FL.Entry:
    raw = Path(str(region) + ".feedback").read_bytes()
    head = FL.parse_feedback_header(raw[:64], len(raw))
    assert cm._feedback is not None
    off = FL.row_offset(head, cm._feedback.row)
    _, entries, _ = FL.parse_row(raw[off : off + head.row_size], head.entries, 64)
    (e,) = entries
    return e


def test_which_outcomes_count(region: Path) -> None:
    """The rules of docs/feedback.md, read back from this process's row (a key pins the node)."""
    cm = clustermap.open(region)
    with cm.call("api", key="k") as node:
        assert my_entry(cm, region) == (1, 0, 0, 0)  # in flight while the block runs
    assert my_entry(cm, region) == (0, 1, 0, 0)

    def block(exc: BaseException, **kw: tuple[type[BaseException], ...]) -> None:
        with cm.call("api", key="k", **kw) as picked:
            assert picked == node
            raise exc

    def run(exc: BaseException, **kw: tuple[type[BaseException], ...]) -> None:
        with pytest.raises(type(exc)):
            block(exc, **kw)

    run(ConnectionError())
    assert my_entry(cm, region) == (0, 1, 1, 1)  # an Exception escaping: a failure
    run(LookupError(), ok_exceptions=(LookupError,))
    assert my_entry(cm, region) == (0, 2, 1, 0)  # narrowed: a success, the streak broken
    run(ValueError(), failure_exceptions=(OSError,))
    assert my_entry(cm, region) == (0, 2, 1, 0)  # outside both: released, not judged
    run(KeyboardInterrupt())
    assert my_entry(cm, region) == (0, 2, 1, 0)  # a BaseException: not judged
    c = cm.call("api", key="k")
    with c:
        c.mark_failed()

    def marked_ok() -> None:
        c = cm.call("api", key="k")
        with c:
            c.mark_ok()
            raise RuntimeError

    with pytest.raises(RuntimeError):
        marked_ok()
    assert my_entry(cm, region) == (0, 3, 2, 0)


def test_call_reads_no_clock_and_report_adds_its_latency(region: Path) -> None:
    """The latency word holds only what report() gives: the sidecar measures call()'s calls
    from their time in flight (docs/feedback.md)."""
    cm = clustermap.open(region)
    with cm.call("api", key="k") as node:
        pass
    with pytest.raises(ConnectionResetError), cm.call("api", key="k"):
        raise ConnectionResetError
    e = my_raw_entry(cm, region)
    assert (e.in_flight, e.ok, e.failed, e.latency) == (0, 1, 1, 0.0)
    assert cm.report("api", node, ok=True, latency=0.25)
    assert cm.report("api", node, ok=False)
    e = my_raw_entry(cm, region)
    assert (e.in_flight, e.ok, e.failed, e.latency) == (0, 2, 2, 0.25)
