"""Half-open trials (pure): the sidecar's state machine, the record, and the worker's one-shot."""

from __future__ import annotations

import threading
import time
from collections import Counter

import msgpack

from clustermap.balance.picker import make_picker
from clustermap.balance.trial import offer_trial
from clustermap.model import Ejection, Node, Overlay, Service, Trial
from clustermap.region import layout as L
from clustermap.sidecar.outlier import (
    TRIAL_GRACE_S,
    Observation,
    OutlierPolicy,
    Outliers,
)

SERVICE = {"api": list(range(10))}
POLICY = OutlierPolicy(base_ejection_time=30, half_open_tries=2, half_open_timeout=5)


def fail(n: int) -> Observation:
    return Observation(ok=0, failed=n, tail=n)


class Rows:
    """A chooser handing out rows 7, 8, 9... in turn, recording what it was asked."""

    def __init__(self) -> None:
        self.asked: list[frozenset[int]] = []

    def __call__(self, name: str, node_id: int, tried: frozenset[int]) -> tuple[int, int] | None:
        self.asked.append(tried)
        row = 7 + len(tried)
        return (row, 1000 + row)


def ejected_then_half_open(o: Outliers, rows: Rows) -> float:
    _, new = o.step(0.0, {1: fail(5)}, SERVICE)
    until = new[0][2].until
    assert until == 30.0
    # Before the sidecar's end: still plainly ejected. At it: half-open, granted to row 7.
    assert o.step(29.9, {}, SERVICE, {}, rows) == (set(), [])
    changed, new = o.step(until, {}, SERVICE, {}, rows)
    assert changed == {"api"}
    assert new == []
    e = o.ejected(1)
    assert e is not None
    assert e.half_open is not None
    assert (e.half_open.row, e.half_open.owner) == (7, 1007)
    assert e.half_open.deadline == until + 5
    assert e.until == until + 5 + TRIAL_GRACE_S  # the workers' end: after the sidecar's
    assert o.trial_events == [("api", 1, "started")]
    return until


def test_a_successful_trial_returns_the_node() -> None:
    o, rows = Outliers(POLICY), Rows()
    t = ejected_then_half_open(o, rows)
    # Calls seen from other rows are not evidence; no outcome yet: still half-open.
    assert o.step(t + 1, {1: Observation(ok=3)}, SERVICE, {}, rows) == (set(), [])
    changed, new = o.step(t + 2, {}, SERVICE, {1: True}, rows)
    assert changed == {"api"}
    assert new == []
    assert o.ejected(1) is None
    assert o.trial_events == [("api", 1, "success")]


def test_a_failed_trial_ejects_again_for_base_times_count() -> None:
    o, rows = Outliers(POLICY), Rows()
    t = ejected_then_half_open(o, rows)
    changed, new = o.step(t + 2, {}, SERVICE, {1: False}, rows)
    assert changed == {"api"}
    (name, node_id, e), *_ = new
    assert (name, node_id, e.kind, e.reason) == ("api", 1, "trial", "trial request failed")
    assert e.until == t + 2 + 60  # base x 2
    assert e.half_open is None
    assert o.trial_events == [("api", 1, "failure")]


def test_no_outcome_moves_the_trial_then_the_node_returns_after_the_tries() -> None:
    o, rows = Outliers(POLICY), Rows()
    t = ejected_then_half_open(o, rows)
    assert o.step(t + 4.9, {}, SERVICE, {}, rows)[0] == set()
    changed, _ = o.step(t + 5, {}, SERVICE, {}, rows)  # the deadline: another row
    assert changed == {"api"}
    e = o.ejected(1)
    assert e is not None
    assert e.half_open is not None
    assert (e.half_open.row, e.half_open.tried) == (8, frozenset({7, 8}))
    assert o.trial_events == [("api", 1, "moved")]
    # 2 tries: at the second deadline the node returns, as it would without half-open.
    changed, _ = o.step(t + 10, {}, SERVICE, {}, rows)
    assert changed == {"api"}
    assert o.ejected(1) is None
    assert o.trial_events == [("api", 1, "returned")]
    assert rows.asked == [frozenset(), frozenset({7})]


def test_a_trial_rows_owner_gone_moves_it_at_once() -> None:
    o, rows = Outliers(POLICY), Rows()
    t = ejected_then_half_open(o, rows)
    o.step(t + 0.1, {}, SERVICE, {1: None}, rows)
    e = o.ejected(1)
    assert e is not None
    assert e.half_open is not None
    assert e.half_open.row == 8


def test_no_row_or_half_open_off_returns_the_node_when_its_time_is_up() -> None:
    o = Outliers(POLICY)
    o.step(0.0, {1: fail(5)}, SERVICE)
    o.step(30.0, {}, SERVICE, {}, lambda *_: None)
    assert o.ejected(1) is None
    off = Outliers(OutlierPolicy(half_open_tries=0))
    _, new = off.step(0.0, {1: fail(5)}, SERVICE)
    assert off.published_until(new[0][2]) == new[0][2].until  # no grace without half-open
    off.step(30.0, {}, SERVICE, {}, Rows())
    assert off.ejected(1) is None
    on = Outliers(POLICY)
    _, new = on.step(0.0, {1: fail(5)}, SERVICE)
    assert on.published_until(new[0][2]) == 30.0 + TRIAL_GRACE_S


# -- the record --------------------------------------------------------------------------------

NODES = tuple(Node("10.0.0.1", 80 + i) for i in range(4))
OWNER = (5 << 32) | 4242


def half_open_service(owner: int = OWNER, seconds: float = 30.0) -> Service:
    until = time.time_ns() + int(seconds * 1e9)
    return Service(
        "api",
        NODES,
        overlay=Overlay(
            tuple(range(10, 14)),
            (Ejection(1, until, "5 consecutive failures"),),
            (Trial(1, owner, until),),
        ),
    )


def test_trials_round_trip_and_older_readers_see_the_node_ejected() -> None:
    s = half_open_service()
    raw = L.encode_service(s)
    back = L.decode_service(raw)
    assert back.overlay == s.overlay
    assert back.slow_start is None  # the neutral 8th written for the 9th
    # A reader that knows seven or eight elements decodes it, with the node still ejected.
    doc = msgpack.unpackb(raw)
    assert len(doc) == 9
    for known in (7, 8):
        old = L.decode_service(msgpack.packb(doc[:known]))
        assert old.overlay is not None
        assert old.overlay.ejected == s.overlay.ejected  # type: ignore[union-attr]
        assert old.overlay.trials == ()
    assert L.decode_service(L.encode_service(Service("api", NODES))).overlay is None


# -- the worker's one-shot ----------------------------------------------------------------------


def test_the_granted_worker_serves_the_node_to_one_key_less_pick_then_never() -> None:
    s = half_open_service()
    p = make_picker(s)
    assert offer_trial(s, p, OWNER, time.time_ns())
    picks = [p.pick().port for _ in range(200)]
    assert picks[0] == 81
    assert 81 not in picks[1:]
    # Served: a picker rebuilt for the same grant (another change of the service) does not
    # serve it again.
    again = make_picker(s)
    assert not offer_trial(s, again, OWNER, time.time_ns())


def test_other_workers_and_keyed_picks_never_get_the_trial() -> None:
    s = half_open_service(owner=OWNER + 1)
    other = make_picker(s)
    assert not offer_trial(s, other, OWNER, time.time_ns())  # not our row
    assert not offer_trial(s, other, 0, time.time_ns())  # no row at all
    assert 81 not in {other.pick().port for _ in range(200)}
    mine = make_picker(s)
    assert offer_trial(s, mine, OWNER + 1, time.time_ns())
    assert all(mine.pick(key=f"k{i}").port != 81 for i in range(300))  # keyed: never
    assert mine.pick().port == 81  # still armed for the next key-less pick


def test_every_key_less_strategy_and_the_clients_iterators_can_serve_it() -> None:
    for strategy in ("round_robin", "random", "weighted", "weighted_random", "least_request"):
        s = half_open_service(owner=OWNER + 100 + len(strategy))
        p = make_picker(s)
        assert offer_trial(s, p, s.overlay.trials[0].owner, time.time_ns())  # type: ignore[union-attr]
        # the client's inlined path: picker.iters[strategy], else picker.least_request()
        it = p.iters.get(strategy)
        node = next(it) if it is not None else p.least_request()
        assert node.port == 81, strategy
        assert "least_request" not in p.iters  # put back: the plain iterators again
        assert 81 not in {p.pick(strategy=strategy).port for _ in range(100)}, strategy
    s = half_open_service(owner=OWNER + 7)
    p = make_picker(s)
    offer_trial(s, p, OWNER + 7, time.time_ns())
    assert next(p.default_it).port == 81


def test_threads_racing_for_the_trial_serve_it_exactly_once() -> None:
    s = half_open_service(owner=OWNER + 9)
    p = make_picker(s)
    assert offer_trial(s, p, OWNER + 9, time.time_ns())
    counts: Counter[int] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        got = Counter(next(p.default_it).port for _ in range(500))
        with lock:
            counts.update(got)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts[81] == 1


def test_a_fork_drops_the_armed_trial_and_an_ended_one_is_not_offered() -> None:
    s = half_open_service(owner=OWNER + 11)
    p = make_picker(s)
    assert offer_trial(s, p, OWNER + 11, time.time_ns())
    p.after_fork()  # as in a forked child: the parent's row, not the child's
    assert 81 not in {p.pick().port for _ in range(200)}
    late = half_open_service(owner=OWNER + 12, seconds=0.0)
    assert not offer_trial(late, make_picker(late), OWNER + 12, time.time_ns() + 1)
