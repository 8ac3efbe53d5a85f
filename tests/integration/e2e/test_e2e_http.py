"""gunicorn running ``client/example_app.py``, whose ``/call`` goes through
``clustermap.http.Session``, against real HTTP backends, a real cm-server and cm-sidecar."""

from __future__ import annotations

import http.client
import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

import clustermap
from clustermap.errors import ClusterMapError
from tests.integration.e2e.web import Gunicorn, hostport
from tests.integration.http_clients.harness import backends
from tests.support.procs import python_env, wait_for
from tests.support.stack import CMCTL, ServerProc, SidecarProc, dead_address


def call(port: int, **params: str) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/call?" + urlencode(params), headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def ejected(region: Path) -> set[str]:
    out = subprocess.run(
        [CMCTL, "--region", str(region), "status", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=python_env(),
    ).stdout
    return {e["address"] for e in json.loads(out)["ejected"]}


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_the_example_app_calls_a_service_through_the_session(
    server: ServerProc, sidecar: SidecarProc, region_path: Path, worker_class: str
) -> None:
    with dead_address() as dead, backends("ok", "ok") as bs:
        for address in (dead, *(b.address for b in bs)):
            server.register("echo-svc", *hostport(address))
        cm = clustermap.open(region_path)

        def published() -> bool:
            try:
                return len(cm.service("echo-svc").nodes) == 3
            except ClusterMapError:
                return False

        wait_for(published, 15, "echo-svc in the map")
        web = Gunicorn(region_path, worker_class, workers=2, preload=True)
        try:
            web.wait_ready()
            seen: Counter[int] = Counter()
            for _ in range(60):
                status, body = call(web.port, service="echo-svc", path="/hello")
                # The dead node costs no request: the Session retried it on a live one.
                assert (status, body["status"]) == (200, 200), body
                backend = json.loads(body["body"])
                assert backend["host"] == "echo-svc"
                assert backend["path"] == "/hello"
                seen[backend["port"]] += 1
                if dead in ejected(region_path) and len(seen) == 2:
                    break
            assert set(seen) == {b.port for b in bs}
            wait_for(lambda: dead in ejected(region_path), 15, "the dead node to be ejected")
            status, body = call(web.port, service="no-such-svc", path="/")
            assert status == 502  # not a service: sent as is, and "no-such-svc" does not resolve
        finally:
            web.close()
