"""gunicorn with ``client/gunicorn.conf.py`` and ``client/example_app.py``, against a real
cm-server and cm-sidecar: every worker class, with and without ``preload_app``.

Each variant proves, through HTTP answers only (what the app's users see): picks follow the
strategy in every worker; a node registered or drained on the server is in (or out of) every
worker's answers within a second; a SIGKILLed worker is replaced and its successor picks right.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

import clustermap
from tests.integration.e2e.web import (
    PAYMENT_SVC,
    USER_SVC,
    Gunicorn,
    assert_round_robin,
    first_seen,
    per_worker,
)
from tests.support.stack import ServerProc, SidecarProc

NEW = "127.0.0.1:18004"
DRAIN = 3  # NODE_STATUS_DRAIN

VARIANTS = [
    pytest.param("sync", 4, 1, id="sync"),
    pytest.param("gthread", 2, 4, id="gthread"),
    pytest.param("gevent", 2, 1, id="gevent"),
]


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
@pytest.mark.parametrize(("worker_class", "workers", "threads"), VARIANTS)
def test_gunicorn_workers_pick_follow_changes_and_survive_sigkill(
    server: ServerProc,
    sidecar: SidecarProc,
    region_path: Path,
    worker_class: str,
    workers: int,
    threads: int,
    preload: bool,
) -> None:
    web = Gunicorn(region_path, worker_class, workers, threads, preload)
    sequential = threads == 1  # gthread: concurrent requests of one worker share its cycle
    try:
        pids = web.wait_ready()

        # Round-robin in every worker: its picks (with one request at a time, each answer's 6
        # picks) cycle through the 3 nodes.
        answers = web.reach_all(n=6)
        assert {a.pid for a in answers} == pids
        # preload_app really imported the app (and clustermap) in the master, before the fork.
        loaded_by = {a.body["loaded_by"] for a in answers}
        assert loaded_by == ({web.child.pid} if preload else pids), loaded_by
        assert_round_robin(answers, set(USER_SVC), sequential)
        # Spread across workers: one pick per request, each worker's share cycles the nodes, so
        # no node gets more than one extra pick per worker.
        singles = web.reach_all()
        spread = Counter(a.body["node"] for a in singles)
        assert set(spread) == set(USER_SVC)
        assert max(spread.values()) - min(spread.values()) <= workers, spread

        # Weighted 3:1 (smooth WRR, period 4): 8 picks per request, so each worker's picks are
        # exactly 3:1; one request at a time, each answer's 8 picks too.
        answers = web.reach_all(service="payment-svc", strategy="weighted", n=8)
        for pid, counts in per_worker(answers).items():
            requests = sum(a.pid == pid for a in answers)
            assert counts == {k: 2 * w * requests for k, w in PAYMENT_SVC.items()}, (pid, counts)
        for a in answers if sequential else ():
            assert Counter(a.body["picks"]) == {k: 2 * w for k, w in PAYMENT_SVC.items()}, a.body

        # Consistent hashing: a key maps to the same node in every worker, and in this process.
        local = clustermap.open(region_path)
        for key in ("u:1", "u:2", "u:42"):
            nodes = {a.body["node"] for a in web.reach_all(key=key)}
            assert nodes == {local.pick("user-svc", key).address}, (key, nodes)

        # A node registered on the server: in every worker's answers, and never lost again
        # (how fast is measured in bench/, not here).
        server.register("user-svc", "127.0.0.1", 18004)
        first_seen(web, time.monotonic(), lambda a: NEW in a.nodes, n=8)
        # ... and drained: out of every worker's nodes and picks.
        server.set("user-svc", "127.0.0.1", 18001, status=DRAIN)
        first_seen(
            web,
            time.monotonic(),
            lambda a: USER_SVC[0] not in {*a.nodes, *a.body["picks"]},
            n=8,
        )
        current = {*USER_SVC[1:], NEW}
        assert_round_robin(web.reach_all(n=6), current, sequential)

        # A worker SIGKILLed: the master replaces it, and the new worker picks from the
        # current map, by the strategy.
        victim, fresh = web.kill_worker()
        answers = web.reach_all(n=6)
        assert fresh <= {a.pid for a in answers}
        assert victim not in {a.pid for a in answers}
        assert_round_robin(answers, current, sequential)
        assert all(a.nodes == current for a in answers)
        web.alive()
    finally:
        web.close()
