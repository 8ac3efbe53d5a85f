"""The registry when the map lives in etcd: stateless replicas over one :class:`EtcdStore`.

With the in-memory store the registry's records are the truth; with etcd the truth is etcd, so
every registry call is a write to the node's key (guarded by its ``mod_revision``, retried on a
conflict with another replica), and reads come from the store's watched cache:

* ``Register`` grants an etcd lease of the TTL (etcd rounds up to whole seconds and to its
  minimum, which the answer reports) and puts the node key attached to it, keeping an
  operator's overrides; the previous lease of that node is revoked, so it stops working.
* ``Heartbeat`` is one etcd ``LeaseKeepAlive``; a lease etcd no longer knows → NOT_FOUND.
* Expiry is etcd's: when a lease expires, etcd deletes the node key and every replica's watch
  removes the node. Self-preservation therefore does not apply (etcd's leader extends every
  lease on a leader change, so an etcd outage does not expire the fleet).
* Polls are answered from the cache; a subscriber ahead of this replica waits for it to catch
  up, one behind its local log gets a delta from etcd's history (see :mod:`.etcd_store`).
  A replica whose watch has been down for over ``stale_after`` seconds answers polls
  UNAVAILABLE, so sidecars fail over to a replica that still follows etcd; etcd failing a
  registry call (after the store's retries) is UNAVAILABLE too.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar

import grpc

from clustermap.model import UP, Node
from clustermap.rules import clip
from clustermap.server.etcd_store import EtcdError, EtcdStore, NodeEntry, node_from_record
from clustermap.server.registry import (
    REGISTERED,
    STATIC,
    Conflict,
    NotFound,
    PollResult,
    RegisterResult,
    Registry,
    RegistryError,
    StaticNode,
    Status,
    Unavailable,
    _addr,
)
from clustermap.server.store import StoredService
from clustermap.server.validation import NodeAddress, NodeUpdate, Registration

__all__ = ["EtcdRegistry"]

log = logging.getLogger("clustermap.server.registry")

_ATTEMPTS = 10

P = ParamSpec("P")
R = TypeVar("R")


def _etcd_call(fn: Callable[P, R]) -> Callable[P, R]:
    """etcd failing (after the store's retries) → :class:`Unavailable` (gRPC UNAVAILABLE)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as exc:
            raise Unavailable(f"etcd: {exc.code().name}: {exc.details()}") from None
        except EtcdError as exc:
            raise Unavailable(f"etcd: {exc}") from None

    return wrapper


class EtcdRegistry(Registry):
    """:class:`Registry` whose records are etcd keys (see the module docstring)."""

    def __init__(self, store: EtcdStore, *, stale_after: float = 3.0, **kw: Any) -> None:
        kw.setdefault("warmup", 0.0)
        super().__init__(store, **kw)
        self._etcd = store
        self._stale_after = stale_after
        store.start(self._changed)

    def tick(self) -> float:
        return 0.5

    def _entry(self, service: str, host: str, port: int) -> NodeEntry | None:
        with self._lock:
            return self._etcd.node_entry(service, host, port)

    # -- registry calls -------------------------------------------------------------------

    @_etcd_call
    def register(self, reg: Registration) -> RegisterResult:
        ttl = self._default_ttl if reg.ttl is None else reg.ttl
        key = (reg.host, reg.port)
        for _ in range(_ATTEMPTS):
            with self._lock:  # bounds as this replica sees the map (other replicas may race)
                nodes = self._etcd.node_entries(reg.service)
                self._check_bounds(reg.service, key, nodes or None, len(self._etcd))
            entry = self._entry(reg.service, *key)
            if entry is not None and entry.origin == STATIC:
                raise Conflict(
                    f"{reg.service} {_addr(key)} is a static node (edit the clusters file)"
                )
            record = {
                "w": reg.weight,
                "s": UP,
                "m": dict(reg.meta),
                "o": REGISTERED,
                "aw": entry.record.get("aw") if entry else None,
                "as": entry.record.get("as") if entry else None,
            }
            lease, granted = self._etcd.grant(ttl) if ttl > 0 else (0, 0)
            try:
                revision = self._etcd.put_node(
                    reg.service, *key, record, lease=lease, expect_mod=entry.mod if entry else 0
                )
            except LookupError:  # our brand-new lease vanished: try again
                revision = None
            if revision is None:
                if lease:
                    self._etcd.revoke(lease)
                continue
            if entry is not None and entry.lease and entry.lease != lease:
                self._etcd.revoke(entry.lease)
            log.info(
                "registered",
                extra={"event": "register", "service": reg.service, "node": _addr(key), "ttl": ttl},
            )
            node = node_from_record(reg.host, reg.port, record)
            return RegisterResult(f"{lease:x}" if lease else "", float(granted), revision, node)
        raise RegistryError("too many concurrent changes to this node; try again")

    @_etcd_call
    def heartbeat(self, lease_id: str) -> float:
        try:
            lease = int(lease_id, 16)
        except ValueError:
            raise NotFound("unknown lease (expired, replaced or never granted)") from None
        ttl = self._etcd.keepalive(lease) if 0 < lease < 1 << 63 else 0
        if ttl <= 0:
            raise NotFound("unknown lease (expired, replaced or never granted)")
        return float(ttl)

    @_etcd_call
    def deregister(self, addr: NodeAddress) -> int:
        key = (addr.host, addr.port)
        for _ in range(_ATTEMPTS):
            entry = self._entry(addr.service, *key)
            if entry is None:
                raise NotFound(f"no node {_addr(key)} in service {addr.service!r}")
            if entry.origin == STATIC:
                raise Conflict(f"{addr.service} {_addr(key)} is a static node; use set --status")
            revision = self._etcd.delete_node(addr.service, *key, expect_mod=entry.mod)
            if revision is None:
                continue
            if entry.lease:
                self._etcd.revoke(entry.lease)
            log.info(
                "deregistered",
                extra={"event": "deregister", "service": addr.service, "node": _addr(key)},
            )
            return revision
        raise RegistryError("too many concurrent changes to this node; try again")

    @_etcd_call
    def update_node(self, upd: NodeUpdate) -> tuple[int, Node, str]:
        key = (upd.host, upd.port)
        for _ in range(_ATTEMPTS):
            entry = self._entry(upd.service, *key)
            if entry is None:
                raise NotFound(f"no node {_addr(key)} in service {upd.service!r}")
            record = dict(entry.record)
            if upd.status is not None:
                record["as"] = None if upd.status == UP else upd.status
            if upd.weight is not None:
                record["aw"] = upd.weight
            if record == dict(entry.record):
                with self._lock:
                    return self._etcd.revision, entry.node, entry.origin
            try:
                revision = self._etcd.put_node(
                    upd.service, *key, record, lease=entry.lease, expect_mod=entry.mod
                )
            except LookupError:  # the lease expired meanwhile: the node is gone
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
            return revision, node_from_record(upd.host, upd.port, record), entry.origin
        raise NotFound(f"no node {_addr(key)} in service {upd.service!r}")

    # -- static clusters: not with etcd (yet) ---------------------------------------------

    def set_static(self, clusters: Mapping[str, Iterable[StaticNode]]) -> None:
        if any(True for nodes in clusters.values() for _ in nodes):
            raise RegistryError("static clusters are not supported with the etcd store yet")

    def set_probe_statuses(self, verdicts: Iterable[tuple[str, str, int, str]]) -> bool:
        return False

    # -- expiry: etcd's job -----------------------------------------------------------------

    def expire(self) -> list[tuple[str, str]]:
        return []

    # -- subscription and inspection ------------------------------------------------------

    def poll(self, epoch: str, revision: int, names: frozenset[str] | None = None) -> PollResult:
        lost = self._etcd.lost_for()
        if lost > self._stale_after:  # our cache may be stale: send subscribers elsewhere
            raise Unavailable(f"this server lost its etcd watch {lost:.0f} s ago")
        if epoch and epoch == self._etcd.epoch and self.ready():
            with self._lock:
                ahead = revision > self._etcd.revision
                behind = revision < self._etcd.floor
            if ahead:  # the subscriber saw a replica further along: wait for ours
                self._etcd.catch_up(revision, timeout=1.0)
            elif behind:  # older than our local log: ask etcd's history
                self._etcd.prepare_history(revision)
        return super().poll(epoch, revision, names)

    def service(self, name: str) -> tuple[int, StoredService, dict[tuple[str, int], str]]:
        with self._lock:
            stored = self._store.get(name)
            if stored is None:
                raise NotFound(f"unknown service {clip(name)}")
            origins = {k: e.origin for k, e in self._etcd.node_entries(name).items()}
            return self._store.revision, stored, origins

    def status(self) -> Status:
        st = super().status()
        with self._lock:
            leases = self._etcd.lease_count()
        return Status(
            epoch=st.epoch,
            revision=st.revision,
            ready=st.ready,
            self_preservation=False,
            services=st.services,
            nodes=st.nodes,
            leases=leases,
            silent_leases=0,
            overdue_leases=0,
            checksum=st.checksum,
            uptime=st.uptime,
        )
