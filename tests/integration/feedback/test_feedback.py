"""Caller feedback end to end: a real cm-server, a real cm-sidecar, worker processes.

Workers are separate processes (``agent.py``), so every count crosses the shared files exactly as
in production; states are awaited by condition (the region, the load file, picks), never slept.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import clustermap
from clustermap.feedback import layout as FL
from tests.support.procs import python_env, wait_for
from tests.support.stack import CMCTL, ServerProc, SidecarProc, free_port

AGENT = str(Path(__file__).with_name("agent.py"))
NODES = {"a": 18101, "b": 18102, "c": 18103}


def address(name: str) -> str:
    return f"127.0.0.1:{NODES[name]}"


class Agent:
    """A worker process holding a ClusterMap handle, driven over stdin/stdout."""

    def __init__(self, region: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, AGENT, str(region)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=python_env(),
            text=True,
            start_new_session=True,
        )
        ready = self._line()
        assert ready.startswith("ready"), ready
        self.pid = int(ready.split()[1])

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"agent exited with {self.proc.wait()}"
        return line.strip()

    def __call__(self, *command: object) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(map(str, command)) + "\n")
        self.proc.stdin.flush()
        return self._line()

    def picks(self, strategy: str = "round_robin", n: int = 300) -> dict[str, int]:
        out: dict[str, int] = json.loads(self("picks", "api", strategy, n))
        return out

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


@pytest.fixture
def agents(region_path: Path) -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for a in made:
        a.close()


def stack(region: Path, **env: str) -> tuple[ServerProc, SidecarProc]:
    server = ServerProc()
    for name, port in NODES.items():
        server.register("api", "127.0.0.1", port, name=name)
    old = dict(os.environ)
    os.environ.update(env)  # SidecarProc passes the environment on
    try:
        sidecar = SidecarProc(region, [server.address], interval=0.1)
    finally:
        os.environ.clear()
        os.environ.update(old)
    sidecar.wait_synced()
    return server, sidecar


@pytest.fixture
def running(region_path: Path, request: pytest.FixtureRequest) -> Iterator[SidecarProc]:
    env = getattr(request, "param", {})
    server, sidecar = stack(region_path, **env)
    try:
        if env.get("CLUSTERMAP_FEEDBACK") != "false":
            wait_for(lambda: Path(str(region_path) + ".load").exists(), 10, "the load file")
        yield sidecar
    finally:
        sidecar.close()
        server.close()


def sweeps(region: Path) -> int:
    """The sidecar's last sweep (wall ns), from the load file."""
    with open(str(region) + ".load", "rb") as f:
        return int.from_bytes(f.read(64)[FL.SWEEP_OFF : FL.SWEEP_OFF + 8], "little")


def after_two_sweeps(region: Path) -> None:
    first = sweeps(region)
    wait_for(lambda: sweeps(region) > first, 10, "a sweep")
    second = sweeps(region)
    wait_for(lambda: sweeps(region) > second, 10, "another sweep")


def cmctl_text(region: Path, *args: str) -> str:
    """What ``cmctl --region REGION ARGS...`` prints (it must succeed)."""
    return subprocess.run(
        [CMCTL, "--region", str(region), *args],
        capture_output=True,
        text=True,
        check=True,
        env=python_env(),
    ).stdout


def cmctl(region: Path, *args: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(cmctl_text(region, *args, "--json"))
    return result


def test_failures_from_two_workers_add_up_and_eject_for_a_third(
    running: SidecarProc, region_path: Path, agents: list[Agent]
) -> None:
    one, two, third = (Agent(region_path) for _ in range(3))
    agents += [one, two, third]
    assert set(third.picks()) == {address(n) for n in NODES}

    # 4 failures (3 + 1) are not enough: after two full sweeps the node is still picked.
    assert one("report", "api", address("a"), "fail", 3) == "ok 3"
    assert two("report", "api", address("a"), "fail", 1) == "ok 1"
    after_two_sweeps(region_path)
    assert address("a") in third.picks()

    # A success in between resets the streak: 4 + success + 1 = still in.
    assert two("report", "api", address("a"), "ok", 1) == "ok 1"
    after_two_sweeps(region_path)
    assert one("report", "api", address("a"), "fail", 1) == "ok 1"
    after_two_sweeps(region_path)
    assert address("a") in third.picks()

    # 3 in one worker, 2 in another, none in the third: out for the third.
    assert one("report", "api", address("a"), "fail", 2) == "ok 2"
    assert two("report", "api", address("a"), "fail", 2) == "ok 2"
    wait_for(lambda: address("a") not in third.picks(), 10, "the node to be ejected")
    assert set(third.picks(n=100)) == {address("b"), address("c")}
    assert set(third.picks("random", 100)) == {address("b"), address("c")}
    assert json.loads(third("nodes", "api")) == [address("b"), address("c")]

    status = cmctl(region_path, "status")
    ejected = status["ejected"]
    assert isinstance(ejected, list)
    assert len(ejected) == 1, status
    assert ejected[0]["service"] == "api"
    assert ejected[0]["address"] == address("a")
    assert "consecutive" in ejected[0]["reason"]
    dump = cmctl(region_path, "dump")
    nodes = dump["services"]["api"]["nodes"]  # type: ignore[index]
    assert {n["address"]: n["ejected"] for n in nodes} == {
        address("a"): True,
        address("b"): False,
        address("c"): False,
    }
    # The verdict is the sidecar's, not the server's: the revision did not move.
    assert status["revision"] == running.meta().revision  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "running",
    # no half-open trial: this is the plain return (test_half_open.py has the trials)
    [{"CLUSTERMAP_OUTLIER_BASE_EJECTION_TIME": "1", "CLUSTERMAP_OUTLIER_HALF_OPEN_TRIES": "0"}],
    indirect=True,
)
def test_exceptions_in_call_eject_and_the_node_comes_back(
    running: SidecarProc, region_path: Path, agents: list[Agent]
) -> None:
    worker, other = Agent(region_path), Agent(region_path)
    agents += [worker, other]
    assert worker("callfail", "api", "b", 5) == "ok 5"
    wait_for(lambda: address("b") not in other.picks(), 10, "the node to be ejected")
    # Ejected for 1 s (base × 1): then back in every worker, on its own.
    wait_for(lambda: address("b") in other.picks(), 10, "the node to return")
    wait_for(lambda: address("b") in worker.picks(), 10, "the node to return")


def test_least_request_steers_away_from_calls_held_by_another_worker(
    running: SidecarProc, region_path: Path, agents: list[Agent]
) -> None:
    holder, picker = Agent(region_path), Agent(region_path)
    agents += [holder, picker]
    assert holder("hold", "api", "a", 4) == "held 4"

    # P2C over 3 nodes, two distinct draws: the loaded one loses every draw.
    def avoided() -> bool:
        picks = picker.picks("least_request", 900)
        return picks.get(address("a"), 0) == 0

    wait_for(avoided, 10, "least_request to avoid the loaded node")

    # The holder dies mid-call: its calls stop counting.
    holder.kill()

    def even() -> bool:
        picks = picker.picks("least_request", 900)
        return picks.get(address("a"), 0) > 900 * 0.25

    wait_for(even, 10, "the dead worker's calls to stop counting")


@pytest.mark.parametrize("running", [{"CLUSTERMAP_FEEDBACK_ROWS": "3"}], indirect=True)
def test_rows_are_reclaimed_in_a_fork_storm_and_extra_workers_degrade(
    running: SidecarProc, region_path: Path, agents: list[Agent]
) -> None:
    parent = Agent(region_path)
    agents.append(parent)
    assert parent("status").startswith("on: row"), parent("status")
    # 40 short-lived children, 3 rows (one the parent's): each dead child's row is reused.
    statuses = json.loads(parent("forks", 40))
    assert len(statuses) == 40
    assert all(s.startswith("on: row") for s in statuses), statuses

    # More live workers than rows: the extra one says why, and still picks.
    more = [Agent(region_path), Agent(region_path)]
    agents += more
    assert all(a("status").startswith("on: row") for a in more)
    extra = Agent(region_path)
    agents.append(extra)
    assert "are taken" in extra("status"), extra("status")
    assert set(extra.picks("least_request")) <= {address(n) for n in NODES}
    assert set(extra.picks()) == {address(n) for n in NODES}
    assert extra("callfail", "api", "a", 1) == "ok 1"  # a call still runs, uncounted

    # A dead worker frees its row for the next one.
    more[0].kill()
    wait_for(lambda: extra("status").startswith("on: row"), 20, "a freed row")


@pytest.mark.parametrize("running", [{"CLUSTERMAP_FEEDBACK": "false"}], indirect=True)
def test_without_feedback_picks_work_and_everyone_says_it_is_off(
    running: SidecarProc, region_path: Path, agents: list[Agent]
) -> None:
    worker = Agent(region_path)
    agents.append(worker)
    assert "does not exist" in worker("status")
    assert worker("report", "api", address("a"), "fail", 10) == "ok 0"
    assert worker("callfail", "api", "a", 10) == "ok 10"
    assert set(worker.picks("least_request")) == {address(n) for n in NODES}
    assert set(worker.picks()) == {address(n) for n in NODES}
    status = cmctl(region_path, "status")
    assert status["feedback"]["state"] == "off", status  # type: ignore[index]
    assert status["ejected"] == []
    # In this process too: report() returns False, call() never raises because of feedback.
    cm = clustermap.open(region_path)
    node = cm.pick("api")
    assert cm.report("api", node, ok=False) is False
    with cm.call("api") as picked:
        assert picked.port in NODES.values()


@pytest.mark.parametrize("running", [{"CLUSTERMAP_OUTLIER_BASE_EJECTION_TIME": "2"}], indirect=True)
def test_ejections_end_on_the_workers_clock_when_the_sidecar_is_gone(
    running: SidecarProc, region_path: Path, agents: list[Agent]
) -> None:
    worker = Agent(region_path)
    agents.append(worker)
    assert worker("report", "api", address("c"), "fail", 5) == "ok 5"
    wait_for(lambda: address("c") not in worker.picks(), 10, "the node to be ejected")
    running.kill()  # nobody will republish the service now
    wait_for(lambda: address("c") in worker.picks(), 10, "the ejection to expire")
    assert cmctl(region_path, "status")["ejected"] == []


def test_success_rate_ejects_a_node_failing_half_its_calls_never_five_in_a_row(
    region_path: Path, agents: list[Agent]
) -> None:
    """Envoy's success-rate detector over the machine's counts: 5 nodes with enough calls in
    an interval, one at ~50 % success among 100 % peers, consecutive failures off."""
    server = ServerProc()
    ports = [free_port() for _ in range(5)]
    for port in ports:
        server.register("api", "127.0.0.1", port)
    env = {
        "CLUSTERMAP_OUTLIER_CONSECUTIVE_FAILURES": "0",
        "CLUSTERMAP_OUTLIER_INTERVAL": "1",
        "CLUSTERMAP_OUTLIER_SUCCESS_RATE_REQUEST_VOLUME": "20",
    }
    old = dict(os.environ)
    os.environ.update(env)  # SidecarProc passes the environment on
    try:
        sidecar = SidecarProc(region_path, [server.address], interval=0.1)
    finally:
        os.environ.clear()
        os.environ.update(old)
    try:
        sidecar.wait_synced()
        wait_for(lambda: Path(str(region_path) + ".load").exists(), 10, "the load file")
        one, two = Agent(region_path), Agent(region_path)
        agents += [one, two]
        bad, *good = [f"127.0.0.1:{p}" for p in ports]

        def batch_then_ejected() -> bool:
            for _ in range(4):  # failures spread between successes, split over two workers
                assert one("report", "api", bad, "fail", 2) == "ok 2"
                assert two("report", "api", bad, "ok", 3) == "ok 3"
            for node in good:
                assert one("report", "api", node, "ok", 10) == "ok 10"
                assert two("report", "api", node, "ok", 10) == "ok 10"
            return bad not in two.picks(n=50)

        wait_for(batch_then_ejected, 30, "the node to be ejected by its success rate")
        status = cmctl(region_path, "status")
        ejected = status["ejected"]
        assert isinstance(ejected, list)
        assert [e["address"] for e in ejected] == [bad]
        assert ejected[0]["reason"].startswith("success rate "), ejected  # ~60 %, per interval
    finally:
        sidecar.close()
        server.close()
