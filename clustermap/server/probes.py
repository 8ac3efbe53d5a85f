"""Active health probes for static nodes: TCP connect or HTTP GET, with rise/fall counts.

One replica probes: the one leading the store's election (:meth:`NodeStore.election`; always
this process with the in-memory store). Once elected, the prober writes the static nodes of its
clusters file (:meth:`Registry.set_static`), then probes and writes verdicts, every write fenced
by its term; deposed (its lease lost, or a write refused), it stops and campaigns again. A new
leader starts with no verdicts of its own: each node's first probe decides, and is written if it
differs from the stored one.

Threading: the prober owns one scheduler thread (``cm-prober``) and a small pool of probe threads.
Probe state (consecutive successes/failures, verdict) belongs to the target and is only touched
by the probe thread that currently runs it (a target is never in flight twice). Changed verdicts
are queued; the scheduler thread hands each batch to the registry as one change (one revision,
however many nodes flipped at once). A failing node is marked ``down``, never removed.

The first probe of a node decides its status at once (it enters the map then); afterwards ``rise``
consecutive successes turn a down node up and ``fall`` consecutive failures turn an up node down.
"""

from __future__ import annotations

import http.client
import logging
import queue
import random
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from clustermap.model import DOWN, UP, format_address
from clustermap.server.clusters import Cluster, ProbeSpec
from clustermap.server.registry import Registry, RegistryError
from clustermap.server.store import Deposed, Election, LocalElection, Term

__all__ = ["Prober", "probe_once"]

log = logging.getLogger("clustermap.server.probes")


def probe_once(host: str, port: int, spec: ProbeSpec) -> tuple[bool, str]:
    """Run one probe; return (success, detail)."""
    try:
        if spec.type == "tcp":
            with socket.create_connection((host, port), timeout=spec.timeout):
                return True, "connected"
        conn = http.client.HTTPConnection(host, port, timeout=spec.timeout)
        try:
            conn.request("GET", spec.path, headers={"User-Agent": "clustermap-probe/1"})
            status = conn.getresponse().status
        finally:
            conn.close()
        return 200 <= status < 400, f"HTTP {status}"
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"


@dataclass(slots=True)
class _Target:
    service: str
    host: str
    port: int
    spec: ProbeSpec
    due: float = 0.0
    in_flight: bool = False
    verdict: str | None = None
    successes: int = 0
    failures: int = 0


class Prober:
    """Schedules probes of every static node and reports verdicts to the registry."""

    def __init__(
        self,
        registry: Registry,
        clusters: Iterable[Cluster],
        election: Election | None = None,
        workers: int = 16,
    ) -> None:
        self._registry = registry
        clusters = list(clusters)
        self._static = {c.name: c.nodes for c in clusters if c.nodes}
        self._election = election or LocalElection()
        self._targets = [
            _Target(c.name, n.host, n.port, c.probe) for c in clusters for n in c.nodes
        ]
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._verdicts: queue.SimpleQueue[tuple[str, str, int, str]] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(workers, len(self._targets))), thread_name_prefix="cm-probe"
        )
        self._thread = threading.Thread(target=self._run, name="cm-prober", daemon=True)

    def start(self) -> None:
        if self._targets:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                term = self._election.campaign(self._stop)
                if term is None:
                    return
                try:
                    self._registry.set_static(self._static, term)
                    self._lead(term)
                except Deposed:
                    log.warning("deposed: another replica probes now", extra={"event": "deposed"})
                except RegistryError as exc:
                    log.warning("probing paused: %s", exc, extra={"event": "probe_error"})
                    self._stop.wait(1.0)
                for t in self._targets:  # the next term starts from fresh verdicts
                    t.verdict, t.successes, t.failures = None, 0, 0
        finally:
            self._election.resign()

    def _lead(self, term: Term) -> None:
        while not self._stop.is_set() and self._election.leading(term):
            self._flush(term)
            now = time.monotonic()
            next_due = now + 1.0
            for t in self._targets:
                if t.in_flight:
                    continue
                if t.due <= now:
                    t.in_flight = True
                    # jitter spreads probes so a big cluster is not probed in one burst
                    t.due = now + t.spec.interval * random.uniform(0.9, 1.1)
                    try:
                        self._pool.submit(self._probe, t)
                    except RuntimeError:  # pool shut down: we are stopping
                        return
                next_due = min(next_due, t.due)
            self._wake.wait(max(0.01, next_due - time.monotonic()))
            self._wake.clear()

    def _flush(self, term: Term) -> None:
        """Hand the verdicts gathered since the last flush to the registry as one change."""
        batch = []
        while True:
            try:
                batch.append(self._verdicts.get_nowait())
            except queue.Empty:
                break
        if batch:
            self._registry.set_probe_statuses(batch, term)

    def _probe(self, t: _Target) -> None:
        try:
            ok, detail = probe_once(t.host, t.port, t.spec)
            if ok:
                t.successes, t.failures = t.successes + 1, 0
            else:
                t.successes, t.failures = 0, t.failures + 1
            verdict = t.verdict
            if verdict is None:
                verdict = UP if ok else DOWN
            elif verdict == DOWN and t.successes >= t.spec.rise:
                verdict = UP
            elif verdict == UP and t.failures >= t.spec.fall:
                verdict = DOWN
            if verdict != t.verdict:
                log.info(
                    "probe verdict",
                    extra={
                        "event": "probe",
                        "service": t.service,
                        "node": format_address(t.host, t.port),
                        "status": verdict,
                        "detail": detail,
                    },
                )
                t.verdict = verdict
                self._verdicts.put((t.service, t.host, t.port, verdict))
                self._wake.set()
        except Exception:  # a probe bug must not kill probing of every other node
            log.exception("probe failed", extra={"event": "probe_error", "service": t.service})
        finally:
            t.in_flight = False
