"""The registry: nodes, leases, probes' verdicts and operators' overrides, turned into the map.

Policy lives here; storage lives in :mod:`clustermap.server.store`. The registry owns per-node
records (where a node came from, its lease, its probe verdict, an operator's overrides), rebuilds a
service's published value from them after every change and writes it to the store, which bumps
the global revision and logs the change for deltas.

Threading: one :class:`threading.Lock` guards every record and the store. It is taken by gRPC
worker threads (register, heartbeat, polls...), by the main loop's expiry tick and by the probe
thread's verdicts, each for a short, non-blocking critical section (no I/O under the lock). Watch
streams wait on a :class:`threading.Condition` over the same lock and are woken on every revision.

Self-preservation: a lease is *silent* when it has not been renewed for more than half its TTL
(clients heartbeat every TTL/3). When at least ``min_nodes`` leases exist and more than
``threshold`` of them are silent at once, the server is more likely cut off than the fleet dead,
so nothing expires until the silent fraction drops again; entering and leaving the mode is
logged and exposed in poll answers and ``GetStatus``.

Bounds: at most ``max_services`` services and ``max_nodes`` nodes per service (None: no bound);
a registration beyond them is refused with :class:`Exhausted` naming the limit. Nothing under the
lock sorts, or walks the whole map for, one caller: a filtered poll costs what it names, the
whole map is copied (references, at C speed) at most once per revision for full answers,
answers are put in name order after the lock is released, and the expiry tick walks a copy of
the lease table outside the lock.

Warm-up: until ``warmup`` seconds after start the registry is not *ready*: polls are answered
NOT_READY (never an empty or partial map from a freshly started server) while nodes re-register.
"""

from __future__ import annotations

import logging
import operator
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

from clustermap.model import (
    DELTA,
    FULL,
    NOT_MODIFIED,
    NOT_READY,
    UP,
    Node,
    Service,
    format_address,
)
from clustermap.rules import clip
from clustermap.server.store import MapStore, StoredService
from clustermap.server.validation import NodeAddress, NodeUpdate, Registration, ServiceOptions

__all__ = [
    "DELTA",
    "FULL",
    "NOT_MODIFIED",
    "NOT_READY",
    "REGISTERED",
    "STATIC",
    "Conflict",
    "Exhausted",
    "NotFound",
    "PollResult",
    "RegisterResult",
    "Registry",
    "RegistryError",
    "StaticNode",
    "Status",
    "Unavailable",
]

log = logging.getLogger("clustermap.server.registry")

REGISTERED: Final = "registered"
STATIC: Final = "static"

_DEFAULT_OPTIONS: Final = ServiceOptions()
_MASK64: Final = (1 << 64) - 1
_SERVICE_NAME: Final = operator.attrgetter("service.name")


class RegistryError(Exception):
    """A request the registry refuses; the message is the reason sent to the caller."""


class NotFound(RegistryError):
    """Unknown lease, node or service."""


class Conflict(RegistryError):
    """The request contradicts the node's origin (e.g. deregistering a static node)."""


class Exhausted(RegistryError):
    """A configured bound (services, nodes per service) would be exceeded."""


class Unavailable(RegistryError):
    """The registry cannot answer now (its store is unreachable): retry, or another server."""


@dataclass(slots=True)
class _Lease:
    id: str
    service: str
    key: tuple[str, int]
    ttl: float
    renewed: float

    def deadline(self) -> float:
        return self.renewed + self.ttl


@dataclass(slots=True)
class _Record:
    host: str
    port: int
    origin: str
    weight: int = 1
    meta: Mapping[str, str] = field(default_factory=dict)
    lease: _Lease | None = None
    probe_status: str = UP
    probed: bool = True
    admin_weight: int | None = None
    admin_status: str | None = None

    def node(self) -> Node:
        return Node(
            host=self.host,
            port=self.port,
            weight=self.weight if self.admin_weight is None else self.admin_weight,
            status=self.admin_status or self.probe_status,
            meta=MappingProxyType(dict(self.meta)),
        )


@dataclass(frozen=True, slots=True)
class StaticNode:
    """A node of a static cluster (from the clusters file)."""

    host: str
    port: int
    weight: int = 1
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RegisterResult:
    lease_id: str
    ttl: float
    revision: int
    node: Node


@dataclass(frozen=True, slots=True)
class PollResult:
    """What the registry answers a poll; the servicer encodes it (see docs/protocol.md)."""

    kind: str
    epoch: str
    revision: int
    checksum: int
    services: tuple[StoredService, ...] = ()
    removed: tuple[str, ...] = ()
    self_preservation: bool = False
    retry_after: float = 0.0


@dataclass(frozen=True, slots=True)
class Status:
    epoch: str
    revision: int
    ready: bool
    self_preservation: bool
    services: int
    nodes: int
    leases: int
    silent_leases: int
    overdue_leases: int
    checksum: int
    uptime: float


class Registry:
    """Thread-safe registry over a :class:`MapStore` (see the module docstring)."""

    def __init__(
        self,
        store: MapStore,
        *,
        default_ttl: float = 10.0,
        warmup: float | None = None,
        self_preservation_threshold: float = 0.5,
        self_preservation_min_nodes: int = 3,
        options: Mapping[str, ServiceOptions] | None = None,
        max_services: int | None = None,
        max_nodes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_services = max_services
        self._max_nodes = max_nodes
        self._full: tuple[str, int, tuple[StoredService, ...]] | None = None
        self._store = store
        self._default_ttl = default_ttl
        self._clock = clock
        self._started = clock()
        self._warmup = default_ttl if warmup is None else warmup
        self._ready = self._warmup <= 0
        self._sp_threshold = self_preservation_threshold
        self._sp_min = self_preservation_min_nodes
        self._options = dict(options or {})
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._records: dict[str, dict[tuple[str, int], _Record]] = {}
        self._leases: dict[str, _Lease] = {}
        self._preserving = False
        self._min_ttl = default_ttl
        self._silent = 0
        self._overdue = 0
        self._closed = False

    # -- state ----------------------------------------------------------------------------

    @property
    def epoch(self) -> str:
        return self._store.epoch

    @property
    def revision(self) -> int:
        """The current revision, read without the lock (one int: a read that races a change
        sees the revision before it, as a call a moment earlier would have)."""
        return self._store.revision

    @property
    def default_ttl(self) -> float:
        return self._default_ttl

    def ready(self) -> bool:
        """Whether warm-up is over (checked against the clock; flips once)."""
        if not self._ready and self._clock() - self._started >= self._warmup:
            self._ready = True
            log.info("warm-up over: answering polls", extra={"event": "ready"})
        return self._ready

    def tick(self) -> float:
        """How often :meth:`expire` should run: a tenth of the shortest live TTL (20 ms-1 s)."""
        return min(1.0, max(0.02, min(self._min_ttl, self._default_ttl) / 10))

    @property
    def self_preservation(self) -> bool:
        return self._preserving

    def close(self) -> None:
        """Wake every watcher for shutdown."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()

    def wake(self) -> None:
        """Wake every watcher so it re-checks its stream (called when a stream ends)."""
        with self._lock:
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- registry calls -------------------------------------------------------------------

    def register(self, reg: Registration) -> RegisterResult:
        ttl = self._default_ttl if reg.ttl is None else reg.ttl
        key = (reg.host, reg.port)
        with self._lock:
            self._check_bounds(reg.service, key, self._records.get(reg.service), len(self._records))
            records = self._records.setdefault(reg.service, {})
            rec = records.get(key)
            if rec is not None and rec.origin == STATIC:
                raise Conflict(
                    f"{reg.service} {_addr(key)} is a static node (edit the clusters file)"
                )
            if rec is None:
                rec = _Record(host=reg.host, port=reg.port, origin=REGISTERED)
                records[key] = rec
            if rec.lease is not None:
                self._leases.pop(rec.lease.id, None)
                rec.lease = None
            rec.weight = reg.weight
            rec.meta = dict(reg.meta)
            lease_id = ""
            if ttl > 0:
                lease_id = secrets.token_hex(16)
                rec.lease = _Lease(lease_id, reg.service, key, ttl, self._clock())
                self._leases[lease_id] = rec.lease
            revision = self._publish([reg.service])
            node = rec.node()
        log.info(
            "registered",
            extra={"event": "register", "service": reg.service, "node": _addr(key), "ttl": ttl},
        )
        return RegisterResult(lease_id, ttl, revision, node)

    def heartbeat(self, lease_id: str) -> float:
        """Renew a lease; return its TTL. :class:`NotFound` if it expired or never existed."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise NotFound("unknown lease (expired, replaced or the server restarted)")
            lease.renewed = self._clock()
            return lease.ttl

    def deregister(self, addr: NodeAddress) -> int:
        key = (addr.host, addr.port)
        with self._lock:
            rec = self._records.get(addr.service, {}).get(key)
            if rec is None:
                raise NotFound(f"no node {_addr(key)} in service {addr.service!r}")
            if rec.origin == STATIC:
                raise Conflict(f"{addr.service} {_addr(key)} is a static node; use set --status")
            self._drop(addr.service, key)
            revision = self._publish([addr.service])
        log.info(
            "deregistered",
            extra={"event": "deregister", "service": addr.service, "node": _addr(key)},
        )
        return revision

    def update_node(self, upd: NodeUpdate) -> tuple[int, Node, str]:
        """Apply an operator's override; return (revision, node as published, origin).

        ``status="up"`` clears a status override (the node's own status returns: up for a
        registered node, the probes' verdict for a static one); a weight override stays until
        the node is deregistered."""
        key = (upd.host, upd.port)
        with self._lock:
            rec = self._records.get(upd.service, {}).get(key)
            if rec is None:
                raise NotFound(f"no node {_addr(key)} in service {upd.service!r}")
            if upd.status is not None:
                rec.admin_status = None if upd.status == UP else upd.status
            if upd.weight is not None:
                rec.admin_weight = upd.weight
            revision = self._publish([upd.service])
            node = rec.node()
        log.info(
            "node updated",
            extra={
                "event": "update",
                "service": upd.service,
                "node": _addr(key),
                "weight": upd.weight,
                "status": upd.status,
            },
        )
        return revision, node, rec.origin

    # -- static clusters ----------------------------------------------------------------

    def set_static(self, clusters: Mapping[str, Iterable[StaticNode]]) -> None:
        """Install static nodes. They enter the map at their first probe verdict."""
        with self._lock:
            for service, nodes in clusters.items():
                records = self._records.setdefault(service, {})
                for n in nodes:
                    key = (n.host, n.port)
                    old = records.get(key)
                    if old is not None and old.lease is not None:
                        self._leases.pop(old.lease.id, None)
                    records[key] = _Record(
                        host=n.host,
                        port=n.port,
                        origin=STATIC,
                        weight=n.weight,
                        meta=dict(n.meta),
                        probe_status="down",
                        probed=False,
                    )
            self._publish(list(clusters))

    def set_probe_status(self, service: str, host: str, port: int, status: str) -> bool:
        """Record a probe verdict for a static node; True if the map changed."""
        return self.set_probe_statuses([(service, host, port, status)])

    def set_probe_statuses(self, verdicts: Iterable[tuple[str, str, int, str]]) -> bool:
        """Record many probe verdicts as one change (one revision); True if the map changed."""
        with self._lock:
            touched = set()
            for service, host, port, status in verdicts:
                rec = self._records.get(service, {}).get((host, port))
                if rec is None or rec.origin != STATIC:
                    continue
                if rec.probed and rec.probe_status == status:
                    continue
                rec.probed = True
                rec.probe_status = status
                touched.add(service)
            if not touched:
                return False
            before = self._store.revision
            return self._publish(sorted(touched)) != before

    # -- expiry -------------------------------------------------------------------------

    def expire(self) -> list[tuple[str, str]]:
        """Expire overdue leases unless self-preservation holds them; return what expired."""
        now = self._clock()
        with self._lock:  # one reference copy; the walks below run outside the lock
            leases = list(self._leases.values())
        total = len(leases)
        min_ttl = min((lease.ttl for lease in leases), default=self._default_ttl)
        overdue = [lease for lease in leases if lease.deadline() <= now]
        silent = sum(1 for lease in leases if now - lease.renewed > lease.ttl / 2)
        with self._lock:
            self._min_ttl = min_ttl
            self._silent, self._overdue = silent, len(overdue)
            protect = (
                self._sp_threshold < 1.0
                and total >= self._sp_min
                and silent > self._sp_threshold * total
            )
            if protect != self._preserving:
                self._preserving = protect
                self._changed.notify_all()
                if protect:
                    log.warning(
                        "self-preservation on: most heartbeats stopped at once; not expiring",
                        extra={"event": "self_preservation_on", "silent": silent, "leases": total},
                    )
                else:
                    log.warning(
                        "self-preservation off: heartbeats recovered",
                        extra={"event": "self_preservation_off", "silent": silent, "leases": total},
                    )
            if protect or not overdue:
                return []
            touched = []
            for lease in overdue:
                if self._leases.get(lease.id) is not lease or lease.deadline() > now:
                    continue  # renewed or replaced since the walk
                self._drop(lease.service, lease.key)
                touched.append((lease.service, _addr(lease.key)))
            if touched:
                self._publish(sorted({s for s, _ in touched}))
        for service, node in touched:
            log.info("lease expired", extra={"event": "expire", "service": service, "node": node})
        return touched

    # -- subscription ---------------------------------------------------------------------

    def poll(self, epoch: str, revision: int, names: frozenset[str] | None = None) -> PollResult:
        """Answer a subscriber at (``epoch``, ``revision``), optionally for ``names`` only."""
        ready = self.ready()
        named: list[StoredService] = []  # with a filter: the named services that exist
        found: list[StoredService] = []
        removed: list[str] = []
        full: tuple[StoredService, ...] | None = None
        with self._lock:
            store = self._store
            current = store.revision
            if not ready:
                remaining = max(0.0, self._warmup - (self._clock() - self._started))
                return PollResult(NOT_READY, store.epoch, current, 0, retry_after=remaining)
            checksum = store.checksum
            sp = self._preserving
            if names is not None:
                named = list(filter(None, map(store.get, names)))
            if epoch == store.epoch and revision == current:
                kind = NOT_MODIFIED
            else:
                changed = store.changes_since(revision) if epoch == store.epoch else None
                if changed is None:
                    kind, epoch = FULL, store.epoch
                    if names is not None:
                        found = named
                    elif self._full is not None and self._full[:2] == (epoch, current):
                        full = self._full[2]
                    else:
                        found = store.snapshot()
                else:
                    if names is not None:
                        changed = changed & names
                    kind = DELTA if changed else NOT_MODIFIED
                    for name in changed:
                        stored = store.get(name)
                        if stored is None:
                            removed.append(name)
                        else:
                            found.append(stored)
        # outside the lock (stored values are immutable): the filter's checksum, name order
        if names is not None:
            checksum = sum(s.digest for s in named) & _MASK64
        if kind == NOT_MODIFIED:
            return PollResult(NOT_MODIFIED, epoch, current, checksum, self_preservation=sp)
        if full is None:
            found.sort(key=_SERVICE_NAME)
            removed.sort()
            full = tuple(found)
            if kind == FULL and names is None:
                self._full = (epoch, current, full)
        return PollResult(kind, epoch, current, checksum, full, tuple(removed), sp)

    def wait_changed(self, revision: int, timeout: float) -> bool:
        """Block until the revision differs from ``revision`` (True), timeout or close (False)."""
        with self._lock:
            return (
                self._changed.wait_for(
                    lambda: self._closed or self._store.revision != revision, timeout
                )
                and not self._closed
            )

    # -- inspection -----------------------------------------------------------------------

    def services(self) -> tuple[int, list[Service]]:
        with self._lock:
            revision, snapshot = self._store.revision, self._store.snapshot()
        snapshot.sort(key=_SERVICE_NAME)
        return revision, [s.service for s in snapshot]

    def service(self, name: str) -> tuple[int, StoredService, dict[tuple[str, int], str]]:
        with self._lock:
            stored = self._store.get(name)
            if stored is None:
                raise NotFound(f"unknown service {clip(name)}")
            origins = {k: r.origin for k, r in self._records.get(name, {}).items()}
            return self._store.revision, stored, origins

    def status(self) -> Status:
        ready = self.ready()
        with self._lock:
            snapshot = self._store.snapshot()
            st = Status(
                epoch=self._store.epoch,
                revision=self._store.revision,
                ready=ready,
                self_preservation=self._preserving,
                services=len(snapshot),
                nodes=0,
                leases=len(self._leases),
                silent_leases=self._silent,
                overdue_leases=self._overdue if self._preserving else 0,
                checksum=self._store.checksum,
                uptime=self._clock() - self._started,
            )
        return replace(st, nodes=sum(len(s.service.nodes) for s in snapshot))

    # -- internals (call with the lock held) ----------------------------------------------

    def _check_bounds(
        self,
        service: str,
        key: tuple[str, int],
        nodes: Mapping[tuple[str, int], object] | None,
        services: int,
    ) -> None:
        """Refuse a node beyond ``max_services`` or ``max_nodes`` (:class:`Exhausted`)."""
        if nodes is None:
            if self._max_services is not None and services >= self._max_services:
                raise Exhausted(
                    f"this server holds at most {self._max_services} services (--max-services)"
                )
        elif self._max_nodes is not None and key not in nodes and len(nodes) >= self._max_nodes:
            raise Exhausted(
                f"service {service!r} holds at most {self._max_nodes} nodes "
                "(--max-nodes-per-service)"
            )

    def _drop(self, service: str, key: tuple[str, int]) -> None:
        records = self._records.get(service, {})
        rec = records.pop(key, None)
        if rec is not None and rec.lease is not None:
            self._leases.pop(rec.lease.id, None)
        if not records:
            self._records.pop(service, None)

    def _publish(self, services: Iterable[str]) -> int:
        writes: dict[str, Service | None] = {}
        for name in services:
            records = self._records.get(name, {})
            nodes = tuple(r.node() for _, r in sorted(records.items()) if r.probed)
            if not nodes:
                writes[name] = None
                continue
            opts = self._options.get(name, _DEFAULT_OPTIONS)
            writes[name] = Service(
                name=name,
                nodes=nodes,
                strategy=opts.strategy,
                panic_threshold=opts.panic_threshold,
                meta=MappingProxyType(dict(opts.meta)),
            )
        before = self._store.revision
        revision = self._store.apply(writes)
        if revision != before:
            self._changed.notify_all()
        return revision


def _addr(key: tuple[str, int]) -> str:
    return format_address(*key)
