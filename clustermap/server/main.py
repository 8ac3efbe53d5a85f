"""``cm-server``: command line, process lifecycle and the main loop.

Threads and what they own:

* the **main thread** parses the configuration, starts everything, then runs the main loop: it
  dispatches recorded signals, runs the registry's expiry tick and flips health to SERVING when
  warm-up ends. Signal handlers only append the signal number to a list (and a wakeup fd wakes
  the loop); all acting happens in the loop (SIGTERM/SIGINT: graceful stop);
* the **event loop** thread (``cm-loop``) runs the ``grpc.aio`` server and every servicer
  coroutine; Watch and health streams are coroutines on it (no thread per stream); blocking
  work (registry calls, encoding) goes to a pool of ``--max-workers`` threads (``cm-work``);
  the ``cm-watch`` thread hands new revisions to the loop (see :mod:`clustermap.server.serving`
  and docs/server.md "Threads and ownership");
* the **prober** thread and its probe pool (static clusters only) report verdicts;
* the registry's lock is the one piece of shared state; see :mod:`clustermap.server.registry`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clustermap.defaults import DEFAULT_SERVER
from clustermap.model import format_address, parse_address
from clustermap.rules import MAX_META_BYTES
from clustermap.signals import SignalQueue

if TYPE_CHECKING:
    from clustermap.server.etcd_store import EtcdStore
    from clustermap.server.registry import Registry

__all__ = ["Config", "ServerApp", "main", "parse_args"]

log = logging.getLogger("clustermap.server")

DEFAULT_LISTEN = DEFAULT_SERVER
SERVICE_NAMES = (
    "clustermap.v1.Registry",
    "clustermap.v1.Subscription",
    "clustermap.v1.Inspection",
)


class ConfigError(Exception):
    """A bad command line or configuration file; the message is shown as is."""


@dataclass(frozen=True, slots=True)
class Config:
    """Everything cm-server is told; built by :func:`parse_args` (or directly, from Python)."""

    listen: str = DEFAULT_LISTEN
    store: str = "memory"
    clusters: str | None = None
    heartbeat_ttl: float = 10.0
    warmup: float | None = None
    change_log_size: int = 10_000
    self_preservation_threshold: float = 0.5
    self_preservation_min_nodes: int = 3
    token: str | None = None
    subscribe_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    max_workers: int = 8
    max_watchers: int = 10_000
    max_reflection: int = 2
    max_services: int = 20_000
    max_nodes_per_service: int = 5_000
    max_meta_bytes: int = MAX_META_BYTES
    watch_keepalive: float = 15.0
    max_recv_bytes: int = 1 << 20
    max_send_bytes: int = 256 << 20
    grace: float = 5.0
    metrics_listen: str | None = None
    log_format: str = "text"
    log_level: str = "info"


def _positive(kind: type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text} is not a finite, non-negative number")
        return value

    return parse


def _read_secret(flag: str, path: str | None, env: str) -> str | None:
    """The token named by ``flag`` (a file) or ``$env``; one that is named but empty is an
    error: it would otherwise switch authentication off without a word."""
    if path is None:
        raw = os.environ.get(env, "")
        if raw and not raw.strip():
            raise ConfigError(f"${env} is blank; unset it or put the token in it")
        return raw.strip() or None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise ConfigError(f"{flag} {path} is empty; write the token in it")
    return token


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="cm-server", description="The ClusterMap server.")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT")
    p.add_argument(
        "--store",
        default="memory",
        metavar="memory|etcd://HOST:PORT[,HOST:PORT...][/PREFIX]",
        help="where the registry lives (default: memory, this process only)",
    )
    p.add_argument("--clusters", metavar="FILE.toml", help="static clusters, probed actively")
    p.add_argument("--heartbeat-ttl", type=_positive(float), default=10.0, metavar="SECONDS")
    p.add_argument(
        "--warmup",
        type=_positive(float),
        default=None,
        metavar="SECONDS",
        help="answer polls NOT_READY this long after start (default: the heartbeat TTL)",
    )
    p.add_argument("--change-log-size", type=int, default=10_000, metavar="N")
    p.add_argument("--self-preservation-threshold", type=float, default=0.5, metavar="FRACTION")
    p.add_argument("--self-preservation-min-nodes", type=int, default=3, metavar="N")
    p.add_argument("--token-file", help="admin bearer token (default: $CLUSTERMAP_TOKEN)")
    p.add_argument(
        "--subscribe-token-file",
        help="bearer token for Subscription/Inspection (default: $CLUSTERMAP_SUBSCRIBE_TOKEN)",
    )
    p.add_argument("--tls-cert", metavar="PEM")
    p.add_argument("--tls-key", metavar="PEM")
    p.add_argument("--tls-client-ca", metavar="PEM", help="require client certs signed by this CA")
    p.add_argument(
        "--max-workers",
        type=int,
        default=8,
        help="threads for blocking work: registry calls, encoding (default %(default)s)",
    )
    p.add_argument(
        "--max-watchers",
        type=int,
        default=10_000,
        help="concurrent Watch streams; one more is refused RESOURCE_EXHAUSTED "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-reflection-streams",
        type=int,
        default=2,
        help="concurrent reflection streams; 0: no reflection (default %(default)s)",
    )
    p.add_argument("--max-services", type=int, default=20_000, metavar="N")
    p.add_argument("--max-nodes-per-service", type=int, default=5_000, metavar="N")
    p.add_argument(
        "--max-meta-bytes",
        type=int,
        default=MAX_META_BYTES,
        metavar="N",
        help="meta of one node, keys plus values (default and maximum %(default)s)",
    )
    p.add_argument("--watch-keepalive", type=_positive(float), default=15.0, metavar="SECONDS")
    p.add_argument("--max-recv-bytes", type=int, default=1 << 20)
    p.add_argument("--max-send-bytes", type=int, default=256 << 20)
    p.add_argument("--grace", type=_positive(float), default=5.0, metavar="SECONDS")
    p.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics at /metrics"
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    a = p.parse_args(argv)
    token = _read_secret("--token-file", a.token_file, "CLUSTERMAP_TOKEN")
    sub_token = _read_secret(
        "--subscribe-token-file", a.subscribe_token_file, "CLUSTERMAP_SUBSCRIBE_TOKEN"
    )
    cfg = Config(
        listen=a.listen,
        store=a.store,
        clusters=a.clusters,
        heartbeat_ttl=a.heartbeat_ttl,
        warmup=a.warmup,
        change_log_size=a.change_log_size,
        self_preservation_threshold=a.self_preservation_threshold,
        self_preservation_min_nodes=a.self_preservation_min_nodes,
        token=token,
        subscribe_token=sub_token,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls_client_ca=a.tls_client_ca,
        max_workers=a.max_workers,
        max_watchers=a.max_watchers,
        max_reflection=a.max_reflection_streams,
        max_services=a.max_services,
        max_nodes_per_service=a.max_nodes_per_service,
        max_meta_bytes=a.max_meta_bytes,
        watch_keepalive=a.watch_keepalive,
        max_recv_bytes=a.max_recv_bytes,
        max_send_bytes=a.max_send_bytes,
        grace=a.grace,
        metrics_listen=a.metrics_listen,
        log_format=a.log_format,
        log_level=a.log_level,
    )
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """Reject inconsistent settings before anything starts."""
    if cfg.store != "memory":
        from clustermap.server.etcd_store import parse_etcd_url

        try:
            parse_etcd_url(cfg.store)
        except ValueError as exc:
            raise ConfigError(f"--store: {exc}") from None
        if cfg.clusters:
            raise ConfigError("--clusters is not supported with the etcd store yet")
    if cfg.heartbeat_ttl < 0.1:
        raise ConfigError("--heartbeat-ttl must be at least 0.1 seconds")
    if cfg.change_log_size < 1:
        raise ConfigError("--change-log-size must be positive")
    if not 0.0 <= cfg.self_preservation_threshold <= 1.0:
        raise ConfigError("--self-preservation-threshold must be within 0-1 (1 disables it)")
    if cfg.max_workers < 1 or cfg.max_watchers < 0 or cfg.max_reflection < 0:
        raise ConfigError(
            "need --max-workers >= 1, --max-watchers >= 0 and --max-reflection-streams >= 0"
        )
    if cfg.max_services < 1 or cfg.max_nodes_per_service < 1:
        raise ConfigError("--max-services and --max-nodes-per-service must be positive")
    if not 0 <= cfg.max_meta_bytes <= MAX_META_BYTES:
        raise ConfigError(
            f"--max-meta-bytes must be within 0-{MAX_META_BYTES} (sidecars refuse more)"
        )
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert/--tls-key")
    for flag, value in (("--listen", cfg.listen), ("--metrics-listen", cfg.metrics_listen)):
        if value is None:
            continue
        try:
            parse_address(value, allow_zero=True)
        except ValueError:
            raise ConfigError(f"{flag} {value!r} is not HOST:PORT") from None


class ServerApp:
    """One cm-server process: build, :meth:`run` until a stop signal, shut down gracefully."""

    def __init__(self, cfg: Config) -> None:
        from grpc_health.v1 import health_pb2

        from clustermap.server.clusters import ClustersError, load_clusters
        from clustermap.server.probes import Prober
        from clustermap.server.registry import Registry
        from clustermap.server.serving import LoopThread
        from clustermap.server.store import MapStore, MemoryStore

        self.cfg = cfg
        self._health_pb2 = health_pb2
        try:
            clusters = load_clusters(cfg.clusters) if cfg.clusters else []
        except ClustersError as exc:
            raise ConfigError(str(exc)) from None
        self.store: MapStore
        self.registry: Registry
        self._etcd: EtcdStore | None = None
        if cfg.store == "memory":
            self.store = MemoryStore(log_size=cfg.change_log_size)
            self.registry = Registry(
                self.store,
                default_ttl=cfg.heartbeat_ttl,
                warmup=cfg.warmup,
                self_preservation_threshold=cfg.self_preservation_threshold,
                self_preservation_min_nodes=cfg.self_preservation_min_nodes,
                options={c.name: c.options for c in clusters},
                max_services=cfg.max_services,
                max_nodes=cfg.max_nodes_per_service,
            )
        else:
            from clustermap.server.etcd_registry import EtcdRegistry
            from clustermap.server.etcd_store import EtcdError, EtcdStore

            try:
                self._etcd = EtcdStore.from_url(cfg.store, log_size=cfg.change_log_size)
                self.store = self._etcd
                # the map outlives this process: no warm-up needed unless asked for
                self.registry = EtcdRegistry(
                    self._etcd,
                    default_ttl=cfg.heartbeat_ttl,
                    warmup=cfg.warmup or 0.0,
                    max_services=cfg.max_services,
                    max_nodes=cfg.max_nodes_per_service,
                )
            except EtcdError as exc:
                raise ConfigError(str(exc)) from None
        self.registry.set_static({c.name: c.nodes for c in clusters if c.nodes})
        self.prober = Prober(self.registry, clusters)
        self.metrics = None
        if cfg.metrics_listen:
            from clustermap.server.metrics import ServerMetrics

            self.metrics = ServerMetrics(self.registry)

        self.loop = LoopThread(cfg.max_workers)
        try:
            self.port = self.loop.call(self._serve(cfg))
        except BaseException:
            self.loop.stop()
            raise
        self._metrics_server = None
        if self.metrics is not None and cfg.metrics_listen:
            try:
                self._metrics_server = self.metrics.serve(cfg.metrics_listen)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on {cfg.metrics_listen}: {exc}") from None
        self._ready_reported = self.registry.ready()

    async def _serve(self, cfg: Config) -> int:
        """Build the ``grpc.aio`` server on the loop (its objects belong to that thread) and
        bind its port; :meth:`run` starts it."""
        import grpc
        from grpc_health.v1 import health, health_pb2_grpc

        from clustermap._pb.clustermap.v1 import (
            inspection_pb2,
            inspection_pb2_grpc,
            registry_pb2,
            registry_pb2_grpc,
            subscription_pb2,
        )
        from clustermap.server import reflection
        from clustermap.server.auth import TokenInterceptor
        from clustermap.server.health import HealthServicer
        from clustermap.server.malformed import MalformedRequestInterceptor
        from clustermap.server.servicers import (
            InspectionServicer,
            RegistryServicer,
            SubscriptionServicer,
            add_subscription_servicer,
        )

        interceptors: list[object] = []
        auth = TokenInterceptor(
            cfg.token, cfg.subscribe_token, self.metrics.on_refused if self.metrics else None
        )
        if auth.enabled:
            interceptors.append(auth)
        interceptors.append(MalformedRequestInterceptor())
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", cfg.max_recv_bytes),
                ("grpc.max_send_message_length", cfg.max_send_bytes),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
            # streams are counted apart (--max-watchers...); this bounds calls in flight
            maximum_concurrent_rpcs=cfg.max_workers * 64 + cfg.max_watchers + cfg.max_reflection,
        )
        registry_pb2_grpc.add_RegistryServicer_to_server(
            RegistryServicer(self.registry, self.loop, max_meta_bytes=cfg.max_meta_bytes),
            self.server,
        )
        subscription = SubscriptionServicer(
            self.registry,
            self.loop,
            keepalive=cfg.watch_keepalive,
            max_watchers=cfg.max_watchers,
            on_answer=self.metrics.on_poll if self.metrics else None,
            on_stream=self.metrics.on_watch if self.metrics else None,
        )
        self.hub = subscription.hub
        add_subscription_servicer(subscription, self.server)
        inspection_pb2_grpc.add_InspectionServicer_to_server(
            InspectionServicer(self.registry, self.loop), self.server
        )
        self.health = HealthServicer(self.loop)  # ours: grpc_health's can be wedged (issue 17)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [
            registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
            subscription_pb2.DESCRIPTOR.services_by_name["Subscription"].full_name,
            inspection_pb2.DESCRIPTOR.services_by_name["Inspection"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_reflection(names, self.server, cfg.max_reflection)
        self._set_ready(self.registry.ready())
        _check_bindable(cfg.listen)
        try:
            if cfg.tls_cert and cfg.tls_key:
                creds = grpc.ssl_server_credentials(
                    [(_read_bytes(cfg.tls_key), _read_bytes(cfg.tls_cert))],
                    root_certificates=_read_bytes(cfg.tls_client_ca) if cfg.tls_client_ca else None,
                    require_client_auth=bool(cfg.tls_client_ca),
                )
                port = self.server.add_secure_port(cfg.listen, creds)
            else:
                port = self.server.add_insecure_port(cfg.listen)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {cfg.listen}: {exc}") from None
        if not port:
            raise ConfigError(f"cannot listen on {cfg.listen}")
        return int(port)

    def _set_ready(self, ready: bool) -> None:
        serving = self._health_pb2.HealthCheckResponse.SERVING
        not_serving = self._health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", serving if ready else not_serving)
        self.health.set("clustermap.v1.Subscription", serving if ready else not_serving)
        self.health.set("clustermap.v1.Registry", serving)
        self.health.set("clustermap.v1.Inspection", serving)

    def run(self) -> int:
        signals = SignalQueue((signal.SIGTERM, signal.SIGINT, signal.SIGHUP)).install()
        self.loop.call(self.server.start())
        self.hub.start()
        self.prober.start()
        cfg = self.cfg
        host = parse_address(cfg.listen, allow_zero=True)[0]
        log.info(
            "listening",
            extra={
                "event": "listening",
                "address": format_address(host, self.port),
                "epoch": self.registry.epoch,
                "store": "memory" if self._etcd is None else self._etcd.prefix,
                "heartbeat_ttl": cfg.heartbeat_ttl,
                "warmup": cfg.heartbeat_ttl if cfg.warmup is None else cfg.warmup,
                "tls": bool(cfg.tls_cert),
                "mtls": bool(cfg.tls_client_ca),
                "auth": bool(cfg.token or cfg.subscribe_token),
                "pid": os.getpid(),
            },
        )
        try:
            while True:
                while (signum := signals.pop()) is not None:
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        return self.handle_term(signum)
                    log.info(
                        "signal ignored",
                        extra={"event": "signal", "signal": signal.Signals(signum).name},
                    )
                expired = self.registry.expire()
                if expired and self.metrics is not None:
                    self.metrics.expired.inc(len(expired))
                if not self._ready_reported and self.registry.ready():
                    self._ready_reported = True
                    self._set_ready(True)
                signals.wait(self.registry.tick())
        finally:
            signals.close(handlers=False)  # as before: a late signal is queued, not fatal

    def handle_term(self, signum: int) -> int:
        name = signal.Signals(signum).name
        log.info("stopping", extra={"event": "stopping", "signal": name, "grace": self.cfg.grace})
        self.health.enter_graceful_shutdown()
        self.registry.close()
        self.hub.close()
        self.prober.stop()
        self.loop.call(self.server.stop(self.cfg.grace))
        self.loop.stop()
        if self._etcd is not None:
            self._etcd.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        log.info("stopped", extra={"event": "stopped"})
        return 0


def _check_bindable(listen: str) -> None:
    """Refuse an address we cannot bind (in use, not local, privileged) in one plain line, before
    gRPC tries and logs its own internal error line first."""
    try:
        host, port = parse_address(listen, allow_zero=True)
    except ValueError:
        return  # gRPC says what is wrong with it
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise ConfigError(f"cannot listen on {listen}: {reason}") from None


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    from clustermap.logs import setup_logging

    try:
        cfg = parse_args(argv)
        setup_logging(cfg.log_format, cfg.log_level)
        app = ServerApp(cfg)
    except ConfigError as exc:
        print(f"cm-server: {exc}", file=sys.stderr)
        return 2
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
