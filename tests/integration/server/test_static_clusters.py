"""Static clusters from --clusters FILE.toml, checked by real TCP and HTTP probes."""

from __future__ import annotations

import http.server
import socket
import threading

import grpc
import pytest

from clustermap._pb.clustermap.v1 import inspection_pb2, map_pb2, registry_pb2
from tests.integration.server.conftest import free_port, wait_for

UP, DOWN = map_pb2.NODE_STATUS_UP, map_pb2.NODE_STATUS_DOWN


def statuses(srv, service: str) -> dict[int, int]:
    try:
        resp = srv.inspection().GetService(inspection_pb2.GetServiceRequest(name=service))
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return {}
        raise
    return {n.port: n.status for n in resp.service.nodes}


def listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(4096)
    return s


def test_tcp_probe_marks_down_not_removed_and_back_up(server, tmp_path):
    live_port, dead_port = free_port(), free_port()
    listener = listen(live_port)
    clusters = tmp_path / "clusters.toml"
    clusters.write_text(
        f"""
[clusters.db]
strategy = "weighted"
panic_threshold = 0.5
meta = {{ team = "data" }}
nodes = [
  {{ host = "127.0.0.1", port = {live_port}, weight = 5, meta = {{ role = "primary" }} }},
  "127.0.0.1:{dead_port}",
]
[clusters.db.probe]
type = "tcp"
interval = 0.1
timeout = 0.5
rise = 2
fall = 2
"""
    )
    srv = server("--clusters", str(clusters))
    try:
        wait_for(
            lambda: statuses(srv, "db") == {live_port: UP, dead_port: DOWN},
            what="first probe verdicts",
        )
        svc = srv.inspection().GetService(inspection_pb2.GetServiceRequest(name="db")).service
        assert svc.strategy == "weighted"
        assert svc.panic_threshold == 0.5
        assert dict(svc.meta) == {"team": "data"}
        live = next(n for n in svc.nodes if n.port == live_port)
        assert live.weight == 5
        assert dict(live.meta) == {"role": "primary"}
        assert live.origin == map_pb2.NODE_ORIGIN_STATIC
        listener.close()
        wait_for(lambda: statuses(srv, "db")[live_port] == DOWN, what="fall to down")
        assert set(statuses(srv, "db")) == {live_port, dead_port}  # down, not removed
        listener = listen(live_port)
        wait_for(lambda: statuses(srv, "db")[live_port] == UP, what="rise to up")
    finally:
        listener.close()
    # static nodes belong to the file: the registry refuses to replace or remove them
    reg = srv.registry()
    with pytest.raises(grpc.RpcError) as err:
        reg.Deregister(
            registry_pb2.DeregisterRequest(service="db", host="127.0.0.1", port=live_port)
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        reg.Register(registry_pb2.RegisterRequest(service="db", host="127.0.0.1", port=live_port))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # an operator can still drain it, and registered nodes can join the same service
    reg.UpdateNode(
        registry_pb2.UpdateNodeRequest(
            service="db", host="127.0.0.1", port=live_port, status=map_pb2.NODE_STATUS_DRAIN
        )
    )
    assert statuses(srv, "db")[live_port] == map_pb2.NODE_STATUS_DRAIN
    reg.Register(registry_pb2.RegisterRequest(service="db", host="127.0.0.2", port=1))
    assert len(statuses(srv, "db")) == 3


class _Health(http.server.BaseHTTPRequestHandler):
    healthy = True

    def do_GET(self) -> None:
        ok = self.path == "/healthz" and type(self).healthy
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_http_probe_follows_status_code(server, tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    port = httpd.server_address[1]
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    clusters = tmp_path / "clusters.toml"
    clusters.write_text(
        f"""
[clusters.web]
nodes = ["127.0.0.1:{port}"]
probe = {{ type = "http", path = "/healthz", interval = 0.1, timeout = 0.5, rise = 1, fall = 1 }}
"""
    )
    try:
        srv = server("--clusters", str(clusters))
        wait_for(lambda: statuses(srv, "web") == {port: UP}, what="http up")
        _Health.healthy = False
        wait_for(lambda: statuses(srv, "web") == {port: DOWN}, what="http 503 → down")
        _Health.healthy = True
        wait_for(lambda: statuses(srv, "web") == {port: UP}, what="http back up")
    finally:
        _Health.healthy = True
        httpd.shutdown()
        httpd.server_close()
