"""Several cm-server replicas on one real etcd cluster (3 members): shared registrations, one
epoch and one revision history, sidecar failover without stale or lost data, leases expiring in
etcd, compaction forcing a full resync, an etcd member dying under load.

Every test uses its own key prefix; states are awaited by condition, never by fixed sleeps."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import clustermap
from clustermap import wire
from clustermap._pb.clustermap.v1 import registry_pb2, subscription_pb2_grpc
from clustermap.region.reader import RegionReader
from tests.integration.etcd.harness import EtcdCluster, start_cluster
from tests.support.procs import wait_for
from tests.support.stack import ServerProc, SidecarProc

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def etcd3() -> Iterator[EtcdCluster]:
    c = start_cluster(3)
    yield c
    c.close()


class Replica(ServerProc):
    def __init__(self, url: str, *args: str, ttl: float = 2.0) -> None:
        super().__init__("--store", url, *args, ttl=ttl, warmup=0)
        self.url = url
        self.sub = subscription_pb2_grpc.SubscriptionStub(self._channel)

    def poll(self, epoch: str = "", revision: int = 0) -> wire.PollAnswer:
        return wire.poll_answer_from_pb(
            self.sub.Poll(wire.poll_request(epoch, revision), timeout=5)
        )

    def nodes(self, service: str) -> set[str]:
        ans = self.poll()
        return {n.address for s in ans.services if s.name == service for n in s.nodes}


@pytest.fixture
def replicas(etcd3: EtcdCluster) -> Iterator[list[Replica]]:
    url = etcd3.url(f"cm-test-{next(_prefixes)}")
    reps = [Replica(url), Replica(url)]
    yield reps
    for r in reps:
        r.close()


def same_answer(a: Replica, b: Replica) -> bool:
    x, y = a.poll(), b.poll()
    return (x.epoch, x.revision, x.checksum, x.services) == (
        y.epoch,
        y.revision,
        y.checksum,
        y.services,
    )


def addresses(region: Path, service: str) -> set[str]:
    try:
        return {n.address for n in RegionReader(region).service(service).nodes}
    except clustermap.ClusterMapError:
        return set()


def test_replicas_share_registrations_epoch_and_revisions(replicas: list[Replica]) -> None:
    a, b = replicas
    ra = a.register("user-svc", "10.0.0.1", 80, weight=2, zone="a")
    rb = b.register("user-svc", "10.0.0.2", 80)
    assert rb.revision > ra.revision
    # one history: the same epoch, and a subscriber that saw b's write gets it from a at once
    # (a catches up to a revision a client presents before answering)
    epoch = b.poll().epoch
    assert epoch == a.poll().epoch
    assert epoch.startswith("etcd-")
    caught_up = a.poll(epoch, rb.revision)
    assert caught_up.kind in (wire.NOT_MODIFIED, wire.DELTA)
    assert caught_up.revision >= rb.revision
    assert a.nodes("user-svc") == {"10.0.0.1:80", "10.0.0.2:80"}
    wait_for(lambda: same_answer(a, b), what="identical answers")
    first = a.poll()
    # a subscriber that saw b's newest revision asks a: a catches up, no full map
    b.set("user-svc", "10.0.0.1", 80, status=3)  # drain
    latest = b.poll(first.epoch, first.revision)
    assert latest.kind == wire.DELTA
    assert a.poll(first.epoch, latest.revision).kind == wire.NOT_MODIFIED
    a.deregister("user-svc", "10.0.0.2", 80)
    wait_for(lambda: b.nodes("user-svc") == {"10.0.0.1:80"}, what="deregistration via b")
    wait_for(lambda: same_answer(a, b), what="identical answers")
    # an operator's override survives re-registration through the other replica
    rev = a.register("user-svc", "10.0.0.1", 80, weight=5).revision
    assert b.poll(epoch, rev).kind in (wire.NOT_MODIFIED, wire.DELTA)  # b caught up
    svc = next(s for s in b.poll().services if s.name == "user-svc")
    assert (svc.nodes[0].weight, svc.nodes[0].status) == (5, "drain")
    with pytest.raises(grpc.RpcError) as err:
        b.deregister("user-svc", "10.0.0.9", 80)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_leases_live_in_etcd_and_expire_without_heartbeats(replicas: list[Replica]) -> None:
    a, b = replicas
    lease = a.register("pay-svc", "10.0.1.1", 443, ttl=3.0).lease_id
    keep = a.register("pay-svc", "10.0.1.2", 443, ttl=0).lease_id
    assert lease
    assert not keep
    # any replica renews it: the lease is etcd's
    ttl = b.registry.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=lease), timeout=5)
    assert ttl.ttl_seconds >= 1
    wait_for(lambda: a.nodes("pay-svc") == {"10.0.1.2:443"}, 30, "the lease to expire")
    wait_for(lambda: b.nodes("pay-svc") == {"10.0.1.2:443"}, 30, "b to see the expiry")
    with pytest.raises(grpc.RpcError) as err:
        b.registry.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=lease), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # re-registering replaces the lease: the old one stops working
    old = a.register("pay-svc", "10.0.1.3", 443, ttl=30).lease_id
    new = b.register("pay-svc", "10.0.1.3", 443, ttl=30).lease_id
    assert old != new
    with pytest.raises(grpc.RpcError) as err:
        a.registry.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=old), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    a.registry.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=new), timeout=5)


def test_sidecar_fails_over_between_replicas_by_delta(
    replicas: list[Replica], region_path: Path
) -> None:
    a, b = replicas
    a.register("user-svc", "10.0.0.1", 80)
    a.register("user-svc", "10.0.0.2", 80)
    sidecar = SidecarProc(region_path, [a.address, b.address])
    try:
        sidecar.wait_synced()
        wait_for(lambda: addresses(region_path, "user-svc") == {"10.0.0.1:80", "10.0.0.2:80"})
        epoch = RegionReader(region_path).meta().epoch
        a.kill()  # SIGKILL: the sidecar moves to b, keeping its epoch and revision
        rev = b.register("user-svc", "10.0.0.3", 80).revision
        b.deregister("user-svc", "10.0.0.1", 80)
        wait_for(
            lambda: addresses(region_path, "user-svc") == {"10.0.0.2:80", "10.0.0.3:80"},
            15,
            "the sidecar to follow b",
        )
        meta = sidecar.wait_synced(rev + 1)
        assert meta.epoch == epoch
        counters = dict(meta.counters)
        assert counters.get("full") == 1, counters  # never a full map after the failover
        assert counters.get("checksum_mismatches", 0) == 0, counters
    finally:
        sidecar.close()


def test_history_deltas_and_compaction(etcd3: EtcdCluster, replicas: list[Replica]) -> None:
    a, _ = replicas
    a.register("s1", "10.0.0.1", 80)
    old = a.poll()
    a.register("s2", "10.0.0.1", 80)
    mid = a.poll()
    a.deregister("s1", "10.0.0.1", 80)
    # a replica started later has no local log before its start: it answers from etcd's history
    c = Replica(a.url)
    try:
        ans = c.poll(old.epoch, old.revision)
        assert ans.kind == wire.DELTA
        assert [s.name for s in ans.services] == ["s2"]
        assert ans.removed == ("s1",)
        # compact etcd's history past a subscriber's revision: only a full map can answer it
        latest = a.poll()
        assert c.poll(latest.epoch, latest.revision).kind == wire.NOT_MODIFIED  # c caught up
        from clustermap.server.etcd_store import EtcdStore

        admin = EtcdStore(etcd3.endpoints, "/unused/")
        try:
            admin.compact()
        finally:
            admin.close()
        ans = c.poll(mid.epoch, mid.revision)
        assert ans.kind == wire.FULL
        assert [s.name for s in ans.services] == ["s2"]
        # the replicas' own logs still answer recent revisions by delta after compaction
        rev = a.register("s3", "10.0.0.1", 80).revision
        assert c.poll(ans.epoch, rev).kind == wire.NOT_MODIFIED  # c caught up
        recent = c.poll(ans.epoch, ans.revision)
        assert recent.kind == wire.DELTA
        assert [s.name for s in recent.services] == ["s3"]
    finally:
        c.close()


def test_etcd_member_failure_keeps_service_running(tmp_path: Path, region_path: Path) -> None:
    cluster = start_cluster(3)
    try:
        leader = cluster.leader()
        # a talks to the leader member only (it will lose etcd entirely); b to every member
        a = Replica(f"etcd://{leader.endpoint}/cm-member-kill")
        b = Replica(cluster.url("cm-member-kill"))
        sidecar = SidecarProc(region_path, [a.address, b.address])
        try:
            a.register("user-svc", "10.0.0.1", 80)
            sidecar.wait_synced()
            wait_for(lambda: addresses(region_path, "user-svc") == {"10.0.0.1:80"})
            lease = b.register("user-svc", "10.0.0.9", 80, ttl=30).lease_id
            cluster.kill(leader)  # a new election; a's only member is gone
            b.register("user-svc", "10.0.0.2", 80)
            b.registry.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=lease), timeout=10)
            want = {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.9:80"}
            wait_for(lambda: b.nodes("user-svc") == want, 30, "b to see every registration")
            # a cannot follow etcd any more: it sends the sidecar to b instead of a stale map
            with pytest.raises(grpc.RpcError) as err:
                wait_for(lambda: a.poll() is None, 30, "a to give up")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            wait_for(lambda: addresses(region_path, "user-svc") == want, 30, "the sidecar")
            assert dict(sidecar.wait_synced().counters).get("checksum_mismatches", 0) == 0
        finally:
            sidecar.close()
            a.close()
            b.close()
    finally:
        cluster.close()


def test_watch_streams_follow_changes_made_through_another_replica(
    replicas: list[Replica],
) -> None:
    a, b = replicas
    first = a.register("watch-svc", "10.0.0.1", 80)
    stream = b.sub.Watch(wire.poll_request(), timeout=20)
    try:
        full = wire.poll_answer_from_pb(next(stream))
        assert full.kind == wire.FULL
        a.register("watch-svc", "10.0.0.2", 80)
        delta = wire.poll_answer_from_pb(next(stream))
        assert delta.kind == wire.DELTA
        assert delta.revision > first.revision
        assert [len(s.nodes) for s in delta.services] == [2]
    finally:
        stream.cancel()


def test_a_watching_sidecar_fails_over_between_replicas_without_losing_a_change(
    etcd3: EtcdCluster, region_path: Path
) -> None:
    url = etcd3.url(f"cm-test-{next(_prefixes)}")
    a, b = (Replica(url, "--watch-keepalive", "0.5") for _ in range(2))
    sidecar = SidecarProc(
        region_path, [a.address, b.address], "--watch", env={"CLUSTERMAP_WATCH_SILENCE": "10"}
    )

    def watching(server: str) -> bool:
        m = RegionReader(region_path).meta()
        return m.mode == "watch" and m.server == server and not m.stale

    try:
        a.register("user-svc", "10.0.0.1", 80)
        a.register("user-svc", "10.0.0.2", 80)
        sidecar.wait_synced()
        wait_for(lambda: watching(a.address), 30, "a stream from a")
        wait_for(lambda: addresses(region_path, "user-svc") == {"10.0.0.1:80", "10.0.0.2:80"})
        epoch = RegionReader(region_path).meta().epoch
        fulls = RegionReader(region_path).meta().counters.get("full")
        a.kill()  # SIGKILL mid-stream; changes keep coming through b meanwhile
        b.register("user-svc", "10.0.0.3", 80)
        b.deregister("user-svc", "10.0.0.1", 80)
        b.set("user-svc", "10.0.0.2", 80, weight=7)
        wait_for(lambda: watching(b.address), 60, "a stream from b")
        # every change made while the sidecar moved is there, and one made now comes by b's stream
        before = dict(RegionReader(region_path).meta().counters)
        rev = b.register("user-svc", "10.0.0.4", 80).revision
        want = {"10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"}
        wait_for(lambda: addresses(region_path, "user-svc") == want, 30, "the sidecar to follow b")
        meta = sidecar.wait_synced(rev)
        weights = {n.address: n.weight for n in RegionReader(region_path).service("user-svc").nodes}
        assert weights["10.0.0.2:80"] == 7
        assert meta.epoch == epoch
        counters = dict(meta.counters)
        assert counters.get("full") == fulls, counters  # one history: deltas across replicas
        assert counters.get("checksum_mismatches", 0) == 0, counters
        assert counters.get("watch", 0) > before.get("watch", 0), (before, counters)
    finally:
        sidecar.close()
        a.close()
        b.close()


def test_bad_store_urls_and_unreachable_etcd_are_one_line_errors() -> None:
    import subprocess

    from tests.support.stack import CM_SERVER, dead_address

    out = subprocess.run(
        [CM_SERVER, "--listen", "127.0.0.1:0", "--store", "etcd://nohostport"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("cm-server: --store:")
    assert len(out.stderr.strip().splitlines()) == 1
    with dead_address() as dead:
        out = subprocess.run(
            [CM_SERVER, "--listen", "127.0.0.1:0", "--store", f"etcd://{dead}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 2
    assert "cannot read from etcd" in out.stderr
