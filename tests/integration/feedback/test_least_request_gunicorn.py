"""least_request in real gunicorn: 8 sync workers calling 3 real HTTP backends, one of them 10
times slower. Round-robin sends it a third of the requests; least_request, steering by the calls
in flight of every worker on the machine, must cut that share to at most a fifth."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.e2e.web import BIN, WebServer, burst
from tests.support.procs import Child, python_env
from tests.support.stack import ServerProc, SidecarProc, free_port

HERE = Path(__file__).resolve().parent
FAST, SLOW = 0.03, 0.3


class Backends:
    def __init__(self) -> None:
        self.ports = [free_port() for _ in range(3)]
        self.slow = f"127.0.0.1:{self.ports[0]}"
        specs = [f"{p}:{SLOW if k == 0 else FAST}" for k, p in enumerate(self.ports)]
        self.child = Child.python(str(HERE / "backends.py"), *specs)
        assert self.child.readline(15) == "ready"


class SlowApp(WebServer):
    def __init__(self, region: Path, workers: int = 8) -> None:
        self.port = free_port()
        self.workers = workers
        env = python_env(CLUSTERMAP_REGION=str(region))
        argv = [str(BIN / "gunicorn"), "--chdir", str(HERE), "-w", str(workers)]
        argv += ["-b", f"127.0.0.1:{self.port}", "--timeout", "30", "slow_app:app"]
        self.child = Child(argv, env=env)


@pytest.fixture
def setup(region_path: Path) -> Iterator[tuple[SlowApp, Backends]]:
    backends = Backends()
    server = ServerProc()
    sidecar = None
    web = None
    try:
        for port in backends.ports:
            server.register("backend", "127.0.0.1", port)
        sidecar = SidecarProc(region_path, [server.address], interval=0.1)
        sidecar.wait_synced()
        web = SlowApp(region_path)
        web.wait_ready(30)
        yield web, backends
    finally:
        for p in (web, sidecar, server):
            if p is not None:
                p.close()
        backends.child.close()


def slow_share(web: SlowApp, backends: Backends, strategy: str, requests: int) -> float:
    answers = burst(web.port, requests, concurrency=16, strategy=strategy)
    failed = [a for a in answers if not a.ok]
    assert not failed, failed[:3]
    counts = Counter(a.body["node"] for a in answers)
    return counts[backends.slow] / requests


@pytest.mark.skipif(sys.platform != "linux", reason="OFD locks")
def test_a_backend_ten_times_slower_gets_a_fifth_of_its_round_robin_share(
    setup: tuple[SlowApp, Backends],
) -> None:
    web, backends = setup
    slow_share(web, backends, "least_request", 48)  # every worker has claimed its row
    rr = slow_share(web, backends, "round_robin", 480)
    lr = slow_share(web, backends, "least_request", 480)
    print(f"slow backend's share: round_robin {rr:.3f}, least_request {lr:.3f}")  # for -s
    assert rr > 0.25, rr
    assert lr <= rr / 5, (lr, rr)
