"""The HTTP glue's test harness: a real cm-server and cm-sidecar, real HTTP backends.

Backends are threaded ``http.server`` instances on free ports.

Each backend answers JSON ``{"port", "path", "host", "attempt", "method"}`` and behaves as its
``mode`` says: ``ok``, ``503`` (every answer a 503), ``slow-retries`` (503 at once to a first
attempt, 503 after ``hold`` seconds to a retry). ``/redirect?to=URL`` answers 302 to ``URL``.
It counts what it saw, and the most retries it held at once.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import clustermap
from clustermap.errors import ClusterMapError
from clustermap.model import parse_address
from tests.support.procs import Child, python_env, wait_for
from tests.support.stack import CMCTL, ServerProc, SidecarProc

__all__ = ["Backend", "ProcBackend", "Stack", "backends", "certificate"]


class Backend:
    def __init__(
        self, mode: str = "ok", hold: float = 1.0, tls: tuple[str, str] | None = None
    ) -> None:
        self.mode = mode
        self.hold = hold
        self.lock = threading.Lock()
        self.requests: list[dict[str, object]] = []
        self.retries_now = 0
        self.retries_max = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                backend.handle(self)

            do_POST = do_PUT = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:  # HTTPS with this (certificate, key)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        if length:
            h.rfile.read(length)
        attempt = int(h.headers.get("X-ClusterMap-Attempt") or 0)
        seen = {
            "port": self.port,
            "path": h.path,
            "host": h.headers.get("Host"),
            "attempt": attempt,
            "method": h.command,
        }
        with self.lock:
            self.requests.append(seen)
            if attempt > 1:
                self.retries_now += 1
                self.retries_max = max(self.retries_max, self.retries_now)
        try:
            parts = urlsplit(h.path)
            if parts.path == "/redirect":
                self.answer(h, 302, {}, {"Location": parse_qs(parts.query)["to"][0]})
            elif self.mode == "503" or (self.mode == "slow-retries" and attempt <= 1):
                self.answer(h, 503, seen)
            elif self.mode == "slow-retries":
                time.sleep(self.hold)  # a node that is slow to fail: retries pile up here
                self.answer(h, 503, seen)
            else:
                self.answer(h, 200, seen)
        finally:
            if attempt > 1:
                with self.lock:
                    self.retries_now -= 1

    @staticmethod
    def answer(
        h: BaseHTTPRequestHandler,
        status: int,
        body: dict[str, object],
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def backends(
    *modes: str, hold: float = 1.0, tls: tuple[str, str] | None = None
) -> Iterator[list[Backend]]:
    made = [Backend(m, hold, tls) for m in modes]
    try:
        yield made
    finally:
        for b in made:
            b.close()


class Stack:
    """A real cm-server and cm-sidecar (feedback on) publishing ``region``."""

    def __init__(self, region: Path) -> None:
        self.region = region
        self.server = ServerProc()
        self.server.register("placeholder", "127.0.0.1", 1)
        self.sidecar = SidecarProc(region, [self.server.address], interval=0.1)
        self.sidecar.wait_synced()
        wait_for(lambda: Path(str(region) + ".load").exists(), 10, "the load file")
        self.map = clustermap.open(region)

    def publish(self, service: str, *addresses: str) -> None:
        """Register ``addresses`` as ``service`` and wait until the map has them all."""
        for a in addresses:
            host, port = parse_address(a)
            self.server.register(service, host, port)

        def there() -> bool:
            try:
                have = {n.address for n in self.map.service(service).nodes}
            except ClusterMapError:
                return False
            return have == set(addresses)

        wait_for(there, 15, f"{service} in the map")

    def ejected(self) -> set[str]:
        out = subprocess.run(
            [CMCTL, "--region", str(self.region), "status", "--json"],
            capture_output=True,
            text=True,
            check=True,
            env=python_env(),
        ).stdout
        return {e["address"] for e in json.loads(out)["ejected"]}

    def close(self) -> None:
        self.sidecar.close()
        self.server.close()


def certificate(directory: Path, name: str) -> tuple[str, str]:
    """A self-signed certificate for the DNS name ``name`` (and nothing else): (cert, key)."""
    cert, key = str(directory / f"{name}.crt"), str(directory / f"{name}.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


PROC_BACKEND = """
import json, socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        data = json.dumps({"port": self.server.server_address[1],
                           "host": self.headers.get("Host")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
s.daemon_threads = True
print(s.server_address[1], flush=True)
s.serve_forever()
"""


class ProcBackend:
    """An HTTP backend in its own process, to be SIGKILLed."""

    def __init__(self) -> None:
        self.child = Child.python("-c", PROC_BACKEND)
        self.port = int(self.child.readline())
        self.address = f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.child.kill()

    def close(self) -> None:
        self.child.close()
