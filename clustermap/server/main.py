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

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from clustermap.model import format_address, parse_address
from clustermap.server.config import ConfigError, ServerSettings, load_settings
from clustermap.signals import SignalQueue

if TYPE_CHECKING:
    from clustermap.server.store import NodeStore

__all__ = ["Config", "ServerApp", "main", "parse_args"]

log = logging.getLogger("clustermap.server")

#: The settings (:mod:`clustermap.server.config`), under the name the Python API has always used.
Config = ServerSettings
SERVICE_NAMES = (
    "clustermap.v1.Registry",
    "clustermap.v1.Subscription",
    "clustermap.v1.Inspection",
)


class ServerApp:
    """One cm-server process: build, :meth:`run` until a stop signal, shut down gracefully."""

    def __init__(self, cfg: Config) -> None:
        from grpc_health.v1 import health_pb2

        from clustermap.server.clusters import ClustersError, load_clusters
        from clustermap.server.probes import Prober
        from clustermap.server.registry import Registry
        from clustermap.server.serving import LoopThread
        from clustermap.server.store import MemoryStore, StoreError

        self.cfg = cfg
        self._health_pb2 = health_pb2
        try:
            clusters = load_clusters(cfg.clusters) if cfg.clusters else []
        except ClustersError as exc:
            raise ConfigError(str(exc)) from None
        self.store: NodeStore
        try:
            if cfg.store == "memory":
                self.store = MemoryStore()
            else:
                from clustermap.server.etcd_store import EtcdStore

                self.store = EtcdStore.from_url(cfg.store, credentials=cfg.etcd_credentials())
            self.registry = Registry(
                self.store,
                default_ttl=cfg.heartbeat_ttl,
                # the etcd map outlives this process: no warm-up needed unless asked for
                warmup=cfg.warmup if cfg.store == "memory" else cfg.warmup or 0.0,
                self_preservation_threshold=cfg.self_preservation_threshold,
                self_preservation_min_nodes=cfg.self_preservation_min_nodes,
                options={c.name: c.options for c in clusters},
                max_services=cfg.max_services,
                max_nodes=cfg.max_nodes_per_service,
                log_size=cfg.change_log_size,
            )
        except StoreError as exc:
            raise ConfigError(str(exc)) from None
        # one replica probes: the one that leads the store's election (always so in memory)
        election = self.store.election(cfg.heartbeat_ttl, f"{socket.gethostname()}/{os.getpid()}")
        self.prober = Prober(self.registry, clusters, election)
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
        # One reading for both: the health status set now and whether the main loop still has
        # to report the end of warm-up. Read twice, a warm-up ending in between (a short one on
        # a loaded machine) was never reported, and health said NOT_SERVING for good.
        self._ready_reported = self.registry.ready()
        self._set_ready(self._ready_reported)
        _check_bindable(cfg.listen)
        try:
            if cfg.server_tls_cert and cfg.server_tls_key:
                creds = grpc.ssl_server_credentials(
                    [(_read_bytes(cfg.server_tls_key), _read_bytes(cfg.server_tls_cert))],
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
        from clustermap.server.serving import coalesce_grpc_wakeups, tune_gc

        async def coalesce() -> bool:  # on the loop: its reader table is loop state
            return coalesce_grpc_wakeups(asyncio.get_running_loop())

        if not self.loop.call(coalesce()):
            log.debug("grpc.aio's completion reader not found: wake-ups not coalesced")
        tune_gc()
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
                "store": getattr(self.store, "prefix", "memory"),
                "heartbeat_ttl": cfg.heartbeat_ttl,
                "warmup": cfg.heartbeat_ttl if cfg.warmup is None else cfg.warmup,
                "tls": bool(cfg.server_tls_cert),
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
                self.registry.expire()
                if not self._ready_reported and self.registry.ready():
                    self._ready_reported = True
                    self._set_ready(True)
                signals.wait(self.registry.tick())
        finally:
            signals.close(handlers=False)  # as before: a late signal is queued, not fatal

    def handle_term(self, signum: int) -> int:
        name = signal.Signals(signum).name
        log.info("stopping", extra={"event": "stopping", "signal": name, "grace": self.cfg.grace})
        self.health.enter_graceful_shutdown(min(self.cfg.grace, 5.0))
        self.registry.close()
        self.hub.close()
        self.prober.stop()
        self.loop.call(self.server.stop(self.cfg.grace))
        self.loop.stop()
        self.store.close()
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


def _read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """The settings from ``argv`` over ``CLUSTERMAP_*`` over the TOML file over the defaults."""
    return load_settings(argv)[0]


def main(argv: Sequence[str] | None = None) -> int:
    from clustermap.logs import setup_logging

    try:
        cfg, printing = load_settings(argv)
        if printing:
            print(json.dumps(cfg.shown(), indent=2, sort_keys=True))
            return 0
        setup_logging(cfg.log_format, cfg.log_level)
        app = ServerApp(cfg)
    except ConfigError as exc:
        print(f"cm-server: {exc}", file=sys.stderr)
        return 2
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
