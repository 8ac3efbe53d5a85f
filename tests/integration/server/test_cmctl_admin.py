"""cmctl's admin commands against a real cm-server (and against none)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from clustermap._pb.clustermap.v1 import inspection_pb2, registry_pb2
from tests.integration.server.conftest import wait_for
from tests.support.procs import Child


def cmctl_argv() -> tuple[str, ...]:
    return (str(Path(sys.executable).with_name("cmctl")),)


def cmctl(srv_address: str, *args: str, env=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cmctl_argv(), "--server", srv_address, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def node_list(srv, service: str):
    try:
        resp = srv.inspection().GetService(inspection_pb2.GetServiceRequest(name=service))
    except Exception:
        return []
    return [(n.host, n.port, n.weight, n.status) for n in resp.service.nodes]


def test_register_set_services_deregister(server):
    srv = server()
    r = cmctl(
        srv.address,
        "register",
        "user-svc",
        "10.0.0.7:8080",
        "--weight",
        "3",
        "--meta",
        "zone=a",
        "--meta",
        "v=2",
    )
    assert r.returncode == 0, r.stderr
    assert "registered user-svc 10.0.0.7:8080 (no expiry)" in r.stdout
    # a lease that outlives the test however slow the machine (six cmctl runs follow)
    r = cmctl(srv.address, "register", "user-svc", "[::1]:9000", "--ttl", "3600")
    assert r.returncode == 0, r.stderr
    assert "lease=" in r.stdout
    assert "ttl=3600s" in r.stdout

    r = cmctl(srv.address, "set", "user-svc", "10.0.0.7:8080", "--status", "drain", "--weight", "0")
    assert r.returncode == 0, r.stderr
    assert "weight=0 status=drain" in r.stdout

    r = cmctl(srv.address, "services")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["SERVICE", "NODES", "HEALTHY", "REVISION"]
    assert lines[1].split()[:3] == ["user-svc", "2", "1"]

    r = cmctl(srv.address, "services", "--json", "user-svc")
    doc = json.loads(r.stdout)
    nodes = doc["services"]["user-svc"]["nodes"]
    assert {(n["host"], n["port"], n["weight"], n["status"]) for n in nodes} == {
        ("10.0.0.7", 8080, 0, "drain"),
        ("::1", 9000, 1, "up"),
    }
    assert next(n for n in nodes if n["port"] == 8080)["meta"] == {"v": "2", "zone": "a"}
    summary = json.loads(cmctl(srv.address, "services", "--json").stdout)
    assert summary["services"]["user-svc"]["healthy"] == 1

    r = cmctl(srv.address, "deregister", "user-svc", "10.0.0.7:8080")
    assert r.returncode == 0, r.stderr
    assert [n[1] for n in node_list(srv, "user-svc")] == [9000]


def test_unreachable_server_is_one_line_error(tmp_path):
    for args in (
        ("services",),
        ("register", "a", "h:1"),
        ("deregister", "a", "h:1"),
        ("set", "a", "h:1", "--weight", "1"),
    ):
        r = cmctl("127.0.0.1:1", *args, "--timeout", "2")
        assert r.returncode == 1, (args, r)
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "cannot reach cm-server at 127.0.0.1:1" in r.stderr


def test_rejected_requests_are_one_line_errors(server):
    srv = server()
    cases = [
        (("register", "bad name", "h:1"), "INVALID_ARGUMENT"),
        (("register", "a", "h:0"), "INVALID_ARGUMENT"),
        (("register", "a", "h:1", "--weight", "-5"), "INVALID_ARGUMENT"),
        (("deregister", "a", "h:1"), "NOT_FOUND"),
        (("set", "a", "h:1", "--status", "down"), "NOT_FOUND"),
        (("services", "nope"), "NOT_FOUND"),
    ]
    for args, code in cases:
        r = cmctl(srv.address, *args)
        assert r.returncode == 1, (args, r)
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert code in r.stderr, (args, r.stderr)
    r = cmctl(srv.address, "register", "a", "nohostport")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    r = cmctl(srv.address, "register", "a", "h:1", "--keepalive")
    assert r.returncode == 1
    assert "--keepalive needs --ttl" in r.stderr


def test_keepalive_survives_ttls_and_server_restart_then_deregisters(server):
    # A TTL long enough that only a missing heartbeat (every TTL/3) can expire the lease, not a
    # busy machine delaying one; the lease is watched through cmctl's own report of losing it.
    ttl = "2"
    srv = server("--heartbeat-ttl", ttl)
    port = int(srv.address.rsplit(":", 1)[1])
    argv = ["--server", srv.address, "register", "ka", "10.1.1.1:80", "--ttl", ttl, "--keepalive"]
    child = Child([*cmctl_argv(), *argv])
    try:
        child.expect("registered ka 10.1.1.1:80 lease=", timeout=30)
        wait_for(lambda: node_list(srv, "ka"), timeout=30, what="keepalive registration")
        deadline = time.monotonic() + 2.5 * float(ttl)  # the first lease would be long gone
        while time.monotonic() < deadline:
            assert node_list(srv, "ka"), "lease expired despite keepalive"
            time.sleep(0.1)
        assert "lease lost" not in child.stderr(), child.stderr()
        srv.kill()
        srv2 = server("--heartbeat-ttl", ttl, port=port)
        # re-registers (memory: the new server knows no lease) or keeps heartbeating (etcd)
        wait_for(lambda: node_list(srv2, "ka"), timeout=30, what="re-registration")
        os.killpg(child.pid, signal.SIGINT)
        child.expect("deregistered ka 10.1.1.1:80", timeout=30)
        assert child.wait(30) == 0, child.stderr()
        assert "Traceback" not in child.stderr()
        assert node_list(srv2, "ka") == []
    finally:
        child.close()


def test_token_is_sent_from_env_or_file(server, tmp_path):
    srv = server(env={"CLUSTERMAP_TOKEN": "s3cret"})
    r = cmctl(srv.address, "register", "a", "h:1", env={"CLUSTERMAP_TOKEN": ""})
    assert r.returncode == 1
    assert "UNAUTHENTICATED" in r.stderr
    r = cmctl(srv.address, "register", "a", "h:1", env={"CLUSTERMAP_TOKEN": "s3cret"})
    assert r.returncode == 0, r.stderr
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    r = cmctl(srv.address, "services", "--token-file", str(token), env={"CLUSTERMAP_TOKEN": ""})
    assert r.returncode == 0
    assert "a" in r.stdout


def test_registry_requests_from_python(server):
    """The same server answers the raw stub (sanity check that cmctl did not cache anything)."""
    srv = server()
    srv.registry().Register(
        registry_pb2.RegisterRequest(service="x", host="h", port=1, ttl_seconds=0)
    )
    assert (
        json.loads(cmctl(srv.address, "services", "--json").stdout)["services"]["x"]["nodes"] == 1
    )
