"""Real web servers running the example app of ``client/``, and the HTTP traffic the e2e tests
send them. Each server runs in its own session (``tests.support.procs.Child``) on a free port;
states are awaited by condition, never by fixed sleeps."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tests.support.procs import ROOT, Child, python_env, wait_for
from tests.support.stack import free_port

CLIENT = ROOT / "client"
BIN = Path(sys.executable).parent
GUNICORN = str(BIN / "gunicorn")
UWSGI = str(BIN / "uwsgi")

#: What the ``server`` fixture registers. Backends are data: loopback ports nothing listens on.
USER_SVC = ("127.0.0.1:18001", "127.0.0.1:18002", "127.0.0.1:18003")
PAYMENT_SVC = {"127.0.0.1:19001": 3, "127.0.0.1:19002": 1}


def hostport(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


@dataclass
class Answer:
    """One request's outcome: when it started (monotonic) and the app's JSON, or the error."""

    started: float
    finished: float = 0.0
    status: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def pid(self) -> int:
        return int(self.body["pid"])

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(self.body["nodes"])


def get(port: int, timeout: float = 30.0, **params: str | int) -> Answer:
    """One GET on a fresh connection (so the kernel may hand it to any worker)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/?" + urlencode(params), headers={"Connection": "close"})
        resp = conn.getresponse()
        data = resp.read()
        try:
            body = json.loads(data)
        except ValueError:
            return Answer(started, time.monotonic(), resp.status, error=f"not JSON: {data!r}")
        error = "" if resp.status == 200 else str(body)
        return Answer(started, time.monotonic(), resp.status, body, error)
    except (OSError, http.client.HTTPException) as exc:
        return Answer(started, time.monotonic(), error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def burst(port: int, count: int, concurrency: int = 8, **params: str | int) -> list[Answer]:
    """``count`` requests, ``concurrency`` at a time: enough overlap to reach every worker."""
    with futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda _: get(port, **params), range(count)))


def children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (from /proc, so it sees every thread's children)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


class WebServer:
    """A prefork web server (the master in ``child``) serving the example app on ``port``."""

    workers: int
    child: Child
    port: int

    def worker_pids(self) -> set[int]:
        return children(self.child.pid)

    def alive(self) -> None:
        if self.child.proc.poll() is not None:
            raise AssertionError(f"{self.child.argv[0]} exited: {self.child.stderr()}")

    def wait_ready(self, timeout: float = 20.0) -> set[int]:
        """Until the app answers and exactly ``workers`` workers run; their pids."""

        def ready() -> set[int] | None:
            self.alive()
            pids = self.worker_pids()
            return pids if get(self.port, timeout=1).ok and len(pids) == self.workers else None

        return wait_for(
            ready, timeout, f"{self.child.argv[0]} to serve with {self.workers} workers"
        )

    def kill_worker(self, timeout: float = 15.0) -> tuple[int, set[int]]:
        """SIGKILL one worker; once the master runs ``workers`` again: the victim, the new pids."""
        before = self.worker_pids()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)

        def replaced() -> set[int]:
            self.alive()
            pids = self.worker_pids()
            return pids - before if victim not in pids and len(pids) == self.workers else set()

        return victim, wait_for(replaced, timeout, f"worker {victim} to be replaced")

    def reach_all(self, timeout: float = 15.0, **params: str | int) -> list[Answer]:
        """Bursts until every current worker has answered; every answer (all must be OK)."""
        answers: list[Answer] = []

        def all_answered() -> bool:
            self.alive()
            answers.extend(burst(self.port, 4 * self.workers, **params))
            return {a.pid for a in answers if a.ok} >= self.worker_pids()

        wait_for(all_answered, timeout, "every worker to answer")
        failed = [a for a in answers if not a.ok]
        assert not failed, failed[:3]
        return answers

    def close(self) -> None:
        self.child.close()


class Gunicorn(WebServer):
    """``gunicorn -c client/gunicorn.conf.py``: the file users copy, settings through its env."""

    def __init__(
        self,
        region: Path,
        worker_class: str = "sync",
        workers: int = 4,
        threads: int = 1,
        preload: bool = True,
    ) -> None:
        self.port = free_port()
        self.workers = workers
        env = python_env(
            CLUSTERMAP_REGION=str(region),
            BIND=f"127.0.0.1:{self.port}",
            GUNICORN_WORKER_CLASS=worker_class,
            WEB_CONCURRENCY=str(workers),
            GUNICORN_THREADS=str(threads),
            GUNICORN_PRELOAD=str(preload).lower(),
        )
        self.child = Child([GUNICORN, "-c", str(CLIENT / "gunicorn.conf.py")], env=env)


class Uwsgi(WebServer):
    """``uwsgi --ini client/uwsgi.ini`` whose ``attach-daemon2`` runs the sidecar from PATH."""

    def __init__(self, region: Path, *args: str, workers: int = 3, env: Mapping[str, str]) -> None:
        self.port = free_port()
        self.workers = workers
        full_env = python_env(
            CLUSTERMAP_REGION=str(region),
            PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            **env,
        )
        argv = [UWSGI, "--http-socket", f"127.0.0.1:{self.port}", "--ini"]
        argv += [str(CLIENT / "uwsgi.ini"), "--processes", str(workers), *args]
        self.child = Child(argv, env=full_env)
        self.daemons: set[int] = set()  # sidecar pids seen: uWSGI puts each in its own session

    def worker_pids(self) -> set[int]:
        return children(self.child.pid) - self.daemons - self._daemons()

    def _daemons(self) -> set[int]:
        found = set()
        for pid in children(self.child.pid):
            with contextlib.suppress(OSError):
                if os.getsid(pid) == pid:  # a worker shares the master's session; a daemon not
                    found.add(pid)
        self.daemons |= found
        return found

    def stop(self) -> int:
        """SIGTERM (``die-on-term``): uWSGI stops its daemons, then exits; the status."""
        os.kill(self.child.pid, signal.SIGTERM)
        return self.child.wait(30)

    def close(self) -> None:
        self._daemons()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child.pid, signal.SIGTERM)
        with contextlib.suppress(Exception):
            self.child.proc.wait(10)
        self.child.close()
        for pid in self.daemons:  # never leak a sidecar uWSGI failed to stop
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def first_seen(
    server: WebServer,
    since: float,
    condition: Callable[[Answer], bool],
    timeout: float = 30.0,
    **params: str | int,
) -> dict[int, float]:
    """Seconds from ``since`` until each worker's first answer meeting ``condition`` completed.

    Sends bursts until every worker has answered so; fails if a worker that met the condition
    answers without it in a later burst (a change must never be seen and then lost).
    """
    seen: dict[int, tuple[int, float]] = {}  # pid: (burst, seconds)
    rounds = 0

    def every_worker() -> bool:
        nonlocal rounds
        server.alive()
        rounds += 1
        for a in burst(server.port, 2 * server.workers, **params):
            assert a.ok, a
            if condition(a):
                seen.setdefault(a.pid, (rounds, a.finished - since))
            else:
                assert seen.get(a.pid, (rounds,))[0] >= rounds, f"{a.pid} lost it: {a.body}"
        return set(seen) >= server.worker_pids()

    wait_for(every_worker, timeout, "every worker to see the change")
    return {pid: seconds for pid, (_, seconds) in seen.items()}


def per_worker(answers: Iterable[Answer]) -> dict[int, Counter[str]]:
    """Every pick of each worker, counted per node."""
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    for a in answers:
        counts[a.pid].update(a.body["picks"])
    return counts


def assert_round_robin(answers: Iterable[Answer], nodes: set[str], sequential: bool = True) -> None:
    """Round-robin in every worker, with ``n`` (picks per request) a multiple of ``len(nodes)``.

    A worker's picks during the bursts are one unbroken stretch of its cycle, so each node gets
    exactly the same share. With one request at a time per worker (``sequential``), each
    answer's own picks also cycle through the nodes; threads may interleave their picks.
    """
    answers = list(answers)
    for pid, counts in per_worker(answers).items():
        assert set(counts) == nodes, (pid, counts)
        assert len(set(counts.values())) == 1, (pid, counts)
    if sequential:
        k = len(nodes)
        for a in answers:
            picks = a.body["picks"]
            assert set(picks) == nodes, a.body
            assert all(picks[i] == picks[i + k] for i in range(len(picks) - k)), a.body
