"""Real etcd clusters for tests: members on free loopback ports, data in temp dirs, each member a
:class:`tests.support.procs.Child` (own session, stderr to a file, killed as a group).

Tests skip with a clear reason when the ``etcd`` binary is missing (CI installs Debian's
``etcd-server``; see scripts/test).
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from clustermap._pb.etcd.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from tests.support.procs import Child

ETCD = shutil.which("etcd")


def require_etcd() -> str:
    if ETCD is None:
        pytest.skip("the etcd binary is not installed (apt-get install etcd-server)")
    return ETCD


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    child: Child | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"


@dataclass
class EtcdCluster:
    members: list[Member]
    root: Path
    argv: dict[str, list[str]] = field(default_factory=dict)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def url(self, prefix: str = "") -> str:
        return "etcd://" + ",".join(self.endpoints) + (f"/{prefix}" if prefix else "")

    def start_member(self, m: Member) -> None:
        m.child = Child(self.argv[m.name])

    def kill(self, m: Member) -> None:
        if m.child is not None:
            m.child.kill()
            m.child = None

    def status(self, m: Member, timeout: float = 1.0) -> rpc_pb2.StatusResponse | None:
        with grpc.insecure_channel(m.endpoint) as ch:
            try:
                return rpc_pb2_grpc.MaintenanceStub(ch).Status(
                    rpc_pb2.StatusRequest(), timeout=timeout
                )
            except grpc.RpcError:
                return None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every running member answers and a leader is elected."""
        deadline = time.monotonic() + timeout
        while True:
            live = [m for m in self.members if m.child is not None]
            statuses = [self.status(m) for m in live]
            if all(s is not None and s.leader for s in statuses):
                return
            for m in live:
                assert m.child is not None
                if m.child.proc.poll() is not None:
                    raise AssertionError(f"etcd {m.name} exited: {m.child.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError("etcd cluster did not become ready")
            time.sleep(0.05)

    def leader(self) -> Member:
        for m in self.members:
            if m.child is None:
                continue
            st = self.status(m)
            if st is not None and st.leader == st.header.member_id:
                return m
        raise AssertionError("no etcd leader")

    def close(self) -> None:
        for m in self.members:
            if m.child is not None:
                m.child.close()
                m.child = None
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(size: int = 1) -> EtcdCluster:
    binary = require_etcd()
    root = Path(tempfile.mkdtemp(prefix="cm-etcd-"))
    for _attempt in range(3):
        ports = free_ports(2 * size)
        members = [
            Member(f"m{i}", ports[2 * i], ports[2 * i + 1], root / f"m{i}-{ports[2 * i]}")
            for i in range(size)
        ]
        initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in members)
        cluster = EtcdCluster(members, root)
        for m in members:
            cluster.argv[m.name] = [
                binary,
                "--name", m.name,
                "--data-dir", str(m.data_dir),
                "--listen-client-urls", f"http://127.0.0.1:{m.client_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{m.client_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-cluster", initial,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", f"cm-test-{ports[0]}",
                "--heartbeat-interval", "25",
                "--election-timeout", "250",
                "--logger", "zap",
                "--log-level", "warn",
            ]  # fmt: skip
        try:
            for m in members:
                cluster.start_member(m)
            cluster.wait_ready()
            return cluster
        except AssertionError:
            logs = "\n".join(m.child.stderr()[-500:] for m in members if m.child is not None)
            for m in members:
                if m.child is not None:
                    m.child.close()
                    m.child = None
            if "address already in use" not in logs:
                shutil.rmtree(root, ignore_errors=True)
                raise
    shutil.rmtree(root, ignore_errors=True)
    raise AssertionError("could not start etcd on free ports")
