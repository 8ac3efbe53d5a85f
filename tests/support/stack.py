"""Real cm-server and cm-sidecar processes for integration tests.

Each runs in its own session, on a free port / a fresh region, and is killed as a group on
teardown. Readiness and every later state are awaited by condition (health answers, the region's
revision), never by fixed sleeps.
"""

from __future__ import annotations

import contextlib
import re
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clustermap._pb.clustermap.v1 import registry_pb2, registry_pb2_grpc
from clustermap.errors import ClusterMapError
from clustermap.region.layout import Meta
from clustermap.region.reader import RegionReader
from tests.support.procs import Child, python_env, wait_for

BIN = Path(sys.executable).parent
CM_SERVER = str(BIN / "cm-server")
CM_SIDECAR = str(BIN / "cm-sidecar")
CMCTL = str(BIN / "cmctl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def dead_address() -> Iterator[str]:
    """An address where connections are refused for as long as the block runs: the port is
    bound (so no other process can take it) but never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


def listening_address(log: str) -> str | None:
    """The address a cm-server logged it listens on (key=value lines, or JSON with
    ``--log-format json``), or None before it did: a server started on port 0 binds a free port
    itself, so no other process can take the port between our choosing and its binding it."""
    found = re.search(r"event=listening address=(\S+)", log) or re.search(
        r'"event":"listening","address":"([^"]+)"', log
    )
    return found.group(1) if found else None


class ServerProc:
    """A real ``cm-server`` on a free port (or a given one, to restart "the same" server)."""

    def __init__(
        self, *args: str, port: int | None = None, ttl: float = 1.0, warmup: float = 0.2
    ) -> None:
        # Port 0 unless told: the server takes a free port itself and logs it, so no other
        # process can take the port between our choosing it and the server binding it.
        self.address = f"127.0.0.1:{port or 0}"
        self.argv = [
            CM_SERVER,
            "--listen",
            self.address,
            "--heartbeat-ttl",
            str(ttl),
            "--warmup",
            str(warmup),
            *args,
        ]
        self.child = Child(self.argv, env=python_env())
        if not port:
            try:
                self.address = wait_for(self._listening, 60, "cm-server to listen")
            except BaseException:
                self.child.close()
                raise
        self.port = int(self.address.rpartition(":")[2])
        # With a given port the channel may be made before the server listens (a restart): its
        # first connects fail, and gRPC's default reconnect backoff (1 s, growing to 120 s)
        # would then space the health checks out past the wait below on a loaded machine. Keep
        # retrying connects quickly instead (not via grpc.min_reconnect_backoff_ms: that is also
        # each attempt's connect timeout).
        self._channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 50),
                ("grpc.max_reconnect_backoff_ms", 500),
            ],
        )
        health = health_pb2_grpc.HealthStub(self._channel)

        def serving() -> bool:
            if self.child.proc.poll() is not None:
                raise AssertionError(f"cm-server exited: {self.child.stderr()}")
            try:
                resp = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            except grpc.RpcError:
                return False
            return resp.status == health_pb2.HealthCheckResponse.SERVING

        try:
            wait_for(serving, 60, "cm-server to serve")
        except AssertionError as exc:  # say what the server said meanwhile
            self.close()
            raise AssertionError(f"{exc}; cm-server's log:\n{self.child.stderr()}") from None
        except BaseException:  # no one holds this object yet to close it: leak no process
            self.close()
            raise
        self.registry = registry_pb2_grpc.RegistryStub(self._channel)

    def _listening(self) -> str | None:
        if self.child.proc.poll() is not None:
            raise AssertionError(f"cm-server exited: {self.child.stderr()}")
        return listening_address(self.child.stderr())

    def register(
        self, service: str, host: str, port: int, weight: int = 1, ttl: float = 0.0, **meta: str
    ) -> registry_pb2.RegisterResponse:
        return self.registry.Register(
            registry_pb2.RegisterRequest(
                service=service, host=host, port=port, weight=weight, meta=meta, ttl_seconds=ttl
            ),
            timeout=5,
        )

    def deregister(self, service: str, host: str, port: int) -> None:
        self.registry.Deregister(
            registry_pb2.DeregisterRequest(service=service, host=host, port=port), timeout=5
        )

    def set(self, service: str, host: str, port: int, **fields: Any) -> None:
        self.registry.UpdateNode(
            registry_pb2.UpdateNodeRequest(service=service, host=host, port=port, **fields),
            timeout=5,
        )

    def kill(self) -> None:
        self._channel.close()
        self.child.kill()

    def close(self) -> None:
        self._channel.close()
        self.child.close()


class SidecarProc:
    """A real ``cm-sidecar`` publishing ``region`` from ``servers``."""

    def __init__(
        self,
        region: Path,
        servers: Sequence[str],
        *args: str,
        interval: float = 0.1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.region = region
        self.argv = [
            CM_SIDECAR,
            "--region",
            str(region),
            "--interval",
            str(interval),
            *[a for s in servers for a in ("--server", s)],
            *args,
        ]
        self.child = Child(
            self.argv,
            env=python_env(
                CLUSTERMAP_BACKOFF_BASE="0.1", CLUSTERMAP_BACKOFF_MAX="0.5", **(env or {})
            ),
        )

    @property
    def pid(self) -> int:
        return self.child.pid

    def meta(self) -> Meta | None:
        with contextlib.suppress(ClusterMapError):
            return RegionReader(self.region).meta()
        return None

    def wait_synced(self, revision: int = 1, timeout: float = 30) -> Meta:
        """Until the region is at ``revision`` or later and fresh."""

        def synced() -> Meta | None:
            if self.child.proc.poll() is not None:
                raise AssertionError(f"cm-sidecar exited: {self.child.stderr()}")
            m = self.meta()
            return m if m is not None and m.revision >= revision and not m.stale else None

        return wait_for(synced, timeout, f"the sidecar to sync revision {revision}")

    def kill(self) -> None:
        self.child.kill()

    def close(self) -> None:
        self.child.close()


@contextlib.contextmanager
def running(*procs: ServerProc | SidecarProc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.close()
