"""cm-sidecar against real cm-server processes: propagation, outages, protection, failover,
SIGKILL loops, warm start. Every state is awaited through the region, as workers see it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import clustermap
from clustermap._pb.clustermap.v1 import subscription_pb2
from clustermap.region.reader import RegionReader
from tests.support.procs import Child, python_env, wait_for
from tests.support.proxy import TamperingProxy
from tests.support.stack import CMCTL, ServerProc, SidecarProc, dead_address, free_port


def addresses(region: Path, service: str) -> set[str]:
    try:
        return {n.address for n in RegionReader(region).service(service).nodes}
    except clustermap.ClusterMapError:
        return set()


def counters(region: Path) -> dict[str, int]:
    return dict(RegionReader(region).meta().counters)


@pytest.fixture
def server() -> ServerProc:
    s = ServerProc()
    yield s
    s.close()


def test_server_changes_reach_workers_by_delta(server: ServerProc, region_path: Path) -> None:
    server.register("user-svc", "10.0.0.1", 80)
    server.register("user-svc", "10.0.0.2", 80, weight=3)
    sidecar = SidecarProc(region_path, [server.address])
    try:
        sidecar.wait_synced()
        wait_for(lambda: addresses(region_path, "user-svc") == {"10.0.0.1:80", "10.0.0.2:80"})
        server.set("user-svc", "10.0.0.2", 80, status=3)  # NODE_STATUS_DRAIN
        cm = clustermap.open(region_path)
        wait_for(lambda: cm.service("user-svc").nodes[1].status == "drain", what="drain")
        # Another process, a worker's view: the drained node is never picked.
        out = subprocess.run(
            [CMCTL, "--region", str(region_path), "pick", "user-svc", "--count", "6"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert set(out.stdout.split()) == {"10.0.0.1:80"}
        server.register("pay-svc", "10.0.1.1", 443)
        wait_for(lambda: addresses(region_path, "pay-svc") == {"10.0.1.1:443"}, what="new svc")
        server.deregister("user-svc", "10.0.0.1", 80)
        wait_for(lambda: addresses(region_path, "user-svc") == {"10.0.0.2:80"}, what="removal")
        c = counters(region_path)
        assert c.get("full") == 1, c  # one full at start, every later change by delta
        assert c.get("delta", 0) >= 3, c
    finally:
        sidecar.close()


def test_checksum_mismatch_after_a_delta_resyncs_with_a_full(
    server: ServerProc, region_path: Path
) -> None:
    def corrupt(resp: subscription_pb2.PollResponse) -> None:
        resp.checksum ^= 0x5A5A

    proxy = TamperingProxy(server.address, corrupt)
    server.register("a", "10.0.0.1", 80)
    sidecar = SidecarProc(region_path, [proxy.address])
    try:
        sidecar.wait_synced()
        server.register("a", "10.0.0.2", 80)  # the delta carrying this one is corrupted
        wait_for(lambda: addresses(region_path, "a") == {"10.0.0.1:80", "10.0.0.2:80"})
        c = counters(region_path)
        assert proxy.tampered == 1
        assert c.get("checksum_mismatches") == 1, c
        assert c.get("full") == 2, c  # the first sync and the resync
    finally:
        sidecar.close()
        proxy.close()


def test_a_service_the_registry_could_not_have_produced_is_quarantined(
    server: ServerProc, region_path: Path
) -> None:
    def poison(resp: subscription_pb2.PollResponse) -> None:
        resp.services[0].nodes[0].host = "evil host; rm -rf /"

    proxy = TamperingProxy(server.address, poison)
    server.register("a", "10.0.0.1", 80)
    sidecar = SidecarProc(region_path, [proxy.address])
    try:
        sidecar.wait_synced()
        server.register("a", "10.0.0.2", 80)  # this delta is poisoned: a keeps its last nodes
        wait_for(lambda: "a" in RegionReader(region_path).meta().quarantined, what="quarantine")
        assert addresses(region_path, "a") == {"10.0.0.1:80"}
        server.register("a", "10.0.0.3", 80)  # the next version of a is good again
        want = {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}
        wait_for(lambda: addresses(region_path, "a") == want)
        wait_for(lambda: not RegionReader(region_path).meta().quarantined, what="flag cleared")
        assert proxy.tampered == 1
        assert not counters(region_path).get("poll_errors")
        log = sidecar.child.stderr()
        assert "evil host" in log
        assert "is neither an IP address nor a valid DNS name" in log
    finally:
        sidecar.close()
        proxy.close()


def test_server_outage_keeps_the_map_stale_then_fresh_again(region_path: Path) -> None:
    server = ServerProc(warmup=1.0)
    server.register("a", "10.0.0.1", 80)
    sidecar = SidecarProc(region_path, [server.address])
    try:
        sidecar.wait_synced()
        port = server.port
        server.kill()
        meta = wait_for(lambda: (m := sidecar.meta()) and m.stale and m, what="stale flag")
        assert "no server answered" in meta.reason
        assert clustermap.open(region_path).pick("a").address == "10.0.0.1:80"
        status = json.loads(
            subprocess.run(
                [CMCTL, "--region", str(region_path), "status", "--json"],
                capture_output=True,
                text=True,
            ).stdout
        )
        assert status["stale"] is True
        first_age = status["age_seconds"]
        wait_for(
            lambda: (
                json.loads(
                    subprocess.run(
                        [CMCTL, "--region", str(region_path), "status", "--json"],
                        capture_output=True,
                        text=True,
                    ).stdout
                )["age_seconds"]
                > first_age + 0.3
            ),
            what="age to grow",
        )
        # Back, empty: the first full it answers is held back (protection) until "a" returns.
        server = ServerProc(port=port, warmup=1.0)
        server.register("a", "10.0.0.1", 80)
        meta = wait_for(
            lambda: (m := sidecar.meta()) and not m.stale and not m.protected and m, what="fresh"
        )
        assert meta.reason == ""
        assert addresses(region_path, "a") == {"10.0.0.1:80"}
    finally:
        sidecar.close()
        server.close()


def _watch_min_nodes(region: Path, stop: threading.Event, seen: list[int]) -> None:
    reader = RegionReader(region)
    while not stop.is_set():
        snap = reader.snapshot()
        seen.append(sum(len(s.nodes) for s in snap.services.values()))


def test_restarted_empty_server_never_wipes_the_map(region_path: Path) -> None:
    # Leases of 3 s (heartbeats every 1 s) and a warm-up as long: only a missing keepalive, not a
    # busy machine delaying one, can drop a node before or after the restart.
    server = ServerProc(ttl=3.0, warmup=3.0)
    keepalives = [
        Child(
            [
                CMCTL,
                "--server",
                server.address,
                "register",
                "ka",
                f"10.0.2.{i}:80",
                "--ttl",
                "3",
                "--keepalive",
            ],
            env=python_env(),
        )
        for i in range(4)
    ]
    for i in range(2):  # 2 of 6 nodes: below the mass-drop threshold, so the per-service rule
        server.register("static", f"10.0.3.{i}", 80)  # no lease, no keepalive: gone on restart
    sidecar = SidecarProc(region_path, [server.address])
    seen: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_min_nodes, args=(region_path, stop, seen))
    try:
        wait_for(lambda: len(addresses(region_path, "ka")) == 4, what="keepalive nodes")
        sidecar.wait_synced()
        watcher.start()
        port = server.port
        server.kill()
        server = ServerProc(port=port, ttl=3.0, warmup=3.0)
        # Keepalives re-register; the "static" service never comes back: protection keeps it.
        meta = wait_for(lambda: (m := sidecar.meta()) and m.protected and m, 30, "protection")
        assert "static" in meta.reason
        assert len(addresses(region_path, "static")) == 2
        assert len(addresses(region_path, "ka")) == 4
        status = subprocess.run(
            [CMCTL, "--region", str(region_path), "status"], capture_output=True, text=True
        ).stdout
        assert "protected    yes" in status
        assert "static" in status
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        for k in keepalives:
            k.close()
        sidecar.close()
        server.close()
    assert seen
    assert min(seen) == 6, f"the map lost nodes during the restart: min {min(seen)}"


def test_failover_to_the_second_server_and_back(region_path: Path) -> None:
    a, b = ServerProc(warmup=0.5), ServerProc()
    for s in (a, b):
        s.register("svc", "10.0.0.1", 80)
    sidecar = SidecarProc(region_path, [a.address, b.address])
    try:
        assert sidecar.wait_synced().server == a.address
        port = a.port
        a.kill()
        wait_for(
            lambda: (m := sidecar.meta()) and m.server == b.address and not m.stale,
            what="failover to b",
        )
        assert addresses(region_path, "svc") == {"10.0.0.1:80"}
        a = ServerProc(port=port, warmup=0.5)
        a.register("svc", "10.0.0.1", 80)
        wait_for(lambda: (m := sidecar.meta()) and m.server == a.address, 30, "back to a")
        assert counters(region_path).get("failovers", 0) >= 1
    finally:
        sidecar.close()
        a.close()
        b.close()


CHURN_READER = """
import sys, time
import clustermap
cm = clustermap.open(sys.argv[1])
stop = time.monotonic() + float(sys.argv[2])
reads = 0
while time.monotonic() < stop:
    svc = cm.service("churn")
    assert any(n.address == "10.9.9.9:1" for n in svc.nodes), svc   # never empty, never torn
    cm.pick("churn")
    reads += 1
print("reads", reads, flush=True)
"""


def test_sidecar_sigkilled_in_a_loop_never_leaves_workers_without_a_map(
    server: ServerProc, region_path: Path
) -> None:
    server.register("churn", "10.9.9.9", 1)
    stop = threading.Event()

    def churn() -> None:  # ~100 changes/s: a busy registry, not a saturated one
        i = 0
        while not stop.wait(0.01):
            server.register("churn", f"10.8.0.{i % 200}", 80)
            if i >= 5:
                server.deregister("churn", f"10.8.0.{(i - 5) % 200}", 80)
            i += 1

    first = SidecarProc(region_path, [server.address])
    first.wait_synced()
    first.kill()
    churner = threading.Thread(target=churn)
    churner.start()
    readers = [Child.python("-c", CHURN_READER, str(region_path), "12") for _ in range(3)]
    resumes = []
    try:
        for _ in range(8):
            sidecar = SidecarProc(region_path, [server.address])
            t0 = time.monotonic()
            before = RegionReader(region_path).last_sync_ns
            wait_for(lambda b=before: RegionReader(region_path).last_sync_ns > b, 30, "resume")
            resumes.append(time.monotonic() - t0)
            time.sleep(0.05 + 0.1 * (len(resumes) % 3))  # let it publish mid-churn, then kill
            sidecar.kill()
        for r in readers:
            line = r.expect("reads", timeout=30)
            assert int(line.split()[1]) > 100
    finally:
        stop.set()
        churner.join()
        for r in readers:
            r.close()
    # Spawn to first sync includes interpreter start and imports (a figure, not a test: the
    # lock itself is recovered at once, see the region fault tests).
    print(f"sidecar spawn -> first sync: max {max(resumes):.2f} s, all {resumes}")


def test_snapshot_warm_start_with_the_server_down(region_dir: Path) -> None:
    region, snap = region_dir / "r.region", region_dir / "last-good.snapshot"
    server = ServerProc()
    server.register("a", "10.0.0.1", 80)
    server.register("b", "10.0.0.2", 81)
    sidecar = SidecarProc(region, [server.address], "--snapshot", str(snap))
    try:
        sidecar.wait_synced()
        wait_for(lambda: addresses(region, "b"), what="b")
        sidecar.child.proc.send_signal(signal.SIGTERM)
        assert sidecar.child.wait() == 0
        assert snap.exists()
    finally:
        sidecar.close()
        server.close()
    region.unlink()  # as after a reboot: tmpfs is empty, the server is down
    with dead_address() as down:
        sidecar = SidecarProc(region, [down], "--snapshot", str(snap))
        try:
            # The region exists (empty) as soon as the sidecar opens it: await the map itself.
            wait_for(lambda: addresses(region, "b"), what="warm start")
            meta = sidecar.meta()
            assert meta is not None
            assert meta.source == "snapshot"
            assert meta.stale
            assert clustermap.open(region).pick("b").address == "10.0.0.2:81"
        finally:
            sidecar.close()


def test_sighup_reloads_the_config_file(region_dir: Path) -> None:
    a, b = ServerProc(), ServerProc()
    a.register("svc", "10.0.0.1", 80)
    b.register("svc", "10.0.0.2", 80)
    config = region_dir / "sidecar.toml"
    config.write_text(f'server = ["{a.address}"]\n')
    region = region_dir / "r.region"
    sidecar = SidecarProc(region, [], "--config", str(config))
    try:
        assert sidecar.wait_synced().server == a.address
        config.write_text(f'server = ["{b.address}"]\nprotect = false\n')
        sidecar.child.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: addresses(region, "svc") == {"10.0.0.2:80"}, what="reloaded server")
        assert sidecar.meta().server == b.address  # type: ignore[union-attr]
    finally:
        sidecar.close()
        a.close()
        b.close()


def test_a_second_sidecar_refuses_and_a_standby_takes_over(
    server: ServerProc, region_path: Path
) -> None:
    server.register("a", "10.0.0.1", 80)
    first = SidecarProc(region_path, [server.address])
    try:
        first.wait_synced()
        second = SidecarProc(region_path, [server.address])
        assert second.child.wait() == 1
        refusal = second.child.stderr().strip().splitlines()[-1]
        assert refusal.startswith("cm-sidecar: ")
        assert f"another writer (pid {first.pid})" in refusal
        standby = SidecarProc(region_path, [server.address], "--standby")
        try:
            first.kill()
            before = RegionReader(region_path).last_sync_ns
            wait_for(lambda: RegionReader(region_path).last_sync_ns > before, 30, "takeover")
            assert RegionReader(region_path).writer_pid == standby.pid
        finally:
            standby.close()
    finally:
        first.close()


def test_metrics_and_healthz(server: ServerProc, region_path: Path) -> None:
    server.register("a", "10.0.0.1", 80)
    port = free_port()
    sidecar = SidecarProc(region_path, [server.address], "--metrics", f"127.0.0.1:{port}")
    try:
        sidecar.wait_synced()
        base = f"http://127.0.0.1:{port}"
        body = wait_for(lambda: _get(base + "/metrics"), what="metrics")
        assert 'clustermap_sidecar_polls_total{outcome="full"} 1.0' in body
        assert "clustermap_sidecar_services 1.0" in body
        assert _get(base + "/healthz").startswith("ok")
        server.kill()
        wait_for(lambda: _status(base + "/healthz") == 503, 30, "unhealthy after the outage")
    finally:
        sidecar.close()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_print_config_merges_flags_env_and_file(tmp_path: Path) -> None:
    config = tmp_path / "s.toml"
    config.write_text('interval = 2.0\nserver = ["10.0.0.1:7700"]\nprotect_max_hold = 60\n')
    out = subprocess.run(
        [
            str(Path(CMCTL).with_name("cm-sidecar")),
            "--config",
            str(config),
            "--interval",
            "0.25",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "CLUSTERMAP_REGION": "/dev/shm/x.r"},
        check=True,
    )
    doc = json.loads(out.stdout)
    assert doc["interval"] == 0.25  # flag over file
    assert doc["server"] == ["10.0.0.1:7700"]  # file
    assert doc["region"] == "/dev/shm/x.r"  # env
    assert doc["protect_max_hold"] == 60
    bad = subprocess.run(
        [str(Path(CMCTL).with_name("cm-sidecar")), "--interval", "-1", "--print-config"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "interval" in bad.stderr
    assert "Traceback" not in bad.stderr
