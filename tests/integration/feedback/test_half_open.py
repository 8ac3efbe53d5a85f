"""Half-open trials end to end: a real cm-server, cm-sidecar, HTTP backends that count their
requests, and several worker processes (``agent.py``) calling them through ``call()``.

When an ejection's time is up the sidecar grants one worker row the node's one trial request;
the backend's own count proves that exactly one request went to it machine-wide.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.feedback.test_feedback import Agent, cmctl, cmctl_text
from tests.support.procs import Child, wait_for
from tests.support.stack import ServerProc, SidecarProc, free_port

HERE = Path(__file__).parent


@dataclass
class Stack:
    region: Path
    server: ServerProc
    sidecar: SidecarProc
    backend: Child
    ports: list[int]
    agents: list[Agent]
    strategy: str = ""

    @property
    def bad(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    def control(self, what: str) -> str:
        url = f"http://{self.bad}/control/{what}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body: bytes = r.read()
        return body.decode()

    def hits(self) -> int:
        """Requests the failing node's backend has received (its own count)."""
        return int(self.control("count"))

    def ejected(self) -> list[dict[str, Any]]:
        found = cmctl(self.region, "status")["ejected"]
        assert isinstance(found, list)
        return found

    def calls(self, n: int = 6) -> None:
        """Every worker makes ``n`` real calls, in turn."""
        for a in self.agents:
            a("http", "api", n, self.strategy)


def make_stack(region: Path, workers: int, **env: str) -> Stack:
    ports = [free_port() for _ in range(3)]
    backend = Child.python(str(HERE / "counting_backend.py"), *map(str, ports))
    assert backend.readline(15) == "ready"
    server = ServerProc()
    for port in ports:
        server.register("api", "127.0.0.1", port)
    settings = {"CLUSTERMAP_OUTLIER_BASE_EJECTION_TIME": "2", **env}
    sidecar = SidecarProc(region, [server.address], interval=0.1, env=settings)
    sidecar.wait_synced()
    wait_for(lambda: Path(str(region) + ".load").exists(), 10, "the load file")
    agents = [Agent(region) for _ in range(workers)]
    return Stack(region, server, sidecar, backend, ports, agents)


@pytest.fixture
def stack(region_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    s = make_stack(region_path, 3, **getattr(request, "param", {}))
    try:
        yield s
    finally:
        for a in s.agents:
            a.close()
        s.sidecar.close()
        s.server.close()
        s.backend.close()


def eject(s: Stack) -> int:
    """Make the first node fail until it is ejected; its hit count once no worker sends it
    anything more (each worker has made calls since the ejection was published)."""
    s.control("fail")

    def ejected() -> bool:
        s.calls()
        return [e["address"] for e in s.ejected()] == [s.bad]

    wait_for(ejected, 30, "the failing node to be ejected")
    return s.hits()


def half_open(s: Stack) -> dict[str, Any]:
    """Await the failing node's half-open state (no worker calls meanwhile); its status entry."""

    def found() -> dict[str, Any] | None:
        for e in s.ejected():
            if e["address"] == s.bad and e.get("state") == "half-open":
                return e
        return None

    return wait_for(found, 30, "the node to go half-open")


@pytest.mark.parametrize("strategy", ["", "least_request"])
def test_one_trial_machine_wide_failure_ejects_longer_success_returns_it_to_all(
    stack: Stack, strategy: str
) -> None:
    s = stack
    s.strategy = strategy  # the service's default (round-robin), or least_request per call
    before = eject(s)

    # Every worker keeps calling while the node is ejected, then half-open: the trial fails.
    def failed_trial() -> dict[str, Any] | None:
        s.calls()
        found = s.ejected()
        return found[0] if found and found[0]["reason"] == "trial request failed" else None

    again = wait_for(failed_trial, 30, "a failed trial to eject the node again")
    s.calls()  # every worker, once more, after the new verdict
    assert s.hits() - before == 1, "exactly one request machine-wide while half-open"
    # base x 2 now: the first ejection lasted base x 1 = 2 s (the sidecar's log says for how
    # long it ejects; the status's seconds_left shrink with the time a loaded machine takes)
    assert again["state"] == "ejected"
    assert "trial" not in again
    log = s.sidecar.child.stderr()
    assert re.search(rf"ejected api {s.bad} for 2 s: \d+ consecutive failures", log), log
    assert f"ejected api {s.bad} for 4 s: trial request failed" in log, log
    assert "trial started" in log

    # The node recovers; the next trial succeeds and it returns for every worker.
    s.control("ok")
    ejected_again = s.hits()

    def back_for_everyone() -> bool:
        s.calls()
        if s.ejected():
            return False
        return all(s.bad in json_picks(a) for a in s.agents)

    wait_for(back_for_everyone, 30, "the node to return to every worker")
    assert s.hits() > ejected_again


def json_picks(a: Agent) -> dict[str, int]:
    return a.picks(n=30)


@pytest.mark.parametrize("stack", [{"CLUSTERMAP_OUTLIER_HALF_OPEN_TIMEOUT": "60"}], indirect=True)
def test_a_sigkilled_trial_worker_hands_the_trial_to_another_and_cmctl_shows_it(
    stack: Stack,
) -> None:
    s = stack
    before = eject(s)
    trial = half_open(s)["trial"]
    pids = {a.pid: a for a in s.agents}
    assert trial["pid"] in pids, (trial, pids)
    assert 0 < trial["seconds_left"] <= 61

    # cmctl shows it, in text and JSON
    text = cmctl_text(s.region, "status")
    assert f"trial by pid {trial['pid']}" in text, text
    dump = cmctl(s.region, "dump")
    nodes = {n["address"]: n for n in dump["services"]["api"]["nodes"]}  # type: ignore[index]
    assert nodes[s.bad]["half_open"] is True
    assert nodes[s.bad]["trial"]["pid"] == trial["pid"]
    assert nodes[s.bad]["ejected"] is True
    dump_text = cmctl_text(s.region, "dump")
    assert f"HALF-OPEN (trial: pid {trial['pid']})" in dump_text, dump_text

    holder = pids[trial["pid"]]
    holder.close()  # SIGKILL, before it made its trial request
    s.agents.remove(holder)

    def moved() -> dict[str, Any] | None:
        e = s.ejected()
        if not e:
            return {"returned": True}
        t = e[0].get("trial")
        return t if t is not None and t["pid"] != trial["pid"] else None

    now = wait_for(moved, 30, "the trial to move to another worker (or the node to return)")
    if "pid" in now:
        assert now["pid"] in {a.pid for a in s.agents}
    assert s.hits() == before  # nobody sent it anything meanwhile


@pytest.mark.parametrize("stack", [{"CLUSTERMAP_OUTLIER_HALF_OPEN_TIMEOUT": "2"}], indirect=True)
def test_with_the_sidecar_sigkilled_while_half_open_the_node_returns_on_the_workers_clock(
    stack: Stack,
) -> None:
    s = stack
    before = eject(s)
    half_open(s)
    s.control("ok")
    s.sidecar.kill()  # nobody will judge the trial or republish the service now
    wait_for(
        lambda: all(s.bad in json_picks(a) for a in s.agents),
        30,
        "the node to return on the workers' own clock",
    )
    assert s.ejected() == []
    assert s.hits() >= before  # the picks above went nowhere; nothing else to count
