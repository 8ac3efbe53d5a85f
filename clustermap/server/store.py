"""Where the registry's nodes live: the node-and-lease store interface and its in-memory version.

A store holds what is stored, nothing more: one *record* per node (``service, host, port``), each
optionally attached to a *lease*, under one global revision. It knows nothing of services,
deltas, checksums or policy; the :class:`~clustermap.server.registry.Registry` builds the map
from the records and keeps the one change log. Both stores speak etcd's model:

* :meth:`NodeStore.commit` is one atomic transaction of puts and deletes, each guarded by the
  key's expected ``mod`` revision (0: absent; None: any), optionally *fenced* by a leader's
  :class:`Term` (etcd: a compare on the leader key's create revision). It returns the new
  revision, or None when a guard failed (another writer was first; reread and retry);
* leases are granted with a TTL, kept alive, revoked; revoking (or expiring) a lease deletes the
  keys attached to it in one revision;
* every change reaches the registry as :class:`NodeEvent`\\ s through the *listener* given to
  :meth:`NodeStore.start`, in revision order: synchronously from :meth:`commit` in memory, from
  the watch thread with etcd (:mod:`clustermap.server.etcd_store`). :meth:`Listener.loaded`
  (re)starts from a full list of entries (start, or an etcd reload after compaction).

Leases expire in the store's own server with etcd; in memory, the registry decides when (it
holds expiry back in self-preservation) from :meth:`MemoryStore.leases`, and calls
:meth:`MemoryStore.expire`. :meth:`NodeStore.leases` returning None says "not ours to expire".

Threading: a store serialises its own calls. The listener is called with the store's ordering
guarantees but must not call back into the store; the registry never holds its lock while it
calls the store.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Protocol

from clustermap.model import UP, Node

__all__ = [
    "REGISTERED",
    "STATIC",
    "Delete",
    "Deposed",
    "Election",
    "LeaseGone",
    "LeaseState",
    "Listener",
    "LocalElection",
    "MemoryStore",
    "NodeEntry",
    "NodeEvent",
    "NodeKey",
    "NodeRecord",
    "NodeStore",
    "Op",
    "Put",
    "StoreError",
    "Term",
]

REGISTERED: Final = "registered"
STATIC: Final = "static"

NodeKey = tuple[str, str, int]
"""(service, host, port): one stored node."""


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What is stored for one node. ``status`` is the node's own (up when registered, the probes'
    verdict when static); ``probed`` False keeps a static node out of the map until its first
    verdict; ``admin_*`` are an operator's overrides."""

    weight: int = 1
    status: str = UP
    meta: Mapping[str, str] = field(default_factory=dict)
    origin: str = REGISTERED
    probed: bool = True
    admin_weight: int | None = None
    admin_status: str | None = None

    def node(self, host: str, port: int) -> Node:
        return Node(
            host=host,
            port=port,
            weight=self.weight if self.admin_weight is None else self.admin_weight,
            status=self.admin_status or self.status,
            meta=MappingProxyType(dict(self.meta)),
        )


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """A stored record with the store's metadata: its last ``mod`` revision and ``lease`` (0:
    none)."""

    record: NodeRecord
    mod: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class NodeEvent:
    """One key changed: its new entry, or None when deleted (``expired``: by its lease's
    expiry, not by a request) at ``revision`` (0: the revision it is reported with)."""

    key: NodeKey
    entry: NodeEntry | None
    expired: bool = False
    revision: int = 0


@dataclass(frozen=True, slots=True)
class Put:
    key: NodeKey
    record: NodeRecord
    lease: int = 0
    expect: int | None = None  # the key's mod revision now; 0: absent; None: unguarded


@dataclass(frozen=True, slots=True)
class Delete:
    key: NodeKey
    expect: int | None = None


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class Term:
    """A leader's term: writes fenced by it fail once another replica leads. ``key`` and
    ``revision`` are the etcd leader key and its create revision (empty/0 in memory)."""

    key: bytes = b""
    revision: int = 0
    lease: int = 0


@dataclass(frozen=True, slots=True)
class LeaseState:
    id: int
    ttl: float
    renewed: float

    def deadline(self) -> float:
        return self.renewed + self.ttl


class StoreError(Exception):
    """The store cannot be reached or refused a request (after its own retries)."""


class Deposed(Exception):
    """A fenced write was refused: the term ended (another replica leads now)."""


class LeaseGone(LookupError):
    """A put named a lease that no longer exists."""


class Listener(Protocol):
    """What a store feeds (the registry)."""

    @property
    def revision(self) -> int:
        """The newest revision the listener holds (it may hold writes of its own before the
        store reports them): a store need not report changes up to it."""
        ...

    def loaded(self, epoch: str, revision: int, entries: Mapping[NodeKey, NodeEntry]) -> None:
        """Everything stored at ``revision``; forget what came before."""
        ...

    def changed(self, revision: int, events: Sequence[NodeEvent]) -> None:
        """The keys one revision (or a run of revisions ending at ``revision``) changed."""
        ...


class Election(Protocol):
    """One candidate for the prober's job (see :mod:`clustermap.server.election`)."""

    def campaign(self, stop: threading.Event) -> Term | None:
        """Block until this replica leads (its term) or ``stop`` is set (None)."""
        ...

    def leading(self, term: Term) -> bool:
        """Whether ``term`` is still ours as far as this replica knows (writes stay fenced)."""
        ...

    def resign(self) -> None: ...


class NodeStore(Protocol):
    """The storage interface the registry needs (see the module docstring)."""

    max_ops: int
    """The most operations one :meth:`commit` may carry."""

    def start(self, listener: Listener) -> None:
        """Load everything into ``listener`` and keep it fed."""
        ...

    def close(self) -> None: ...

    def commit(self, ops: Sequence[Op], term: Term | None = None) -> tuple[int | None, int]:
        """Apply ``ops`` atomically: (new revision or None if a guard failed, store revision).

        Raises :class:`Deposed` if ``term`` ended, :class:`LeaseGone` for a dead lease."""
        ...

    def grant(self, ttl: float) -> tuple[int, float]:
        """A new lease of at least ``ttl`` seconds: (id, granted TTL)."""
        ...

    def keepalive(self, lease: int) -> float:
        """Renew ``lease``: its TTL, 0 if it no longer exists."""
        ...

    def revoke(self, lease: int) -> None:
        """End ``lease``, deleting its keys; an unknown lease is not an error."""
        ...

    def leases(self) -> list[LeaseState] | None:
        """Live leases, for the registry to expire; None when the store expires them itself."""
        ...

    def expire(self, leases: Iterable[int]) -> list[int]:
        """Revoke those of ``leases`` still overdue (one revision); return them."""
        ...

    def barrier(self, revision: int) -> int:
        """A revision at least as new as every one committed before this call, and at least
        ``revision`` if the store has one that new (for a replica to catch up to)."""
        ...

    def history(self, revision: int) -> Mapping[NodeKey, NodeEntry] | None:
        """Every entry as of ``revision``; None if the store no longer knows (or never keeps
        history)."""
        ...

    def stale_for(self) -> float:
        """Seconds this replica's view may have been behind the store (0: it is current)."""
        ...

    def election(self, ttl: float, name: str) -> Election:
        """A candidacy for the one job only one replica may do (probing)."""
        ...


class LocalElection:
    """A single replica always leads; its writes need no fence."""

    def campaign(self, stop: threading.Event) -> Term | None:
        return None if stop.is_set() else Term()

    def leading(self, term: Term) -> bool:
        return True

    def resign(self) -> None:
        pass


@dataclass(slots=True)
class _Lease:
    ttl: float
    renewed: float
    keys: set[NodeKey] = field(default_factory=set)


class MemoryStore:
    """The in-memory :class:`NodeStore`: one process, revisions from 1, no history.

    ``epoch`` is a random id per store incarnation, so a subscriber's revision is never compared
    with a previous incarnation's."""

    max_ops = 1 << 30

    def __init__(self, epoch: str | None = None, clock: Callable[[], float] = time.monotonic):
        self._epoch = epoch or secrets.token_hex(8)
        self._clock = clock
        self._lock = threading.Lock()
        self._revision = 0
        self._entries: dict[NodeKey, NodeEntry] = {}
        self._leases: dict[int, _Lease] = {}
        self._listener: Listener | None = None

    @property
    def epoch(self) -> str:
        return self._epoch

    def start(self, listener: Listener) -> None:
        with self._lock:
            self._listener = listener
            listener.loaded(self._epoch, self._revision, dict(self._entries))

    def close(self) -> None:
        pass

    def commit(self, ops: Sequence[Op], term: Term | None = None) -> tuple[int | None, int]:
        with self._lock:
            for op in ops:
                entry = self._entries.get(op.key)
                if op.expect is not None and op.expect != (entry.mod if entry else 0):
                    return None, self._revision
                if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                    raise LeaseGone("lease not found")
            if not ops:
                return self._revision, self._revision
            revision = self._revision + 1
            events = []
            for op in ops:
                old = self._entries.get(op.key)
                if old is not None and old.lease:
                    self._leases[old.lease].keys.discard(op.key)
                if isinstance(op, Put):
                    new = NodeEntry(op.record, revision, op.lease)
                    self._entries[op.key] = new
                    if op.lease:
                        self._leases[op.lease].keys.add(op.key)
                    events.append(NodeEvent(op.key, new))
                elif old is not None:
                    del self._entries[op.key]
                    events.append(NodeEvent(op.key, None))
            if not events:  # deleting nothing changes nothing, as in etcd
                return self._revision, self._revision
            return self._publish(revision, events), revision

    def grant(self, ttl: float) -> tuple[int, float]:
        with self._lock:
            lease = secrets.randbits(127) | 1 << 127  # unguessable; always 32 hex digits
            self._leases[lease] = _Lease(ttl, self._clock())
            return lease, ttl

    def keepalive(self, lease: int) -> float:
        with self._lock:
            state = self._leases.get(lease)
            if state is None:
                return 0.0
            state.renewed = self._clock()
            return state.ttl

    def revoke(self, lease: int) -> None:
        self._end([lease], overdue_only=False)

    def leases(self) -> list[LeaseState] | None:
        with self._lock:
            return [LeaseState(i, s.ttl, s.renewed) for i, s in self._leases.items()]

    def expire(self, leases: Iterable[int]) -> list[int]:
        return self._end(leases, overdue_only=True)

    def barrier(self, revision: int) -> int:
        with self._lock:
            return self._revision

    def history(self, revision: int) -> Mapping[NodeKey, NodeEntry] | None:
        return None

    def stale_for(self) -> float:
        return 0.0

    def election(self, ttl: float, name: str) -> Election:
        return LocalElection()

    def _end(self, leases: Iterable[int], *, overdue_only: bool) -> list[int]:
        with self._lock:
            now = self._clock()
            ended, events = [], []
            for lease in leases:
                state = self._leases.get(lease)
                if state is None or (overdue_only and state.renewed + state.ttl > now):
                    continue  # gone, or renewed since the caller looked
                del self._leases[lease]
                ended.append(lease)
                for key in sorted(state.keys):
                    del self._entries[key]
                    events.append(NodeEvent(key, None, expired=overdue_only))
            if events:
                self._publish(self._revision + 1, events)
            return ended

    def _publish(self, revision: int, events: list[NodeEvent]) -> int:
        """Move to ``revision`` and tell the listener (lock held: events arrive in order)."""
        self._revision = revision
        if self._listener is not None:
            self._listener.changed(revision, events)
        return revision
