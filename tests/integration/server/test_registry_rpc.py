"""Registry RPCs against a real cm-server: register, heartbeat, expiry, deregister, update."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from clustermap._pb.clustermap.v1 import (
    inspection_pb2,
    map_pb2,
    registry_pb2,
    subscription_pb2,
)
from tests.integration.server.conftest import wait_for


def names(srv) -> list[str]:
    resp = srv.inspection().ListServices(inspection_pb2.ListServicesRequest(), timeout=5)
    return [s.name for s in resp.services]


def nodes(srv, service: str) -> list[tuple[str, int, int, int]]:
    try:
        resp = srv.inspection().GetService(inspection_pb2.GetServiceRequest(name=service))
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return []
        raise
    return [(n.host, n.port, n.weight, n.status) for n in resp.service.nodes]


def test_register_returns_lease_and_publishes_node(server):
    srv = server()
    resp = srv.registry().Register(
        registry_pb2.RegisterRequest(
            service="user-svc", host="10.0.0.1", port=8080, weight=3, meta={"zone": "a"}
        )
    )
    if srv.store == "memory":
        assert len(resp.lease_id) == 32
        assert resp.revision == 1
    else:  # etcd's lease id (an int64 in hex) and etcd's revision
        assert resp.lease_id
    assert resp.ttl_seconds == 10.0
    assert srv.subscription().Poll(subscription_pb2.PollRequest()).revision == resp.revision
    assert resp.node.status == map_pb2.NODE_STATUS_UP
    assert nodes(srv, "user-svc") == [("10.0.0.1", 8080, 3, map_pb2.NODE_STATUS_UP)]
    svc = srv.inspection().GetService(inspection_pb2.GetServiceRequest(name="user-svc")).service
    assert dict(svc.nodes[0].meta) == {"zone": "a"}
    assert svc.nodes[0].origin == map_pb2.NODE_ORIGIN_REGISTERED


def test_heartbeat_keeps_a_lease_alive_and_silence_expires_it(server):
    # A TTL far above the heartbeat period (0.1 s plus a call): only missing heartbeats, not a
    # busy machine delaying one, can let the lease lapse.
    srv = server("--heartbeat-ttl", "1.5")
    reg = srv.registry()
    first = reg.Register(registry_pb2.RegisterRequest(service="a", host="h1", port=1))
    lease, ttl = first.lease_id, first.ttl_seconds
    if srv.store == "memory":
        assert ttl == 1.5
    else:  # etcd rounds TTLs up to whole seconds and its minimum
        assert ttl >= 1.5
        assert ttl == int(ttl)
    start = time.monotonic()
    while time.monotonic() - start < 2 * ttl:  # two TTLs: the first grant alone would be gone
        assert reg.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=lease)).ttl_seconds == ttl
        assert names(srv) == ["a"]
        time.sleep(0.1)
    wait_for(lambda: names(srv) == [], timeout=30, what="lease expiry")
    with pytest.raises(grpc.RpcError) as err:
        reg.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=lease))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    if srv.store == "memory":  # with etcd, expiry is etcd's: the replicas do not log it
        assert "expired" in srv.log()


def test_ttl_zero_never_expires_and_explicit_ttl_overrides_default(server):
    srv = server("--heartbeat-ttl", "5")
    reg = srv.registry()
    perm = reg.Register(
        registry_pb2.RegisterRequest(service="perm", host="h", port=1, ttl_seconds=0)
    )
    assert perm.lease_id == ""
    assert perm.ttl_seconds == 0
    short = reg.Register(
        registry_pb2.RegisterRequest(service="short", host="h", port=1, ttl_seconds=0.3)
    )
    if srv.store == "memory":
        assert short.ttl_seconds == pytest.approx(0.3)
    else:  # etcd rounds TTLs up to whole seconds and its minimum
        assert short.ttl_seconds >= 1
    wait_for(lambda: names(srv) == ["perm"], timeout=30, what="short lease to expire")


def test_reregister_replaces_node_and_lease(server):
    srv = server()
    reg = srv.registry()
    first = reg.Register(registry_pb2.RegisterRequest(service="a", host="h", port=1, weight=1))
    second = reg.Register(registry_pb2.RegisterRequest(service="a", host="h", port=1, weight=7))
    assert second.lease_id != first.lease_id
    assert nodes(srv, "a") == [("h", 1, 7, map_pb2.NODE_STATUS_UP)]
    with pytest.raises(grpc.RpcError) as err:
        reg.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=first.lease_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # an identical re-registration writes the node again (to attach the new lease: a new
    # revision, on both stores) but leaves its content and the map's checksum as they were
    before = srv.subscription().Poll(subscription_pb2.PollRequest()).checksum
    third = reg.Register(registry_pb2.RegisterRequest(service="a", host="h", port=1, weight=7))
    assert nodes(srv, "a") == [("h", 1, 7, map_pb2.NODE_STATUS_UP)]
    assert third.revision > second.revision
    assert srv.subscription().Poll(subscription_pb2.PollRequest()).checksum == before


def test_deregister(server):
    srv = server()
    reg = srv.registry()
    reg.Register(registry_pb2.RegisterRequest(service="a", host="h", port=1))
    reg.Register(registry_pb2.RegisterRequest(service="a", host="h", port=2))
    reg.Deregister(registry_pb2.DeregisterRequest(service="a", host="h", port=1))
    assert [n[1] for n in nodes(srv, "a")] == [2]
    reg.Deregister(registry_pb2.DeregisterRequest(service="a", host="h", port=2))
    assert names(srv) == []
    with pytest.raises(grpc.RpcError) as err:
        reg.Deregister(registry_pb2.DeregisterRequest(service="a", host="h", port=2))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_update_node_overrides_weight_and_status(server):
    srv = server()
    reg = srv.registry()
    reg.Register(registry_pb2.RegisterRequest(service="a", host="h", port=1, weight=5))
    r = reg.UpdateNode(
        registry_pb2.UpdateNodeRequest(
            service="a", host="h", port=1, status=map_pb2.NODE_STATUS_DRAIN
        )
    )
    assert r.node.status == map_pb2.NODE_STATUS_DRAIN
    assert r.node.weight == 5
    r = reg.UpdateNode(registry_pb2.UpdateNodeRequest(service="a", host="h", port=1, weight=0))
    assert r.node.weight == 0
    assert r.node.status == map_pb2.NODE_STATUS_DRAIN
    # the operator's decision survives the node re-registering
    reg.Register(registry_pb2.RegisterRequest(service="a", host="h", port=1, weight=5))
    assert nodes(srv, "a") == [("h", 1, 0, map_pb2.NODE_STATUS_DRAIN)]
    r = reg.UpdateNode(
        registry_pb2.UpdateNodeRequest(service="a", host="h", port=1, status=map_pb2.NODE_STATUS_UP)
    )
    assert r.node.status == map_pb2.NODE_STATUS_UP
    with pytest.raises(grpc.RpcError) as err:
        reg.UpdateNode(registry_pb2.UpdateNodeRequest(service="a", host="h", port=9, weight=1))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


BAD = [
    ({"service": "", "host": "h", "port": 1}, "service name is empty"),
    ({"service": "x" * 129, "host": "h", "port": 1}, "longer than 128"),
    ({"service": "bad name", "host": "h", "port": 1}, "service name"),
    ({"service": "a", "host": "", "port": 1}, "host is empty"),
    ({"service": "a", "host": "not a host!", "port": 1}, "valid DNS name"),
    ({"service": "a", "host": "300.1.2.3", "port": 1}, "valid DNS name"),
    ({"service": "a", "host": "h" * 254, "port": 1}, "longer than 253"),
    ({"service": "a", "host": "h", "port": 0}, "port"),
    ({"service": "a", "host": "h", "port": 65536}, "port"),
    ({"service": "a", "host": "h", "port": 1, "weight": -1}, "weight"),
    ({"service": "a", "host": "h", "port": 1, "weight": 10**9}, "weight"),
    ({"service": "a", "host": "h", "port": 1, "meta": {f"k{i}": "v" for i in range(33)}}, "meta"),
    ({"service": "a", "host": "h", "port": 1, "meta": {"k": "v" * 600}}, "meta value"),
    ({"service": "a", "host": "h", "port": 1, "meta": {"": "v"}}, "meta key"),
    ({"service": "a", "host": "h", "port": 1, "ttl_seconds": -1}, "ttl"),
    ({"service": "a", "host": "h", "port": 1, "ttl_seconds": 1e9}, "ttl"),
    ({"service": "a", "host": "h", "port": 1, "ttl_seconds": float("nan")}, "ttl"),
]


def test_invalid_registrations_are_rejected_with_reason_and_store_nothing(server):
    srv = server()
    reg = srv.registry()
    before = srv.subscription().Poll(subscription_pb2.PollRequest()).revision
    assert before == 0 or srv.store != "memory"
    for fields, why in BAD:
        with pytest.raises(grpc.RpcError) as err:
            reg.Register(registry_pb2.RegisterRequest(**fields))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert why in err.value.details(), (fields, err.value.details())
    ans = srv.subscription().Poll(subscription_pb2.PollRequest())
    assert ans.revision == before
    assert list(ans.services) == []
    with pytest.raises(grpc.RpcError) as err:
        reg.UpdateNode(registry_pb2.UpdateNodeRequest(service="a", host="h", port=1, status=99))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        reg.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_request_is_refused_by_message_limit(server):
    srv = server("--max-recv-bytes", "65536")
    with pytest.raises(grpc.RpcError) as err:
        srv.registry().Register(
            registry_pb2.RegisterRequest(service="a", host="h", port=1, meta={"k": "v" * 100_000})
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_ipv6_and_dns_hosts_are_normalised(server):
    srv = server()
    reg = srv.registry()
    reg.Register(registry_pb2.RegisterRequest(service="a", host="0:0::1", port=1))
    reg.Register(registry_pb2.RegisterRequest(service="a", host="Web-1.Example.COM.", port=1))
    assert sorted(n[0] for n in nodes(srv, "a")) == ["::1", "web-1.example.com"]


def test_concurrent_registers_are_each_visible_at_once_on_their_server(server):
    """Read-your-writes under concurrency: each Register's answer comes with its revision, and
    a Poll and GetService on the same server right after it already show the node (with etcd a
    register is folded into the map from its own commit when it can be, or waits for the
    watch). With etcd, a second replica reaches the same map and checksum."""
    srv = server()
    replica = server() if srv.store == "etcd" else None  # following the same prefix from now
    errors: list[str] = []

    def client(t: int) -> None:
        reg, sub, insp = srv.registry(), srv.subscription(), srv.inspection()
        for i in range(8):
            host = f"10.9.{t}.{i}"
            resp = reg.Register(
                registry_pb2.RegisterRequest(service=f"rw-{i % 2}", host=host, port=80), timeout=30
            )
            revision = sub.Poll(subscription_pb2.PollRequest(), timeout=30).revision
            svc = insp.GetService(inspection_pb2.GetServiceRequest(name=f"rw-{i % 2}"), timeout=30)
            if revision < resp.revision or host not in {n.host for n in svc.service.nodes}:
                errors.append(f"{host}: registered at {resp.revision}, poll at {revision}")

    threads = [threading.Thread(target=client, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert sorted(len(nodes(srv, f"rw-{k}")) for k in (0, 1)) == [24, 24]
    if replica is not None:
        mine = srv.subscription().Poll(subscription_pb2.PollRequest(), timeout=30)
        wait_for(
            lambda: (
                replica.subscription().Poll(subscription_pb2.PollRequest()).checksum
                == mine.checksum
            ),
            30,
            "the other replica to reach the same map",
        )
