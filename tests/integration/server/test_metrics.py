"""The optional Prometheus endpoint of a real cm-server."""

from __future__ import annotations

import urllib.request

from clustermap._pb.clustermap.v1 import registry_pb2, subscription_pb2
from tests.integration.server.conftest import free_port, wait_for


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("clustermap_server_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_endpoint(server):
    port = free_port()
    srv = server("--metrics-listen", f"127.0.0.1:{port}", "--heartbeat-ttl", "0.3")
    srv.registry().Register(registry_pb2.RegisterRequest(service="a", host="h", port=1))
    srv.registry().Register(
        registry_pb2.RegisterRequest(service="b", host="h", port=1, ttl_seconds=0)
    )
    srv.subscription().Poll(subscription_pb2.PollRequest())
    m = wait_for(lambda: scrape(port), what="metrics endpoint")
    assert m["clustermap_server_ready"] == 1
    assert m["clustermap_server_self_preservation"] == 0
    assert m['clustermap_server_polls_total{kind="full"}'] == 1
    # counted on both stores: in memory where the registry expires the lease, with etcd from
    # the watch (a delete no request made: etcd expired the lease)
    wait_for(
        lambda: scrape(port).get("clustermap_server_leases_expired_total") == 1,
        what="expiry counted",
    )
    m = scrape(port)
    assert m["clustermap_server_services"] == 1
    ans = srv.subscription().Poll(subscription_pb2.PollRequest())
    assert m["clustermap_server_revision"] == ans.revision
    if srv.store == "memory":
        assert ans.revision == 3
