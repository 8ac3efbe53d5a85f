"""Static clusters with several cm-server replicas on one real 3-member etcd: one replica (the
election's leader) probes and writes verdicts; SIGKILLed, another takes over and probing goes on.

(The fence that refuses a deposed leader's late verdict is tested in process, where the old
leader can be held still: test_etcd_store.py::test_a_deposed_leaders_late_verdict_is_refused.)
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from clustermap import wire
from clustermap._pb.clustermap.v1 import subscription_pb2_grpc
from clustermap._pb.etcd.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from clustermap.server.etcd_codec import Keys, prefix_end
from tests.integration.etcd.harness import EtcdCluster, free_ports, start_cluster
from tests.support.procs import wait_for
from tests.support.stack import ServerProc

_prefixes = itertools.count()
TTL = 2  # the replicas' heartbeat TTL, which is also their election lease's


@pytest.fixture(scope="module")
def etcd3() -> Iterator[EtcdCluster]:
    c = start_cluster(3)
    yield c
    c.close()


class Backend:
    """A TCP backend that accepts (and drops) every connection, so probes never fill its
    backlog however long the test runs."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def listen(port: int) -> Backend:
    return Backend(port)


def statuses(server: ServerProc) -> dict[int, str]:
    stub = subscription_pb2_grpc.SubscriptionStub(server._channel)
    ans = wire.poll_answer_from_pb(stub.Poll(wire.poll_request("", 0), timeout=5))
    return {n.port: n.status for s in ans.services if s.name == "db" for n in s.nodes}


def leader_name(etcd: EtcdCluster, prefix: str) -> str | None:
    """The election's leader as etcd has it: the oldest key under P leader/."""
    root = Keys(prefix).leader
    with grpc.insecure_channel(etcd.endpoints[0]) as ch:
        resp = rpc_pb2_grpc.KVStub(ch).Range(
            rpc_pb2.RangeRequest(
                key=root,
                range_end=prefix_end(root),
                sort_target=rpc_pb2.RangeRequest.CREATE,
                sort_order=rpc_pb2.RangeRequest.ASCEND,
                limit=1,
            ),
            timeout=5,
        )
    return resp.kvs[0].value.decode() if resp.kvs else None


def test_one_replica_probes_and_another_takes_over_when_it_dies(
    etcd3: EtcdCluster, tmp_path: Path
) -> None:
    live_port, dead_port = free_ports(2)
    listener = listen(live_port)
    clusters = tmp_path / "clusters.toml"
    clusters.write_text(
        f"""
[clusters.db]
nodes = ["127.0.0.1:{live_port}", "127.0.0.1:{dead_port}"]
[clusters.db.probe]
interval = 0.1
timeout = 0.5
rise = 1
fall = 1
"""
    )
    prefix = f"cm-probes-{next(_prefixes)}"
    url = etcd3.url(prefix)
    replicas = [ServerProc("--store", url, "--clusters", str(clusters), ttl=TTL, warmup=0)]
    replicas.append(ServerProc("--store", url, "--clusters", str(clusters), ttl=TTL, warmup=0))
    try:
        _probing(etcd3, prefix, replicas, listener, live_port, dead_port)
    except AssertionError as exc:  # say what each replica did
        logs = "\n".join(
            f"--- replica {r.child.pid}:\n{r.child.stderr()[-3000:]}" for r in replicas
        )
        raise AssertionError(f"{exc}\n{logs}") from None
    finally:
        for r in replicas:
            r.close()


def _probing(
    etcd3: EtcdCluster,
    prefix: str,
    replicas: list[ServerProc],
    listener: Backend,
    live_port: int,
    dead_port: int,
) -> None:
    try:
        # probes reach a verdict, seen through both replicas
        verdicts = {live_port: "up", dead_port: "down"}
        for r in replicas:
            wait_for(lambda r=r: statuses(r) == verdicts, 60, "first verdicts")
        name = wait_for(lambda: leader_name(etcd3, f"/{prefix}/"), 30, "a leader")
        pids = [r.child.pid for r in replicas]
        leading = [r for r in replicas if name.endswith(f"/{r.child.pid}")]
        assert len(leading) == 1, (name, pids)
        leader = leading[0]
        survivor = replicas[1 - replicas.index(leader)]
        assert "elected" in leader.child.stderr()
        assert "elected" not in survivor.child.stderr()  # one replica probes

        leader.kill()  # SIGKILL: no resignation, its lease has to expire in etcd
        killed = time.monotonic()
        wait_for(
            lambda: (
                leader_name(etcd3, f"/{prefix}/") == f"{name.rsplit('/', 1)[0]}/"
                f"{survivor.child.pid}"
            ),
            60,
            "the survivor to lead",
        )
        took_over = time.monotonic() - killed
        listener.close()  # only a prober that is running notices this
        wait_for(lambda: statuses(survivor)[live_port] == "down", 60, "the survivor's verdict")
        listener = listen(live_port)
        wait_for(lambda: statuses(survivor)[live_port] == "up", 60, "and back up")
        print(f"takeover {took_over:.2f} s after SIGKILL (lease TTL {TTL} s)")
    finally:
        listener.close()
