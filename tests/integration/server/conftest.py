"""Harness for cm-server integration tests: real processes, real gRPC, no fixed sleeps.

``server(*args)`` starts ``cm-server`` on a free port in its own session (so teardown can
``killpg`` it and anything it spawned) and returns once its health service answers. Everything
else is awaited with :func:`wait_for` (poll a condition until a deadline).

Every test using ``server`` runs against both stores (ids ``[memory]`` and ``[etcd]``): the
etcd variant starts its servers with ``--store etcd://.../<prefix>`` on one single-member etcd
shared by the whole session (started on first use with :mod:`tests.integration.etcd.harness`),
with a key prefix of its own per test, so tests never see each other's data; all servers of one
test share that prefix (a restart keeps the map, as replicas do). Behaviour that is by design
specific to the in-memory store (docs/server.md, "etcd store") is marked
``@pytest.mark.memory_only("reason")``: those tests run on ``memory`` only. Without the ``etcd``
binary the etcd variants are skipped with that reason.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clustermap._pb.clustermap.v1 import (
    inspection_pb2_grpc,
    registry_pb2_grpc,
    subscription_pb2_grpc,
)
from tests.integration.etcd.harness import EtcdCluster, start_cluster
from tests.support.stack import listening_address

T = TypeVar("T")

CM_SERVER = str(Path(sys.executable).with_name("cm-server"))

STORES = ("memory", "etcd")
_prefixes = itertools.count()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that uses ``server`` on each store, ``memory_only`` ones on memory."""
    if "store" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("memory_only")
    if marker is not None and not (
        len(marker.args) == 1 and isinstance(marker.args[0], str) and marker.args[0].strip()
    ):
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: memory_only needs one reason, e.g. "
            '@pytest.mark.memory_only("self-preservation does not apply to etcd")'
        )
    stores = ["memory"] if marker is not None else list(STORES)
    metafunc.parametrize("store", stores, indirect=True)


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str:
    """The store the test's servers use: ``memory`` or ``etcd`` (parametrized above)."""
    return str(request.param)


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """One single-member etcd for the whole session (skips without the ``etcd`` binary)."""
    cluster = start_cluster(1)
    try:
        yield cluster
    finally:
        cluster.close()


def wait_for(condition: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except grpc.RpcError as exc:  # server not there yet, or refusing: keep polling
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last error: {last_exc})")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path
    store: str = "memory"
    credentials: grpc.ChannelCredentials | None = None
    target_name: str | None = None
    channels: list[grpc.Channel] = field(default_factory=list)

    def channel(
        self,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> grpc.Channel:
        creds = credentials or self.credentials
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 256 << 20)]
        if self.target_name:
            options.append(("grpc.ssl_target_name_override", self.target_name))
        if creds is not None:
            if token:
                creds = grpc.composite_channel_credentials(
                    creds, grpc.access_token_call_credentials(token)
                )
            ch = grpc.secure_channel(self.address, creds, options=options)
        else:
            ch = grpc.insecure_channel(self.address, options=options)
            if token:
                ch = grpc.intercept_channel(ch, _TokenClientInterceptor(token))
        self.channels.append(ch)
        return ch

    def registry(self, **kw: Any) -> registry_pb2_grpc.RegistryStub:
        return registry_pb2_grpc.RegistryStub(self.channel(**kw))

    def subscription(self, **kw: Any) -> subscription_pb2_grpc.SubscriptionStub:
        return subscription_pb2_grpc.SubscriptionStub(self.channel(**kw))

    def inspection(self, **kw: Any) -> inspection_pb2_grpc.InspectionStub:
        return inspection_pb2_grpc.InspectionStub(self.channel(**kw))

    def health(self, service: str = "", **kw: Any) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel(**kw))
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(resp.status)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        for ch in self.channels:
            ch.close()


class _TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer`` on plaintext channels (call credentials need TLS)."""

    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        md = [*(details.metadata or ()), self._md]
        return details._replace(metadata=md)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


@pytest.fixture
def server(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Server]]:
    """Factory: ``server("--heartbeat-ttl", "0.5", ...)`` → a running, answering cm-server on
    the test's store (``--store`` added unless given)."""
    started: list[Server] = []
    store_args: list[str] = []
    if store == "etcd":
        cluster: EtcdCluster = request.getfixturevalue("etcd_cluster")
        prefix = f"cm-test/{os.getpid()}-{next(_prefixes)}"
        store_args = ["--store", cluster.url(prefix)]

    def start(
        *args: str,
        credentials: grpc.ChannelCredentials | None = None,
        target_name: str | None = None,
        env: dict[str, str] | None = None,
        wait_health: str = "clustermap.v1.Registry",
        port: int | None = None,
    ) -> Server:
        # Port 0 unless told: the server binds a free port itself and logs it. A port chosen
        # here could be taken by another test's server before ours binds it, and the health
        # check below would then be answered by that other server.
        log_path = tmp_path / f"server-{len(started)}.log"
        cmd = [CM_SERVER, "--listen", f"127.0.0.1:{port or 0}", *args]
        if "--store" not in args:
            cmd += store_args
        if "--warmup" not in args:
            cmd += ["--warmup", "0"]
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                cmd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        srv = Server(proc, f"127.0.0.1:{port}", log_path, store, credentials, target_name)
        started.append(srv)

        def listening() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"cm-server exited with {proc.returncode}:\n{srv.log()}")
            return listening_address(srv.log())

        if not port:
            srv.address = wait_for(listening, 60, "cm-server to listen")
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if srv.health(wait_health) == health_pb2.HealthCheckResponse.SERVING:
                    return srv
            except grpc.RpcError:
                time.sleep(0.02)
        if proc.poll() is None:
            raise AssertionError(f"cm-server did not become healthy:\n{srv.log()}")
        raise AssertionError(f"cm-server exited with {proc.returncode}:\n{srv.log()}")

    yield start
    for srv in started:
        srv.kill()
