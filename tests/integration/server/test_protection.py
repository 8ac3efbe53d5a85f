"""Self-preservation and lifecycle of a real cm-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import pytest

from clustermap._pb.clustermap.v1 import (
    inspection_pb2,
    registry_pb2,
    subscription_pb2,
)
from tests.integration.server.conftest import CM_SERVER, wait_for


def status(srv):
    return srv.inspection().GetStatus(inspection_pb2.GetStatusRequest(), timeout=5)


@pytest.mark.memory_only("self-preservation does not apply to etcd (etcd's leases expire)")
def test_self_preservation_holds_leases_when_most_heartbeats_stop(server):
    # The four registrations must land within one TTL of each other to count as one mass death
    # (and the resumed heartbeats, every 0.1 s, must beat the TTL): 2 s leaves a busy machine room.
    srv = server("--heartbeat-ttl", "2")
    reg = srv.registry()
    leases = [
        reg.Register(registry_pb2.RegisterRequest(service="a", host="h", port=p)).lease_id
        for p in range(1, 5)
    ]
    beating = set(leases)
    stop = threading.Event()

    def heartbeats() -> None:
        while not stop.wait(0.1):
            for lease in list(beating):
                reg.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=lease))

    t = threading.Thread(target=heartbeats)
    t.start()
    try:
        beating.clear()  # every heartbeat stops at once (a partition, not a dead fleet)
        wait_for(lambda: status(srv).self_preservation, what="self-preservation")
        st = status(srv)
        assert st.nodes == 4
        assert st.leases == 4
        ans = srv.subscription().Poll(subscription_pb2.PollRequest())
        assert ans.self_preservation
        assert len(ans.services[0].nodes) == 4
        assert "self-preservation on" in srv.log()
        from tests.integration.server.test_cmctl_admin import cmctl

        r = cmctl(srv.address, "services")
        assert r.returncode == 0
        assert "self-preservation on" in r.stderr
        assert json.loads(cmctl(srv.address, "services", "--json").stdout)["server"][
            "self_preservation"
        ]
        # the fleet comes back, except one node that really died: it expires normally
        beating.update(leases[:3])
        wait_for(lambda: status(srv).nodes == 3, what="the dead node to expire")
        assert not status(srv).self_preservation
        assert "self-preservation off" in srv.log()
    finally:
        stop.set()
        t.join()


@pytest.mark.memory_only("self-preservation does not apply to etcd (etcd's leases expire)")
def test_self_preservation_can_be_disabled(server):
    srv = server("--heartbeat-ttl", "0.3", "--self-preservation-threshold", "1")
    reg = srv.registry()
    for p in range(1, 5):
        reg.Register(registry_pb2.RegisterRequest(service="a", host="h", port=p))
    wait_for(lambda: status(srv).nodes == 0, what="all leases to expire")
    assert not status(srv).self_preservation


def test_sigterm_stops_gracefully(server):
    srv = server()
    assert srv.terminate() == 0
    assert "stopped" in srv.log()


def test_bad_command_line_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[clusters.a]\nnodes = ['h:0']\n")
    for args in (
        ["--listen", "nonsense"],
        ["--heartbeat-ttl", "0"],
        ["--clusters", str(tmp_path / "missing.toml")],
        ["--clusters", str(bad)],
        ["--tls-cert", "x.pem"],
    ):
        r = subprocess.run([CM_SERVER, *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (args, r)
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_port_in_use_is_a_clear_error(server):
    srv = server()
    r = subprocess.run(
        [CM_SERVER, "--listen", srv.address], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2
    # one plain line, without gRPC's internal log line before it
    assert r.stderr == f"cm-server: cannot listen on {srv.address}: address already in use\n"


def test_json_logs(server):
    srv = server("--log-format", "json")
    srv.registry().Register(registry_pb2.RegisterRequest(service="a", host="h", port=1))
    os.killpg(srv.proc.pid, signal.SIGTERM)
    srv.proc.wait(60)
    events = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    kinds = [e.get("event") for e in events]
    assert {"listening", "register", "stopping", "stopped"} <= set(kinds)
    reg = next(e for e in events if e.get("event") == "register")
    assert reg["service"] == "a"
    assert reg["node"] == "h:1"


def test_sigterm_ends_watch_streams_promptly(server):
    import grpc

    # A grace far longer than the wait below: a watcher that was not woken would hold the
    # server for the whole grace, and terminate() would time out.
    srv = server("--grace", "300")
    stream = srv.subscription().Watch(subscription_pb2.PollRequest(), timeout=600)
    assert next(stream).kind == subscription_pb2.POLL_KIND_FULL
    assert srv.terminate(timeout=60) == 0
    ended = False
    try:
        for _ in stream:
            pass
        ended = True
    except grpc.RpcError:
        ended = True
    assert ended
