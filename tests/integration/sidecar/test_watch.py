"""cm-sidecar --watch against real cm-server processes: changes by the stream, the server killed
and restarted under it, failover, protection, a tampered stream. Every state is awaited through
the region, as workers see it; the meta's counters say how each change came."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import clustermap
from clustermap._pb.clustermap.v1 import subscription_pb2
from clustermap.feedback import layout as FL
from clustermap.region.layout import Meta
from clustermap.region.reader import RegionReader
from clustermap.sidecar.watcher import STREAM_OPTIONS
from tests.support.h2_relay import DATA, PING, FrameCountingRelay
from tests.support.procs import wait_for
from tests.support.proxy import TamperingProxy
from tests.support.stack import CMCTL, ServerProc, SidecarProc, free_port

# The server answers on the stream every half second even when nothing changes; the sidecar
# gives up on a stream silent for 10 s (generous: the machine is loaded).
KEEPALIVE = ("--watch-keepalive", "0.5")
WATCH_ENV = {"CLUSTERMAP_WATCH_SILENCE": "10"}


def addresses(region: Path, service: str) -> set[str]:
    try:
        return {n.address for n in RegionReader(region).service(service).nodes}
    except clustermap.ClusterMapError:
        return set()


def meta(region: Path) -> Meta:
    return RegionReader(region).meta()


def watching(region: Path, server: str | None = None) -> bool:
    m = meta(region)
    return m.mode == "watch" and not m.stale and (server is None or m.server == server)


def watcher(region: Path, servers: list[str], *args: str) -> SidecarProc:
    return SidecarProc(region, servers, "--watch", *args, env=WATCH_ENV)


def cmctl_status(region: Path, *args: str) -> str:
    out = subprocess.run(
        [CMCTL, "--region", str(region), "status", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in {url}")


def min_nodes(region: Path, stop: threading.Event, seen: list[int]) -> None:
    """Until ``stop``: the node count of every map a worker could read."""
    reader = RegionReader(region)
    while not stop.is_set():
        seen.append(sum(len(s.nodes) for s in reader.snapshot().services.values()))


@pytest.fixture
def server() -> Iterator[ServerProc]:
    s = ServerProc(*KEEPALIVE)
    yield s
    s.close()


def test_changes_reach_the_region_by_the_stream(server: ServerProc, region_path: Path) -> None:
    server.register("a", "10.0.0.1", 80)
    sidecar = watcher(region_path, [server.address])
    try:
        sidecar.wait_synced()
        wait_for(lambda: watching(region_path), what="the stream to be up")
        before = dict(meta(region_path).counters)
        assert meta(region_path).stream_since_ns > 0
        server.register("a", "10.0.0.2", 80)
        server.register("b", "10.0.1.1", 443)
        wait_for(lambda: addresses(region_path, "a") == {"10.0.0.1:80", "10.0.0.2:80"})
        wait_for(lambda: addresses(region_path, "b") == {"10.0.1.1:443"})
        after = dict(meta(region_path).counters)
        assert after.get("polls", 0) == before.get("polls", 0), (before, after)  # no poll
        assert after["watch"] > before["watch"], (before, after)
        assert after.get("delta", 0) > before.get("delta", 0), (before, after)
        st = json.loads(cmctl_status(region_path, "--json"))
        assert st["mode"] == "watch", st
        assert st["stream_age_seconds"] >= 0, st
        assert st["stream_reconnects"] == 0, st
        rows = dict(line.split(None, 1) for line in cmctl_status(region_path).splitlines())
        assert rows["mode"].startswith("watch, stream up"), rows
    finally:
        sidecar.close()


def test_server_killed_mid_stream_keeps_the_map_then_the_stream_resumes(
    region_path: Path,
) -> None:
    first = ServerProc(*KEEPALIVE)
    first.register("a", "10.0.0.1", 80)
    first.register("a", "10.0.0.2", 80)
    port = free_port()
    sidecar = watcher(region_path, [first.address], "--metrics", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/metrics"
    second: ServerProc | None = None
    stop, seen = threading.Event(), [0]
    observer = threading.Thread(target=min_nodes, args=(region_path, stop, seen))
    try:
        sidecar.wait_synced()
        wait_for(lambda: watching(region_path), what="the stream to be up")
        seen.clear()
        observer.start()
        first.kill()  # SIGKILL: no goodbye on the stream
        wait_for(lambda: meta(region_path).stale, what="the map to go stale")
        m = meta(region_path)
        assert m.mode == "poll", m
        assert addresses(region_path, "a") == {"10.0.0.1:80", "10.0.0.2:80"}
        assert m.counters.get("watch_fallbacks") == 1, m.counters
        assert metric(url, "clustermap_sidecar_watch_fallbacks_total") == 1
        assert metric(url, "clustermap_sidecar_watching") == 0
        assert json.loads(cmctl_status(region_path, "--json"))["mode"] == "poll"
        # The same address again, restarted empty: protection keeps the map meanwhile.
        second = ServerProc(*KEEPALIVE, port=first.port)
        wait_for(lambda: watching(region_path), what="the stream to resume")
        assert addresses(region_path, "a") == {"10.0.0.1:80", "10.0.0.2:80"}
        assert meta(region_path).protected
        stop.set()
        observer.join()
        assert min(seen) == 2, "a worker saw the map shrink"
        # Re-registered one by one: protection lets a drop of half the nodes through, so only
        # the end state is checked from here.
        second.register("a", "10.0.0.1", 80)
        second.register("a", "10.0.0.2", 80)
        second.register("a", "10.0.0.3", 80)
        wait_for(
            lambda: addresses(region_path, "a") == {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"},
            what="a change after the restart",
        )
        m = meta(region_path)
        assert not m.protected, m
        assert m.mode == "watch", m
        assert m.counters.get("watch_reconnects", 0) >= 1, m.counters
        assert metric(url, "clustermap_sidecar_watch_reconnects_total") >= 1
        assert metric(url, "clustermap_sidecar_watching") == 1
        st = json.loads(cmctl_status(region_path, "--json"))
        assert st["mode"] == "watch", st
        assert st["stream_reconnects"] >= 1, st
    finally:
        stop.set()
        if observer.is_alive():
            observer.join()
        sidecar.close()
        first.close()
        if second is not None:
            second.close()


def test_failover_to_the_second_server_when_the_first_dies(region_path: Path) -> None:
    first, second = ServerProc(*KEEPALIVE), ServerProc(*KEEPALIVE)
    for s in (first, second):
        s.register("a", "10.0.0.1", 80)
    sidecar = watcher(region_path, [first.address, second.address])
    try:
        sidecar.wait_synced()
        wait_for(lambda: watching(region_path, first.address), what="a stream from the first")
        first.kill()
        wait_for(lambda: watching(region_path, second.address), what="a stream from the second")
        second.register("a", "10.0.0.2", 80)
        wait_for(lambda: addresses(region_path, "a") == {"10.0.0.1:80", "10.0.0.2:80"})
        assert meta(region_path).mode == "watch"
    finally:
        sidecar.close()
        first.close()
        second.close()


def _through_a_tampered_delta(
    server: ServerProc, region_path: Path, tamper: Callable[[subscription_pb2.PollResponse], None]
) -> tuple[int, dict[str, int]]:
    """A watching sidecar behind a proxy that applies ``tamper`` to every answer after the
    first: once a change reached the region anyway and the stream is up again, the number of
    answers tampered with and the sidecar's counters."""
    proxy = TamperingProxy(server.address, tamper)
    server.register("a", "10.0.0.1", 80)
    sidecar = watcher(region_path, [proxy.address])
    try:
        sidecar.wait_synced()
        wait_for(lambda: watching(region_path), what="the stream to be up")
        server.register("a", "10.0.0.2", 80)  # the delta carrying this one is tampered with
        wait_for(lambda: addresses(region_path, "a") == {"10.0.0.1:80", "10.0.0.2:80"})
        wait_for(lambda: watching(region_path), what="the stream to be up again")
        return proxy.tampered, meta(region_path).counters
    finally:
        sidecar.close()
        proxy.close()


def test_a_bad_answer_on_the_stream_is_rejected_and_resynced(
    server: ServerProc, region_path: Path
) -> None:
    def corrupt(resp: subscription_pb2.PollResponse) -> None:
        resp.checksum ^= 0x5A5A

    tampered, c = _through_a_tampered_delta(server, region_path, corrupt)
    assert tampered == 1
    assert c.get("checksum_mismatches") == 1, c
    assert c.get("full", 0) >= 2, c  # the first sync and the resync
    assert c.get("watch_fallbacks") == 1, c
    assert c.get("watch_reconnects") == 1, c


def test_the_feedback_sweep_keeps_its_period_while_watching(
    server: ServerProc, region_path: Path
) -> None:
    # Polls 10 s apart: only the wait loop's own schedule can sweep 20 times in 30 s.
    server.register("a", "10.0.0.1", 80)
    sidecar = SidecarProc(region_path, [server.address], "--watch", interval=10, env=WATCH_ENV)
    load = Path(str(region_path) + ".load")

    def sweep() -> int:
        with open(load, "rb") as f:
            return int.from_bytes(f.read(64)[FL.SWEEP_OFF : FL.SWEEP_OFF + 8], "little")

    try:
        sidecar.wait_synced()
        wait_for(lambda: watching(region_path), what="the stream to be up")
        sweeps: set[int] = set()

        def twenty() -> bool:
            sweeps.add(sweep())
            return len(sweeps) >= 20

        wait_for(twenty, 30, "20 sweeps")
        server.register("a", "10.0.0.2", 80)  # and the stream still delivers meanwhile
        wait_for(lambda: addresses(region_path, "a") == {"10.0.0.1:80", "10.0.0.2:80"}, 10)
    finally:
        sidecar.close()


def test_a_malformed_answer_on_the_stream_ends_it_and_the_map_stays_good(
    server: ServerProc, region_path: Path
) -> None:
    def garble(resp: subscription_pb2.PollResponse) -> None:
        resp.kind = 99  # type: ignore[assignment]  # no such kind: refused by clustermap.wire

    tampered, c = _through_a_tampered_delta(server, region_path, garble)
    assert tampered == 1
    assert c.get("watch_fallbacks") == 1, c
    assert "checksum_mismatches" not in c, c


class SilentProxy(TamperingProxy):
    """Forwards streams, except that the first one goes silent (open, nothing sent) after its
    first answer: a cut network that no error reports."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, lambda resp: None)
        self.tampered = 1  # never tamper
        self.streams = 0

    def Watch(self, request, context):  # type: ignore[no-untyped-def]
        self.streams += 1
        if self.streams == 1:
            yield self.stub.Poll(request, timeout=5)
            while context.is_active():
                threading.Event().wait(0.1)
            return
        yield from super().Watch(request, context)


def test_a_silent_stream_is_given_up_and_a_new_one_opened(
    server: ServerProc, region_path: Path
) -> None:
    proxy = SilentProxy(server.address)
    server.register("a", "10.0.0.1", 80)
    sidecar = SidecarProc(
        region_path, [proxy.address], "--watch", env={"CLUSTERMAP_WATCH_SILENCE": "2"}
    )
    try:
        sidecar.wait_synced()
        wait_for(lambda: proxy.streams >= 2, 60, "a second stream after the silence")
        wait_for(lambda: watching(region_path), what="the new stream to be up")
        server.register("a", "10.0.0.2", 80)
        wait_for(lambda: addresses(region_path, "a") == {"10.0.0.1:80", "10.0.0.2:80"})
        c = meta(region_path).counters
        assert c.get("watch_fallbacks", 0) >= 1, c
        assert c.get("watch_reconnects", 0) >= 1, c
    finally:
        sidecar.close()
        proxy.close()


def test_a_full_server_refuses_the_stream_and_the_sidecar_polls_and_backs_off(
    region_path: Path,
) -> None:
    # --max-watchers 0: every Watch is refused RESOURCE_EXHAUSTED (load shedding).
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    server = ServerProc(*KEEPALIVE, "--max-watchers", "0", "--metrics-listen", f"127.0.0.1:{port}")
    server.register("a", "10.0.0.1", 80)
    sidecar = watcher(region_path, [server.address])  # backoff 0.1 s doubling, at most 0.5 s
    started = time.monotonic()
    try:
        sidecar.wait_synced()
        server.register("a", "10.0.0.2", 80)
        wait_for(lambda: addresses(region_path, "a") == {"10.0.0.1:80", "10.0.0.2:80"})
        refused = "clustermap_server_watch_refused_total"
        wait_for(lambda: metric(url, refused) >= 5, 60, "five refused streams")
        m = meta(region_path)
        assert m.mode == "poll", m
        assert not m.stale, m
        assert m.counters.get("polls", 0) > 0, m.counters
        assert "watch" not in m.counters, m.counters  # no answer ever came by a stream
        # equal jitter keeps at least half of each delay: once at the 0.5 s cap, at most one
        # attempt per 0.25 s (a watcher that retried at once would make hundreds)
        elapsed = time.monotonic() - started
        assert metric(url, refused) <= 4 + elapsed / 0.25, elapsed
        assert metric(url, "clustermap_server_watch_streams") == 0
    finally:
        sidecar.close()
        server.close()


def test_the_stream_sends_no_bandwidth_probe_per_message(
    server: ServerProc, region_path: Path
) -> None:
    """Every PING a sidecar sends costs the server a read and an answer. gRPC's bandwidth-delay
    probe sent one after nearly every message received, 40 % of the server's CPU in a 5 000-stream
    fan-out; the Watch channel turns it off (``STREAM_OPTIONS``), so only keepalive pings remain.
    Seen on the wire, through a relay: the sidecar's own PINGs while 12 messages come in."""
    relay = FrameCountingRelay(server.address)
    server.register("a", "10.0.0.1", 80)
    sidecar = watcher(region_path, [relay.address])
    try:
        sidecar.wait_synced()
        wait_for(lambda: watching(region_path), what="the stream to be up")
        start, pings = time.monotonic(), relay.count(relay.sent, PING)
        messages = relay.count(relay.received, DATA)
        for i in range(2, 6):  # changes, besides the server's keepalive answer every 0.5 s
            server.register("a", f"10.0.0.{i}", 80)
            wait_for(lambda i=i: f"10.0.0.{i}:80" in addresses(region_path, "a"))
        wait_for(
            lambda: relay.count(relay.received, DATA) - messages >= 12,
            what="12 messages on the stream",
        )
        elapsed = time.monotonic() - start
        sent = relay.count(relay.sent, PING) - pings
    finally:
        sidecar.close()
        relay.close()
    keepalive_s = dict(STREAM_OPTIONS)["grpc.keepalive_time_ms"] / 1000
    assert sent <= 1 + elapsed / keepalive_s, f"{sent} PINGs in {elapsed:.1f} s"
