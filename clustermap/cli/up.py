"""``cmctl up``: cm-server and cm-sidecar together on this machine, in the foreground.

For a laptop or a single box: the server keeps its registry in memory, the sidecar publishes the
default region, so ``clustermap.pick`` and ``cmctl dump`` work at once with no configuration.
Ctrl-C (or SIGTERM) stops the sidecar first, leaving the region readable, then the server.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from clustermap.client import default_region_path
from clustermap.errors import ClusterMapError

__all__ = ["add_commands"]

#: Demo services: (name, options for the clusters file, nodes as (host, port, weight)).
#: Loopback addresses only: they are data for pick() to return, nothing ever connects to them.
DEMO: tuple[tuple[str, str, tuple[tuple[str, int, int], ...]], ...] = (
    ("user-svc", "", (("127.0.0.1", 8001, 1), ("127.0.0.1", 8002, 1), ("127.0.0.1", 8003, 1))),
    ("payment-svc", 'strategy = "weighted"', (("127.0.0.1", 9001, 3), ("127.0.0.1", 9002, 1))),
    (
        "session-cache",
        'strategy = "consistent_hash"',
        tuple(("127.0.0.1", 11211 + i, 1) for i in range(4)),
    ),
)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("up", help="run cm-server and cm-sidecar locally, in the foreground")
    p.add_argument(
        "--listen",
        default="127.0.0.1:7700",
        metavar="HOST:PORT",
        help="cm-server address (default %(default)s)",
    )
    p.add_argument("--interval", type=float, default=0.5, metavar="S", help="sidecar poll period")
    p.add_argument("--demo", action="store_true", help="register a few example services")
    p.set_defaults(run=up)


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def up(args: argparse.Namespace) -> int:
    region = args.region or default_region_path()
    stopping: list[int] = []

    def queue(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, queue)
    signal.signal(signal.SIGTERM, queue)
    with tempfile.TemporaryDirectory(prefix="cmctl-up-") as tmp:
        server_cmd = [_bin("cm-server"), "--listen", args.listen, "--warmup", "0.1"]
        if args.demo:
            clusters = Path(tmp) / "demo-clusters.toml"
            clusters.write_text(
                "".join(f"[clusters.{name}]\n{opts}\n" for name, opts, _ in DEMO if opts)
            )
            server_cmd += ["--clusters", str(clusters)]
        server = subprocess.Popen(server_cmd, start_new_session=True)
        sidecar: subprocess.Popen[bytes] | None = None
        try:
            _await_server(args.listen, server, stopping)
            if args.demo:
                _register_demo(args.listen)
            sidecar = subprocess.Popen(
                [
                    _bin("cm-sidecar"),
                    "--server",
                    args.listen,
                    "--region",
                    region,
                    "--interval",
                    str(args.interval),
                ],
                start_new_session=True,
            )
            _await_region(region, sidecar, stopping)
            print(
                f"cmctl up: cm-server on {args.listen}, cm-sidecar publishing {region}\n"
                f"  try: cmctl dump    |    python -c 'import clustermap; "
                f'print(clustermap.pick("user-svc"))\'\n'
                "  Ctrl-C stops both.",
                flush=True,
            )
            while not stopping:
                for name, proc in (("cm-server", server), ("cm-sidecar", sidecar)):
                    if proc.poll() is not None:
                        raise ClusterMapError(f"{name} exited with status {proc.returncode}")
                time.sleep(0.2)
            return 0
        finally:
            if sidecar is not None:  # the sidecar first: the region stays readable
                _stop(sidecar)
            _stop(server)


def _await_server(address: str, proc: subprocess.Popen[bytes], stopping: list[int]) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 30
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while not stopping:
            if proc.poll() is not None:
                raise ClusterMapError(f"cm-server exited with status {proc.returncode}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise ClusterMapError(f"cm-server did not start serving on {address}")
            time.sleep(0.05)


def _register_demo(address: str) -> None:
    import grpc

    from clustermap._pb.clustermap.v1 import registry_pb2, registry_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        for name, _, nodes in DEMO:
            for host, port, weight in nodes:
                stub.Register(
                    registry_pb2.RegisterRequest(
                        service=name,
                        host=host,
                        port=port,
                        weight=weight,
                        meta={"demo": "1"},
                        ttl_seconds=0,  # permanent: no lease to keep alive
                    ),
                    timeout=5,
                )


def _await_region(region: str, proc: subprocess.Popen[bytes], stopping: list[int]) -> None:
    from clustermap.region.reader import RegionReader

    deadline = time.monotonic() + 30
    while not stopping:
        if proc.poll() is not None:
            raise ClusterMapError(f"cm-sidecar exited with status {proc.returncode}")
        try:
            reader = RegionReader(region)
            if reader.last_sync_ns and not reader.meta().stale:
                return
        except ClusterMapError:
            pass
        if time.monotonic() > deadline:
            raise ClusterMapError(f"cm-sidecar did not publish {region}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
