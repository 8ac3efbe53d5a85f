"""Writers dying at every point of an update, and readers that never see the damage.

Real processes and real signals throughout: the writer runs in a child that SIGKILLs itself at
an exact checkpoint, or is killed from outside at random instants while it churns.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import churn
import pytest

from clustermap.region.layout import Meta
from clustermap.region.reader import RegionReader
from clustermap.region.writer import RegionWriter
from tests.support.procs import Child, wait_for

CHURN = str(Path(churn.__file__))

# Before the commit store the update must vanish; from it on, the next writer must finish it.
DISCARDED = ["locked", "records-written"]
COMPLETED = ["committed", "slots-half", "slots-stored", "generation-stored"]


def _state(path: Path) -> dict[str, int]:
    snap = RegionReader(path).snapshot()
    for svc in snap.services.values():
        churn.verify(svc)
    return {name: svc.revision for name, svc in snap.services.items()}


def _seed(path: Path) -> dict[str, int]:
    with RegionWriter(path) as w:
        w.replace_all(churn.base_map(), meta=Meta(revision=1))
    return _state(path)


def _after_update(before: dict[str, int]) -> dict[str, int]:
    ups, rms = churn.update()
    after = dict(before)
    for s in ups:
        after[s.name] = s.revision
    for n in rms:
        del after[n]
    return after


def test_sigkill_at_every_point_of_an_update_loses_and_mixes_nothing(
    region_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    points = DISCARDED + COMPLETED
    kills = 0
    for round_ in range(9):
        for point in points:
            before = _seed(region_path)
            child = Child.python(CHURN, str(region_path), "die-at", point)
            child.expect("ready")
            rc = child.wait()
            assert rc == -signal.SIGKILL, f"writer was meant to die at {point}, exited {rc}"
            kills += 1

            # Readers see a consistent map even before anyone repairs it.
            seen = _state(region_path)
            assert seen == before or (point in COMPLETED and set(seen) <= set(before) | {"svc-new"})

            with RegionWriter(region_path) as w:
                w.publish([churn.service("probe", 100 + round_)])
                assert w.recovered == 1, f"no repair after a death at {point}"
            state = _state(region_path)
            assert state.pop("probe") == 100 + round_
            expected = before if point in DISCARDED else _after_update(before)
            assert state == expected, f"after a death at {point}"
    assert kills >= 50
    # every repair came from the robust mutex reporting the dead owner, none from a lock timeout
    assert "reinitialising" not in caplog.text


@pytest.mark.parametrize("how", ["exit", "raise", "sigterm"])
def test_next_writer_gets_the_lock_when_the_holder_exits_normally(
    region_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """sys.exit / uncaught exception / SIGTERM unmap Python's mmaps; the lock page survives."""
    _seed(region_path)
    child = Child.python(CHURN, str(region_path), "exit-locked", how)
    child.expect("locked")
    rc = child.wait()
    assert rc != 0
    with RegionWriter(region_path, lock_timeout=5.0) as w:
        w.publish([churn.service("after", 5)])
        assert w.recovered == 1
    # repaired because the mutex reported its dead owner, not after waiting out the lock timeout
    assert "reinitialising" not in caplog.text
    state = _state(region_path)
    assert state["after"] == 5
    assert "held" not in state  # the holder's update never committed


def _reader(path: str, stop: Path, out: list[int], errors: list[str], least: int = 1000) -> None:
    """Body of a reader process: verify every read until the file ``stop`` exists (and at least
    ``least`` reads were made); report counts."""
    reader = RegionReader(path)
    reads = 0
    last_rev: dict[str, int] = {}
    while reads < least or not stop.exists():
        for i in range(6):
            name = f"svc-{i}"
            try:
                svc = reader.service(name)
            except Exception as exc:  # any error is a failure of the contract
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            churn.verify(svc)
            if svc.revision < last_rev.get(name, 0):
                errors.append(f"{name} went back from r{last_rev[name]} to r{svc.revision}")
                return
            last_rev[name] = svc.revision
            reads += 1
    out.append(reads)


READER_SCRIPT = """
import sys
from pathlib import Path
sys.path[:0] = [sys.argv[3]]
from test_region_faults import _reader
out, errors = [], []
print("reading", flush=True)
try:
    _reader(sys.argv[1], Path(sys.argv[2]), out, errors)
except AssertionError as exc:
    errors.append(str(exc))
print("errors", len(errors), errors[:3])
print("reads", out[0] if out else 0)
"""


def test_readers_never_see_torn_maps_while_the_writer_is_killed_and_restarted(
    region_path: Path,
) -> None:
    with RegionWriter(region_path) as w:
        w.replace_all([churn.service(f"svc-{i}", 1) for i in range(6)])
    here = str(Path(__file__).parent)
    stop = region_path.with_name("stop-readers")
    readers = [
        Child.python("-c", READER_SCRIPT, str(region_path), str(stop), here) for _ in range(4)
    ]
    kills = 0
    publishes = 0
    try:
        for r in readers:  # every reader reads before the first writer starts
            r.expect("reading")
        for kills in range(1, 7):  # a count of kills, not a time: the same work on any machine
            writer = Child.python(CHURN, str(region_path), "churn", "6")
            writer.expect("ready")
            for _ in range(20 + kills * 5):  # let it churn, then kill it mid-stride
                writer.expect("pub")
                publishes += 1
            writer.kill()
        stop.touch()
        results = [(r.expect("errors", timeout=60), r.expect("reads", timeout=30)) for r in readers]
    finally:
        for r in readers:
            r.close()
    for errors, _ in results:
        assert errors.startswith("errors 0 "), errors
    reads = [int(line.split()[1]) for _, line in results]
    assert kills == 6
    assert publishes > 100
    assert min(reads) >= 1000, reads


def test_killing_readers_does_not_slow_the_writer(
    region_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Readers hold no lock, so SIGKILLing them mid-read cannot block a publish."""
    with RegionWriter(region_path) as w:
        w.replace_all([churn.service(f"svc-{i}", 1) for i in range(6)])
        here = str(Path(__file__).parent)
        publishes: list[int] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def publish_loop() -> None:
            rev = 1
            try:
                while not stop.is_set():
                    rev += 1
                    w.publish([churn.service(f"svc-{rev % 6}", rev)])
                    publishes.append(rev)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=publish_loop)
        t.start()
        try:
            for _ in range(30):
                reader = Child.python("-c", READER_SCRIPT, str(region_path), "30", here)
                reader.kill()
            wait_for(lambda: len(publishes) > 100 or errors, what="publishes among dead readers")
        finally:
            stop.set()
            t.join()
    # Not a speed measurement (bench/ does those): a writer that a dead reader could block would
    # wait out its lock timeout, then reinitialise the mutex and repair (logged); none of that.
    assert not errors, errors[0]
    assert "reinitialising" not in caplog.text
    assert w.recovered == 0  # nobody else ever held the lock


def test_second_writer_is_refused_with_the_holders_pid(region_path: Path) -> None:
    from clustermap.errors import WriterBusy

    writer = Child.python(CHURN, str(region_path), "churn", "3")
    try:
        writer.expect("ready")
        with pytest.raises(WriterBusy, match=f"pid {writer.pid}"):
            RegionWriter(region_path)
        # A standby writer takes over as soon as the first one dies.
        killer = threading.Timer(0.2, writer.kill)
        killer.start()
        with RegionWriter(region_path, wait=10.0) as w:
            w.publish([churn.service("standby", 1)])
        killer.join()
    finally:
        writer.close()
    assert _state(region_path)["standby"] == 1
    assert os.path.exists(str(region_path) + ".lock")
