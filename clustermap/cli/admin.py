"""Admin commands of cmctl: they talk to cm-server's Registry and Inspection services.

``register``, ``deregister``, ``set`` and ``services``. gRPC is imported only when one of them
runs, so region commands stay light. Every failure (unreachable server, refused request, bad
argument) is one line on stderr and exit status 1 (2 for usage errors), never a traceback.

Credentials: ``--token-file`` or ``$CLUSTERMAP_TOKEN`` (sent as ``authorization: Bearer``);
``--tls-ca`` to use TLS (plus ``--tls-cert``/``--tls-key`` for mutual TLS).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from clustermap import model, rules
from clustermap.errors import ClusterMapError
from clustermap.signals import SignalQueue

__all__ = ["AdminError", "add_commands", "parse_address"]

T = TypeVar("T")

STATUSES = ("up", "down", "drain")
# reconnect quickly after a server restart, so a keepalive re-registers within a heartbeat or two.
# Not grpc.min_reconnect_backoff_ms: gRPC also uses it as the timeout of one connection attempt
# (default 20 s), and a short one never connects to a slow or distant server.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class AdminError(ClusterMapError):
    """An admin command failed; the message is the one line cmctl prints."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port), as an argparse type. The host must pass
    the registry's host rule (:func:`clustermap.rules.check_host`, the server's and sidecars'
    rule too); the server validates the rest and says why it refuses."""
    try:
        host, port = model.parse_address(text, check_port=False)
        return rules.check_host(host), port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _meta(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--token-file", help="bearer token file (default: $CLUSTERMAP_TOKEN)")
    common.add_argument("--tls-ca", help="CA bundle: connect with TLS, verifying the server")
    common.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    common.add_argument("--tls-key", help="client key (mutual TLS)")
    common.add_argument("--timeout", type=_float, default=5.0, help="per-call timeout, seconds")

    p = sub.add_parser("register", parents=[common], help="register a node with cm-server")
    p.add_argument("service")
    p.add_argument("address", type=parse_address, metavar="HOST:PORT")
    p.add_argument("--weight", type=_int)
    p.add_argument("--meta", type=_meta, action="append", default=[], metavar="K=V")
    p.add_argument("--ttl", type=_float, help="lease TTL in seconds (default: no expiry)")
    p.add_argument(
        "--keepalive",
        action="store_true",
        help="with --ttl: heartbeat until interrupted, re-registering if the lease is lost",
    )
    p.set_defaults(run=_register)

    p = sub.add_parser("deregister", parents=[common], help="remove a registered node")
    p.add_argument("service")
    p.add_argument("address", type=parse_address, metavar="HOST:PORT")
    p.set_defaults(run=_deregister)

    p = sub.add_parser("set", parents=[common], help="override a node's weight and/or status")
    p.add_argument("service")
    p.add_argument("address", type=parse_address, metavar="HOST:PORT")
    p.add_argument("--weight", type=_int)
    p.add_argument("--status", choices=STATUSES)
    p.set_defaults(run=_set)

    p = sub.add_parser("services", parents=[common], help="list the server's services")
    p.add_argument("names", nargs="*", metavar="SERVICE", help="show these services' nodes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_services)


# -- connection -------------------------------------------------------------------------------


class _Conn:
    def __init__(self, args: argparse.Namespace) -> None:
        import grpc

        self.grpc = grpc
        self.server: str = args.server
        self.timeout: float = args.timeout
        token = None
        if args.token_file:
            try:
                token = Path(args.token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise AdminError(f"cannot read {args.token_file}: {exc.strerror}") from None
        token = token or os.environ.get("CLUSTERMAP_TOKEN") or None
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if args.tls_ca or args.tls_cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(args.tls_ca) if args.tls_ca else None,
                private_key=_read(args.tls_key) if args.tls_key else None,
                certificate_chain=_read(args.tls_cert) if args.tls_cert else None,
            )
            self.channel = grpc.secure_channel(self.server, creds, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(self.server, options=_CHANNEL_OPTIONS)

    def call(self, method: Callable[..., T], request: Any) -> T:
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except self.grpc.RpcError as exc:
            raise AdminError(self.describe(exc)) from None

    def describe(self, exc: Any) -> str:
        code = exc.code()
        details = " ".join((exc.details() or "").split())
        if code in (self.grpc.StatusCode.UNAVAILABLE, self.grpc.StatusCode.DEADLINE_EXCEEDED):
            return f"cannot reach cm-server at {self.server}: {details or code.name}"
        return f"cm-server at {self.server} refused: {code.name}: {details}"

    def close(self) -> None:
        self.channel.close()


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AdminError(f"cannot read {path}: {exc.strerror}") from None


@contextmanager
def _connect(args: argparse.Namespace) -> Iterator[_Conn]:
    conn = _Conn(args)
    try:
        yield conn
    finally:
        conn.close()


_fmt = model.format_address


# -- commands ---------------------------------------------------------------------------------


def _register(args: argparse.Namespace) -> int:
    from clustermap._pb.clustermap.v1 import registry_pb2, registry_pb2_grpc

    if args.keepalive and not args.ttl:
        raise AdminError("--keepalive needs --ttl")
    host, port = args.address
    req = registry_pb2.RegisterRequest(
        service=args.service,
        host=host,
        port=port,
        meta=dict(args.meta),
        ttl_seconds=args.ttl if args.ttl is not None else 0.0,
    )
    if args.weight is not None:
        req.weight = args.weight
    with _connect(args) as conn:
        stub = registry_pb2_grpc.RegistryStub(conn.channel)
        resp = conn.call(stub.Register, req)
        _say_registered(args, resp)
        if not args.keepalive:
            return 0
        return _keepalive(args, conn, stub, req, resp.lease_id, resp.ttl_seconds)


def _say_registered(args: argparse.Namespace, resp: Any) -> None:
    addr = _fmt(*args.address)
    if resp.lease_id:
        print(
            f"registered {args.service} {addr} lease={resp.lease_id} ttl={resp.ttl_seconds:g}s "
            f"revision={resp.revision}",
            flush=True,
        )
    else:
        print(f"registered {args.service} {addr} (no expiry) revision={resp.revision}", flush=True)


def _keepalive(
    args: argparse.Namespace, conn: _Conn, stub: Any, req: Any, lease: str, ttl: float
) -> int:
    """Heartbeat every TTL/3 until SIGINT/SIGTERM; re-register when the lease is lost."""
    from clustermap._pb.clustermap.v1 import registry_pb2

    grpc = conn.grpc
    stop = SignalQueue((signal.SIGINT, signal.SIGTERM)).install()
    interval = max(ttl / 3, 0.05)
    # A call may take up to the TTL: on a busy machine an answer slower than the heartbeat
    # interval still renews the lease, and giving up on it early would let the lease lapse.
    # Calls wait for the channel (wait_for_ready) instead of failing fast while gRPC backs off
    # between reconnects to a restarting server.
    deadline = min(conn.timeout, max(ttl, interval))
    try:
        while not stop:
            stop.wait(interval)
            if stop:
                break
            try:
                if lease:
                    stub.Heartbeat(
                        registry_pb2.HeartbeatRequest(lease_id=lease),
                        timeout=deadline,
                        metadata=conn.metadata,
                        wait_for_ready=True,
                    )
                    continue
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    print(f"cmctl: heartbeat failed: {conn.describe(exc)}", file=sys.stderr)
                    continue
                print("cmctl: lease lost; registering again", file=sys.stderr, flush=True)
            try:
                resp = stub.Register(
                    req, timeout=deadline, metadata=conn.metadata, wait_for_ready=True
                )
                lease = resp.lease_id
                _say_registered(args, resp)
            except grpc.RpcError as exc:
                lease = ""
                print(f"cmctl: register failed: {conn.describe(exc)}", file=sys.stderr)
        # interrupted: leave cleanly rather than waiting for the lease to expire
        try:
            from clustermap._pb.clustermap.v1 import registry_pb2 as pb

            stub.Deregister(
                pb.DeregisterRequest(service=req.service, host=req.host, port=req.port),
                timeout=conn.timeout,
                metadata=conn.metadata,
                wait_for_ready=True,
            )
            print(f"deregistered {req.service} {_fmt(req.host, req.port)}", flush=True)
        except grpc.RpcError as exc:
            print(f"cmctl: deregister failed: {conn.describe(exc)}", file=sys.stderr)
        return 0
    finally:
        stop.close()


def _deregister(args: argparse.Namespace) -> int:
    from clustermap._pb.clustermap.v1 import registry_pb2, registry_pb2_grpc

    host, port = args.address
    with _connect(args) as conn:
        stub = registry_pb2_grpc.RegistryStub(conn.channel)
        resp = conn.call(
            stub.Deregister,
            registry_pb2.DeregisterRequest(service=args.service, host=host, port=port),
        )
    print(f"deregistered {args.service} {_fmt(host, port)} revision={resp.revision}")
    return 0


def _set(args: argparse.Namespace) -> int:
    from clustermap._pb.clustermap.v1 import registry_pb2, registry_pb2_grpc
    from clustermap.wire import status_from_pb, status_to_pb

    if args.weight is None and args.status is None:
        raise AdminError("set needs --weight and/or --status")
    host, port = args.address
    req = registry_pb2.UpdateNodeRequest(service=args.service, host=host, port=port)
    if args.weight is not None:
        req.weight = args.weight
    if args.status is not None:
        req.status = status_to_pb(args.status)
    with _connect(args) as conn:
        stub = registry_pb2_grpc.RegistryStub(conn.channel)
        resp = conn.call(stub.UpdateNode, req)
    print(
        f"{args.service} {_fmt(host, port)} weight={resp.node.weight} "
        f"status={status_from_pb(resp.node.status)} revision={resp.revision}"
    )
    return 0


def _services(args: argparse.Namespace) -> int:
    from clustermap._pb.clustermap.v1 import inspection_pb2, inspection_pb2_grpc
    from clustermap.wire import service_from_pb

    with _connect(args) as conn:
        stub = inspection_pb2_grpc.InspectionStub(conn.channel)
        listing = conn.call(stub.ListServices, inspection_pb2.ListServicesRequest())
        status = conn.call(stub.GetStatus, inspection_pb2.GetStatusRequest())
        details = {}
        for name in args.names:
            resp = conn.call(stub.GetService, inspection_pb2.GetServiceRequest(name=name))
            details[name] = service_from_pb(resp.service)
    if args.json:
        doc: dict[str, Any] = {
            "revision": listing.revision,
            "services": {},
            "server": {
                "epoch": status.epoch,
                "ready": status.ready,
                "self_preservation": status.self_preservation,
                "leases": status.leases,
                "overdue_leases": status.overdue_leases,
                "uptime_seconds": round(status.uptime_seconds, 3),
            },
        }
        for s in listing.services:
            if args.names and s.name not in details:
                continue
            entry: dict[str, Any] = {"nodes": s.nodes, "healthy": s.healthy, "revision": s.revision}
            svc = details.get(s.name)
            if svc is not None:
                entry["strategy"] = svc.strategy
                entry["nodes"] = [
                    {
                        "host": n.host,
                        "port": n.port,
                        "weight": n.weight,
                        "status": n.status,
                        "meta": dict(n.meta),
                    }
                    for n in svc.nodes
                ]
            doc["services"][s.name] = entry
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    if args.names:
        for name, svc in details.items():
            print(f"{name}  strategy={svc.strategy} revision={svc.revision}")
            for n in svc.nodes:
                meta = ",".join(f"{k}={v}" for k, v in n.meta.items())
                print(f"  {n.address:<28} weight={n.weight:<5} {n.status:<5} {meta}".rstrip())
        return 0
    if not status.ready:
        print("note: the server is warming up (polls answered NOT_READY)", file=sys.stderr)
    if status.self_preservation:
        print(
            f"note: self-preservation on: {status.overdue_leases} overdue leases held back",
            file=sys.stderr,
        )
    rows = [(s.name, str(s.nodes), str(s.healthy), str(s.revision)) for s in listing.services]
    header = ("SERVICE", "NODES", "HEALTHY", "REVISION")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0
