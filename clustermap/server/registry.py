"""The registry: nodes, leases, probes' verdicts and operators' overrides, turned into the map.

Policy lives here; storage lives in a :class:`~clustermap.server.store.NodeStore` (in memory, or
etcd shared by many replicas). The registry writes node records to the store (each write a
transaction guarded by the key's ``mod`` revision, retried on a conflict with another replica)
and follows what the store reports back (:meth:`Registry.loaded`, :meth:`Registry.changed`):
from those node records it builds each service's published value, the map checksum and the one
change log (:mod:`clustermap.server.changelog`) that answers deltas. A write returns once the
map holds its own revision (read-your-writes; folded in from the write itself when it directly
follows the map's revision, see :meth:`Registry._fold_locked`), so the two stores behave the
same:

* a service exists while it has a node in the map; its ``revision`` is the newest ``mod``
  revision of those nodes, so every replica computes the same value whenever it loaded;
* ``Register`` grants a lease of the TTL (etcd rounds up to whole seconds, which the answer
  reports), puts the node's record attached to it, keeping an operator's overrides, and revokes
  the node's previous lease; ``Heartbeat`` keeps the lease alive;
* leases expire in the store's own server with etcd (etcd's leader extends every lease on a
  leader change, so an etcd outage does not expire the fleet); in memory the registry expires
  them in :meth:`Registry.expire`, with self-preservation (below);
* static nodes (clusters file) are written by the replica that leads the store's election,
  fenced by its term (:meth:`Registry.set_static`, :meth:`Registry.set_probe_statuses`).

Threading: one :class:`threading.Lock` guards the map. It is taken by gRPC worker threads, the
main loop's expiry tick, the prober and the store's listener calls (the etcd watch thread), each
for a short, non-blocking section: the registry never calls the store with the lock held. Watch
streams wait on a :class:`threading.Condition` over the same lock, woken on every revision.

Self-preservation (stores whose leases the registry expires): a lease is *silent* when it has
not been renewed for more than half its TTL (clients heartbeat every TTL/3). When at least
``min_nodes`` leases exist and more than ``threshold`` of them are silent at once, the server is
more likely cut off than the fleet dead, so nothing expires until the silent fraction drops.

Bounds: at most ``max_services`` services and ``max_nodes`` nodes per service (None: no bound);
a registration beyond them is refused with :class:`Exhausted` naming the limit (with several
replicas, as this replica sees the map). Nothing under the lock sorts, or walks the whole map
for, one caller: a filtered poll costs what it names, the whole map is copied (references) at
most once per revision for full answers, answers are sorted after the lock is released.

Warm-up: until ``warmup`` seconds after start the registry is not *ready*: polls are answered
NOT_READY (never an empty or partial map from a freshly started server) while nodes re-register.
A replica whose store view has been stale for over ``stale_after`` seconds (its etcd watch is
down) answers polls UNAVAILABLE, so sidecars fail over to one that still follows the store.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import operator
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final, ParamSpec, TypeVar

from clustermap import trace
from clustermap.checksum import pack_node, service_digest, update_checksum
from clustermap.model import (
    DELTA,
    DOWN,
    FULL,
    NOT_MODIFIED,
    NOT_READY,
    UP,
    Node,
    Service,
    format_address,
)
from clustermap.rules import clip
from clustermap.server.changelog import ChangeLog
from clustermap.server.store import (
    REGISTERED,
    STATIC,
    Delete,
    Deposed,
    LeaseGone,
    NodeEntry,
    NodeEvent,
    NodeKey,
    NodeRecord,
    NodeStore,
    Op,
    Put,
    StoreError,
    Term,
)
from clustermap.server.validation import NodeAddress, NodeUpdate, Registration, ServiceOptions

__all__ = [
    "DELTA",
    "FULL",
    "NOT_MODIFIED",
    "NOT_READY",
    "REGISTERED",
    "STATIC",
    "Conflict",
    "Deposed",
    "Exhausted",
    "NotFound",
    "PollResult",
    "RegisterResult",
    "Registry",
    "RegistryError",
    "StaticNode",
    "Status",
    "StoredService",
    "Unavailable",
]

log = logging.getLogger("clustermap.server.registry")

_DEFAULT_OPTIONS: Final = ServiceOptions()
_MASK64: Final = (1 << 64) - 1
_SERVICE_NAME: Final = operator.attrgetter("service.name")
_ATTEMPTS: Final = 10
_LEASE_LIMIT: Final = 1 << 128

P = ParamSpec("P")
R = TypeVar("R")


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


def _store_call(fn: Callable[P, R]) -> Callable[P, R]:
    """The store failing (after its own retries) → :class:`Unavailable` (gRPC UNAVAILABLE)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except StoreError as exc:
            raise Unavailable(str(exc)) from None

    return wrapper


@dataclass(frozen=True, slots=True)
class _Slot:
    """A node's stored entry, the node it publishes and its part of the service digest (built
    once per change of the node, not per change of its service)."""

    entry: NodeEntry
    node: Node
    packed: bytes

    @classmethod
    def of(cls, key: tuple[str, int], entry: NodeEntry) -> _Slot:
        node = entry.record.node(*key)
        return cls(entry, node, pack_node(node))


_Nodes = dict[str, dict[tuple[str, int], _Slot]]


@dataclass(frozen=True, slots=True)
class StoredService:
    """A service as published: its value (``service.revision`` set) and digest."""

    service: Service
    digest: int


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
    leases_expired: int = 0


class Registry:
    """Thread-safe registry over a :class:`NodeStore` (see the module docstring)."""

    def __init__(
        self,
        store: NodeStore,
        *,
        default_ttl: float = 10.0,
        warmup: float | None = None,
        self_preservation_threshold: float = 0.5,
        self_preservation_min_nodes: int = 3,
        options: Mapping[str, ServiceOptions] | None = None,
        max_services: int | None = None,
        max_nodes: int | None = None,
        log_size: int = 10_000,
        stale_after: float = 3.0,
        write_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._max_services = max_services
        self._max_nodes = max_nodes
        self._full: tuple[str, int, tuple[StoredService, ...]] | None = None
        self._default_ttl = default_ttl
        self._clock = clock
        self._started = clock()
        self._warmup = default_ttl if warmup is None else warmup
        self._ready = self._warmup <= 0
        self._sp_threshold = self_preservation_threshold
        self._sp_min = self_preservation_min_nodes
        self._options = dict(options or {})
        self._stale_after = stale_after
        self._write_timeout = write_timeout
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # the map, as built from the store's records (all under the lock)
        self._epoch = ""
        self._revision = 0
        self._checksum = 0
        self._nodes: _Nodes = {}
        self._order: dict[str, list[tuple[str, int]]] = {}  # each service's nodes, sorted
        self._services: dict[str, StoredService] = {}
        self._by_lease: dict[int, NodeKey] = {}
        self._static: set[NodeKey] = set()
        self._log = ChangeLog(log_size)
        self._own: dict[int, list[NodeEvent]] = {}  # our commits the map does not hold yet
        self._expired = 0
        self._preserving = False
        self._min_ttl = default_ttl
        self._silent = 0
        self._overdue = 0
        self._closed = False
        store.start(self)

    # -- state ----------------------------------------------------------------------------

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def revision(self) -> int:
        """The current revision, read without the lock (one int: a read that races a change
        sees the revision before it, as a call a moment earlier would have)."""
        return self._revision

    @property
    def default_ttl(self) -> float:
        return self._default_ttl

    @property
    def store(self) -> NodeStore:
        return self._store

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

    # -- what the store reports (Listener) ------------------------------------------------

    def loaded(self, epoch: str, revision: int, entries: Mapping[NodeKey, NodeEntry]) -> None:
        nodes = _group(entries)
        order = {name: sorted(records) for name, records in nodes.items()}
        services = self._build_all(nodes, order)
        checksum = 0
        for stored in services.values():
            checksum = update_checksum(checksum, None, stored.digest)
        with self._lock:
            self._epoch, self._revision, self._checksum = epoch, revision, checksum
            self._nodes, self._services, self._order = nodes, services, order
            self._by_lease = {e.lease: k for k, e in entries.items() if e.lease}
            self._static = {k for k, e in entries.items() if e.record.origin == STATIC}
            self._log.reset(revision)
            self._full = None
            self._fold_locked()
            self._changed.notify_all()

    def changed(self, revision: int, events: Sequence[NodeEvent]) -> None:
        with self._lock:
            self._apply_locked(revision, events)
            self._fold_locked()

    def _apply_locked(self, revision: int, events: Sequence[NodeEvent]) -> None:
        """Move the map to ``revision`` by ``events``; those of revisions it already holds (a
        write of ours folded in before the store's watch delivered it) are skipped."""
        if revision <= self._revision:
            return
        current = self._revision
        touched: set[str] = set()
        for ev in events:
            if ev.revision and ev.revision <= current:
                continue
            service, host, port = ev.key
            records = self._nodes.get(service)
            slot = records.get((host, port)) if records else None
            old = slot.entry if slot is not None else None
            if old is not None and old.lease:
                self._by_lease.pop(old.lease, None)
            if ev.entry is None:
                if records is None or old is None:
                    continue
                del records[(host, port)]
                if not records:
                    del self._nodes[service]
                    del self._order[service]
                else:
                    order = self._order[service]
                    del order[bisect.bisect_left(order, (host, port))]
                self._static.discard(ev.key)
                if ev.expired and old.lease:
                    self._expired += 1
            else:
                if old is None:
                    bisect.insort(self._order.setdefault(service, []), (host, port))
                self._nodes.setdefault(service, {})[(host, port)] = _Slot.of((host, port), ev.entry)
                if ev.entry.lease:
                    self._by_lease[ev.entry.lease] = ev.key
                if ev.entry.record.origin == STATIC:
                    self._static.add(ev.key)
                else:
                    self._static.discard(ev.key)
            touched.add(service)
        changed = []
        for name in sorted(touched):
            old_s = self._services.get(name)
            new_s = self._build(name, self._nodes, self._order)
            if _same(old_s, new_s):
                continue
            if new_s is None:
                del self._services[name]
            else:
                self._services[name] = new_s
            self._checksum = update_checksum(
                self._checksum,
                old_s.digest if old_s else None,
                new_s.digest if new_s else None,
            )
            changed.append(name)
        self._log.append(revision, changed)
        self._revision = revision
        trace.mark("server.commit", revision)
        self._changed.notify_all()

    def _fold_locked(self) -> None:
        """Apply our own committed writes that directly follow the map's revision.

        A store revision counts every write to the store, so a write of ours committed at the
        revision right after the map's changed exactly what it wrote: the map moves to it at
        once, as the store's watch would later (and then skips it), and the write is answered
        without waiting for the watch. A write past a gap (someone else's revisions between)
        waits in :attr:`_own` until the watch (or a fold) fills the gap."""
        own = self._own
        while own:
            events = own.pop(self._revision + 1, None)
            if events is None:
                for stale in [r for r in own if r <= self._revision]:
                    del own[stale]
                return
            self._apply_locked(self._revision + 1, events)

    # -- registry calls -------------------------------------------------------------------

    @_store_call
    def register(self, reg: Registration) -> RegisterResult:
        ttl = self._default_ttl if reg.ttl is None else reg.ttl
        key = (reg.service, reg.host, reg.port)
        for _ in range(_ATTEMPTS):
            with self._lock:
                records = self._nodes.get(reg.service)
                self._check_bounds(reg.service, key[1:], records, len(self._nodes))
                slot = records.get(key[1:]) if records else None
            entry = slot.entry if slot is not None else None
            if entry is not None and entry.record.origin == STATIC:
                raise Conflict(
                    f"{reg.service} {_addr(key)} is a static node (edit the clusters file)"
                )
            record = NodeRecord(
                weight=reg.weight,
                meta=dict(reg.meta),
                admin_weight=entry.record.admin_weight if entry else None,
                admin_status=entry.record.admin_status if entry else None,
            )
            lease, granted = self._store.grant(ttl) if ttl > 0 else (0, 0.0)
            try:
                revision = self._commit([Put(key, record, lease, _mod(entry))])
            except LeaseGone:  # our brand-new lease vanished: try again
                revision = None
            if revision is None:
                if lease:
                    self._store.revoke(lease)
                continue
            if entry is not None and entry.lease and entry.lease != lease:
                self._store.revoke(entry.lease)
            log.info(
                "registered",
                extra={"event": "register", "service": reg.service, "node": _addr(key), "ttl": ttl},
            )
            lease_id = f"{lease:x}" if lease else ""
            return RegisterResult(lease_id, granted, revision, record.node(reg.host, reg.port))
        raise RegistryError("too many concurrent changes to this node; try again")

    @_store_call
    def heartbeat(self, lease_id: str) -> float:
        """Renew a lease; return its TTL. :class:`NotFound` if it expired or never existed."""
        try:
            lease = int(lease_id, 16)
        except ValueError:
            lease = 0
        ttl = self._store.keepalive(lease) if 0 < lease < _LEASE_LIMIT else 0.0
        if ttl <= 0:
            raise NotFound("unknown lease (expired, replaced or the server restarted)")
        return ttl

    @_store_call
    def deregister(self, addr: NodeAddress) -> int:
        key = (addr.service, addr.host, addr.port)
        for _ in range(_ATTEMPTS):
            entry = self._entry(key)
            if entry is None:
                raise NotFound(f"no node {_addr(key)} in service {addr.service!r}")
            if entry.record.origin == STATIC:
                raise Conflict(f"{addr.service} {_addr(key)} is a static node; use set --status")
            revision = self._commit([Delete(key, entry.mod)])
            if revision is None:
                continue
            if entry.lease:
                self._store.revoke(entry.lease)
            log.info(
                "deregistered",
                extra={"event": "deregister", "service": addr.service, "node": _addr(key)},
            )
            return revision
        raise RegistryError("too many concurrent changes to this node; try again")

    @_store_call
    def update_node(self, upd: NodeUpdate) -> tuple[int, Node, str]:
        """Apply an operator's override; return (revision, node as published, origin).

        ``status="up"`` clears a status override (the node's own status returns: up for a
        registered node, the probes' verdict for a static one); a weight override stays until
        the node is deregistered."""
        key = (upd.service, upd.host, upd.port)
        for _ in range(_ATTEMPTS):
            entry = self._entry(key)
            if entry is None:
                break
            record = entry.record
            if upd.status is not None:
                record = replace(record, admin_status=None if upd.status == UP else upd.status)
            if upd.weight is not None:
                record = replace(record, admin_weight=upd.weight)
            if record == entry.record:
                return self._revision, record.node(upd.host, upd.port), record.origin
            try:
                revision = self._commit([Put(key, record, entry.lease, entry.mod)])
            except LeaseGone:  # the lease expired meanwhile: the node is going
                self._catch_up(self._store.barrier(self._revision))
                continue
            if revision is None:
                continue
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
            return revision, record.node(upd.host, upd.port), record.origin
        raise NotFound(f"no node {_addr(key)} in service {upd.service!r}")

    # -- static clusters ----------------------------------------------------------------

    @_store_call
    def set_static(
        self, clusters: Mapping[str, Iterable[StaticNode]], term: Term | None = None
    ) -> None:
        """Make the stored static nodes those of ``clusters``: new ones enter the map at their
        first probe verdict, changed ones keep their verdict, others go. Fenced by ``term``."""
        wanted = {(svc, n.host, n.port): n for svc, nodes in clusters.items() for n in nodes}
        for _ in range(_ATTEMPTS):
            ops: list[Op] = []
            replaced: list[int] = []
            with self._lock:
                for key, n in wanted.items():
                    entry = self._entry_locked(key)
                    if entry is not None and entry.record.origin == STATIC:
                        record = replace(entry.record, weight=n.weight, meta=dict(n.meta))
                        if record == entry.record:
                            continue
                    else:
                        record = NodeRecord(
                            weight=n.weight,
                            status=DOWN,
                            meta=dict(n.meta),
                            origin=STATIC,
                            probed=False,
                        )
                        if entry is not None and entry.lease:
                            replaced.append(entry.lease)
                    ops.append(Put(key, record, 0, _mod(entry)))
                for key in self._static - wanted.keys():
                    ops.append(Delete(key, _mod(self._entry_locked(key))))
            if self._commit_all(ops, term):
                for lease in replaced:
                    self._store.revoke(lease)
                return
        raise RegistryError("too many concurrent changes to static nodes; try again")

    def set_probe_status(self, service: str, host: str, port: int, status: str) -> bool:
        """Record a probe verdict for a static node; True if the map changed."""
        return self.set_probe_statuses([(service, host, port, status)])

    @_store_call
    def set_probe_statuses(
        self, verdicts: Iterable[tuple[str, str, int, str]], term: Term | None = None
    ) -> bool:
        """Record many probe verdicts as one change (one revision per store transaction);
        True if anything was written. Fenced by ``term``: :class:`Deposed` once it ended."""
        verdicts = list(verdicts)
        for _ in range(_ATTEMPTS):
            ops: list[Op] = []
            with self._lock:
                for service, host, port, status in verdicts:
                    entry = self._entry_locked((service, host, port))
                    if entry is None or entry.record.origin != STATIC:
                        continue
                    if entry.record.probed and entry.record.status == status:
                        continue
                    record = replace(entry.record, probed=True, status=status)
                    ops.append(Put((service, host, port), record, entry.lease, entry.mod))
            if not ops:
                return False
            if self._commit_all(ops, term):
                return True
        raise RegistryError("too many concurrent changes to static nodes; try again")

    # -- expiry -------------------------------------------------------------------------

    def expire(self) -> list[tuple[str, str]]:
        """Expire overdue leases unless self-preservation holds them; return what expired.
        Nothing to do when the store expires leases itself (etcd)."""
        leases = self._store.leases()
        if leases is None:
            return []
        now = self._clock()
        total = len(leases)
        min_ttl = min((lease.ttl for lease in leases), default=self._default_ttl)
        overdue = [lease.id for lease in leases if lease.deadline() <= now]
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
            owners = {lease: self._by_lease.get(lease) for lease in overdue}
        expired = self._store.expire(overdue)  # those renewed since are kept
        touched = sorted((k[0], _addr(k)) for lease in expired if (k := owners.get(lease)))
        for service, node in touched:
            log.info("lease expired", extra={"event": "expire", "service": service, "node": node})
        return touched

    # -- subscription ---------------------------------------------------------------------

    def following(self) -> bool:
        """Whether this replica's view of its store is current enough to answer polls (False:
        they are refused :class:`Unavailable`). Lock-free and non-blocking."""
        return self._store.stale_for() <= self._stale_after

    def poll(self, epoch: str, revision: int, names: frozenset[str] | None = None) -> PollResult:
        """Answer a subscriber at (``epoch``, ``revision``), optionally for ``names`` only."""
        lost = self._store.stale_for()
        if lost > self._stale_after:  # our view may be stale: send subscribers elsewhere
            raise Unavailable(f"this server lost its store's watch {lost:.0f} s ago")
        ready = self.ready()
        if epoch and epoch == self._epoch and ready:
            with self._lock:
                ahead = revision > self._revision
                behind = revision < self._log.floor and not self._log.bridged(revision)
            if ahead:  # the subscriber saw a replica further along: wait for ours
                with contextlib.suppress(StoreError, Unavailable):  # else: a full map
                    self._catch_up(self._store.barrier(revision), timeout=1.0)
            elif behind:  # older than our change log: ask the store's history
                self._bridge(revision)
        named: list[StoredService] = []  # with a filter: the named services that exist
        found: list[StoredService] = []
        removed: list[str] = []
        full: tuple[StoredService, ...] | None = None
        with self._lock:
            current = self._revision
            if not ready:
                remaining = max(0.0, self._warmup - (self._clock() - self._started))
                return PollResult(NOT_READY, self._epoch, current, 0, retry_after=remaining)
            checksum = self._checksum
            sp = self._preserving
            services = self._services
            if names is not None:
                named = list(filter(None, map(services.get, names)))
            if epoch == self._epoch and revision == current:
                kind = NOT_MODIFIED
            else:
                changed = self._log.since(revision) if epoch == self._epoch else None
                if changed is None:
                    kind, epoch = FULL, self._epoch
                    if names is not None:
                        found = named
                    elif self._full is not None and self._full[:2] == (epoch, current):
                        full = self._full[2]
                    else:
                        found = list(services.values())
                else:
                    if names is not None:
                        changed = changed & names
                    kind = DELTA if changed else NOT_MODIFIED
                    for name in changed:
                        stored = services.get(name)
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
                self._changed.wait_for(lambda: self._closed or self._revision != revision, timeout)
                and not self._closed
            )

    # -- inspection -----------------------------------------------------------------------

    def services(self) -> tuple[int, list[Service]]:
        with self._lock:
            revision, snapshot = self._revision, list(self._services.values())
        snapshot.sort(key=_SERVICE_NAME)
        return revision, [s.service for s in snapshot]

    def service(self, name: str) -> tuple[int, StoredService, dict[tuple[str, int], str]]:
        with self._lock:
            stored = self._services.get(name)
            if stored is None:
                raise NotFound(f"unknown service {clip(name)}")
            origins = {k: s.entry.record.origin for k, s in self._nodes.get(name, {}).items()}
            return self._revision, stored, origins

    def status(self) -> Status:
        ready = self.ready()
        with self._lock:
            snapshot = list(self._services.values())
            st = Status(
                epoch=self._epoch,
                revision=self._revision,
                ready=ready,
                self_preservation=self._preserving,
                services=len(snapshot),
                nodes=0,
                leases=len(self._by_lease),
                silent_leases=self._silent,
                overdue_leases=self._overdue if self._preserving else 0,
                checksum=self._checksum,
                uptime=self._clock() - self._started,
                leases_expired=self._expired,
            )
        return replace(st, nodes=sum(len(s.service.nodes) for s in snapshot))

    # -- internals ------------------------------------------------------------------------

    def _entry(self, key: NodeKey) -> NodeEntry | None:
        with self._lock:
            return self._entry_locked(key)

    def _entry_locked(self, key: NodeKey) -> NodeEntry | None:
        records = self._nodes.get(key[0])
        slot = records.get(key[1:]) if records else None
        return slot.entry if slot is not None else None

    def _commit(self, ops: Sequence[Op], term: Term | None = None) -> int | None:
        """One store transaction; once the map holds its revision, that revision (None: a guard
        failed, and the registry has caught up with the store: reread and retry). The map holds
        it at once when it directly follows the map's revision (:meth:`_fold_locked`), else
        once the store's watch delivered it (read-your-writes either way)."""
        committed, seen = self._store.commit(ops, term)
        if committed is None:
            self._catch_up(seen)
            return None
        with self._lock:
            if committed > self._revision:
                self._own[committed] = [_event(op, committed) for op in ops]
                self._fold_locked()
        self._catch_up(committed)
        return committed

    def _commit_all(self, ops: Sequence[Op], term: Term | None) -> bool:
        """``ops`` in transactions of the store's size; False if a guard failed (retry)."""
        step = max(1, self._store.max_ops)
        for i in range(0, len(ops), step):
            if self._commit(ops[i : i + step], term) is None:
                return False
        return True

    def _catch_up(self, revision: int, timeout: float | None = None) -> None:
        with self._lock:
            if not self._changed.wait_for(
                lambda: self._revision >= revision or self._closed,
                self._write_timeout if timeout is None else timeout,
            ):
                raise Unavailable(f"this server did not see revision {revision} of its store")

    def _bridge(self, revision: int) -> None:
        """What changed between ``revision`` and the change log, from the store's history."""
        try:
            entries = self._store.history(revision)
        except StoreError as exc:
            log.warning("history read failed: %s", exc)
            return
        if entries is None:
            return
        old = {n: s.digest for n, s in self._build_all(_group(entries)).items()}
        with self._lock:
            now = {n: s.digest for n, s in self._services.items()}
            names = frozenset(n for n in old.keys() | now.keys() if old.get(n) != now.get(n))
            self._log.remember(revision, self._revision, names)

    def _build_all(
        self, nodes: _Nodes, order: Mapping[str, list[tuple[str, int]]] | None = None
    ) -> dict[str, StoredService]:
        built = {name: self._build(name, nodes, order) for name in nodes}
        return {name: s for name, s in built.items() if s is not None}

    def _build(
        self, name: str, nodes: _Nodes, order: Mapping[str, list[tuple[str, int]]] | None = None
    ) -> StoredService | None:
        """``name`` as published from ``nodes``; ``order``: each service's node keys already
        sorted (kept up to date by the registry rather than sorted again on every change)."""
        records = nodes.get(name)
        if not records:
            return None
        keys = order.get(name) if order is not None else None
        slots = [
            s
            for s in map(records.__getitem__, sorted(records) if keys is None else keys)
            if s.entry.record.probed
        ]
        if not slots:
            return None
        opts = self._options.get(name, _DEFAULT_OPTIONS)
        service = Service(
            name=name,
            nodes=tuple(s.node for s in slots),
            strategy=opts.strategy,
            panic_threshold=opts.panic_threshold,
            meta=MappingProxyType(dict(opts.meta)),
            revision=max(s.entry.mod for s in slots),
        )
        return StoredService(service, service_digest(service, [s.packed for s in slots]))

    def _check_bounds(
        self,
        service: str,
        key: tuple[str, int],
        nodes: Mapping[tuple[str, int], object] | None,
        services: int,
    ) -> None:
        """Refuse a node beyond ``max_services`` or ``max_nodes`` (:class:`Exhausted`)."""
        if not nodes:
            if self._max_services is not None and services >= self._max_services:
                raise Exhausted(
                    f"this server holds at most {self._max_services} services (--max-services)"
                )
        elif self._max_nodes is not None and key not in nodes and len(nodes) >= self._max_nodes:
            raise Exhausted(
                f"service {service!r} holds at most {self._max_nodes} nodes "
                "(--max-nodes-per-service)"
            )


def _group(entries: Mapping[NodeKey, NodeEntry]) -> _Nodes:
    nodes: _Nodes = {}
    for (service, host, port), entry in entries.items():
        nodes.setdefault(service, {})[(host, port)] = _Slot.of((host, port), entry)
    return nodes


def _same(a: StoredService | None, b: StoredService | None) -> bool:
    """Whether a rebuilt service is the one published (digests first: cheap, and almost always
    what differs)."""
    if a is None or b is None:
        return a is b
    return (
        a.digest == b.digest and a.service.revision == b.service.revision and a.service == b.service
    )


def _event(op: Op, revision: int) -> NodeEvent:
    """What ``op``, committed at ``revision``, changed (as the store's watch reports it)."""
    if isinstance(op, Put):
        return NodeEvent(op.key, NodeEntry(op.record, revision, op.lease), revision=revision)
    return NodeEvent(op.key, None, revision=revision)


def _mod(entry: NodeEntry | None) -> int:
    """The guard for a write over ``entry``: its mod revision, 0 for "still absent"."""
    return entry.mod if entry is not None else 0


def _addr(key: tuple[str, int] | NodeKey) -> str:
    return format_address(*key[-2:])
