"""Where the map lives: a small storage interface and its in-memory implementation.

The store holds whole services (the unit of change, of delta and of checksum) under one global
revision, and remembers which services changed at which revision in a bounded change log. It knows
nothing of leases, probes or policy: that is :mod:`clustermap.server.registry`'s job.

Two implementations pass the same contract tests (``tests/unit/test_store_contract.py``):
:class:`MemoryStore` here, and :class:`~clustermap.server.etcd_store.EtcdStore`, where:

* ``epoch`` names the history revisions belong to. In memory it is a random id per store
  incarnation; with etcd, the cluster id plus a hash of the key prefix, so a subscriber's
  revision is only ever compared with revisions of the same history;
* ``apply`` is one atomic transaction over whole services and returns the new revision: with
  etcd, one ``Txn`` over the services' node keys, and the response header's revision;
* ``changes_since`` answers from the log or says it cannot (``None``): with etcd, from the local
  log of watched events or etcd's history, ``None`` once compacted.

Thread safety: a store is *not* synchronised; its one owner (the registry, under its lock)
serialises every call.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from clustermap.checksum import service_digest, update_checksum
from clustermap.model import Service

__all__ = ["MapStore", "MemoryStore", "StoredService"]


@dataclass(frozen=True, slots=True)
class StoredService:
    """A service as stored: its value (``service.revision`` set by the store) and digest."""

    service: Service
    digest: int


class MapStore(Protocol):
    """The storage interface the registry needs (see the module docstring)."""

    @property
    def epoch(self) -> str:
        """Identity of the revision history (new store incarnation → new epoch)."""
        ...

    @property
    def revision(self) -> int:
        """The revision of the last applied change (0 for an empty, new store)."""
        ...

    @property
    def checksum(self) -> int:
        """``map_checksum`` of every stored service."""
        ...

    def apply(self, writes: Mapping[str, Service | None]) -> int:
        """Atomically put (Service) or delete (None) whole services; return the revision.

        Writes that change nothing are dropped; if nothing changes, the revision stays."""
        ...

    def get(self, name: str) -> StoredService | None: ...

    def items(self) -> Iterable[tuple[str, StoredService]]:
        """Every stored service, in name order."""
        ...

    def snapshot(self) -> list[StoredService]:
        """Every stored service in no particular order: one C-level copy of references, the
        cheapest way to read the whole map under the registry's lock (sort outside it)."""
        ...

    def __len__(self) -> int:
        """How many services are stored."""
        ...

    def changes_since(self, revision: int) -> frozenset[str] | None:
        """Names of the services changed after ``revision``; None if the log no longer says."""
        ...


class MemoryStore:
    """The in-memory :class:`MapStore`: dict of services plus a bounded change log.

    The log holds one ``(revision, name)`` entry per changed service, at most ``log_size``
    entries. ``_floor`` is the oldest revision the log can answer from: a subscriber at revision
    ``R >= _floor`` gets a delta; older ones a full map.
    """

    def __init__(self, log_size: int = 10_000, epoch: str | None = None) -> None:
        if log_size < 1:
            raise ValueError("log_size must be positive")
        self._epoch = epoch or secrets.token_hex(8)
        self._revision = 0
        self._floor = 0
        self._checksum = 0
        self._services: dict[str, StoredService] = {}
        self._log: deque[tuple[int, str]] = deque()
        self._log_size = log_size

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def checksum(self) -> int:
        return self._checksum

    @property
    def floor(self) -> int:
        """The oldest revision a delta can start from."""
        return self._floor

    def apply(self, writes: Mapping[str, Service | None]) -> int:
        effective: dict[str, StoredService | None] = {}
        for name, value in writes.items():
            old = self._services.get(name)
            if value is None:
                if old is not None:
                    effective[name] = None
                continue
            if value.name != name:
                raise ValueError(f"service {value.name!r} written under the name {name!r}")
            digest = service_digest(value)
            if old is not None and old.digest == digest and _same(old.service, value):
                continue
            effective[name] = StoredService(value, digest)
        if not effective:
            return self._revision
        revision = self._revision + 1
        for name, stored in sorted(effective.items()):
            old = self._services.get(name)
            if stored is None:
                del self._services[name]
                self._checksum = update_checksum(self._checksum, old.digest if old else None, None)
            else:
                stored = StoredService(replace(stored.service, revision=revision), stored.digest)
                self._services[name] = stored
                self._checksum = update_checksum(
                    self._checksum, old.digest if old else None, stored.digest
                )
            self._log.append((revision, name))
        while len(self._log) > self._log_size:
            self._floor = self._log.popleft()[0]
        self._revision = revision
        return revision

    def get(self, name: str) -> StoredService | None:
        return self._services.get(name)

    def items(self) -> Iterable[tuple[str, StoredService]]:
        return sorted(self._services.items())

    def snapshot(self) -> list[StoredService]:
        return list(self._services.values())

    def __len__(self) -> int:
        return len(self._services)

    def changes_since(self, revision: int) -> frozenset[str] | None:
        if revision < self._floor or revision > self._revision:
            return None
        names: set[str] = set()
        for rev, name in reversed(self._log):
            if rev <= revision:
                break
            names.add(name)
        return frozenset(names)


def _same(a: Service, b: Service) -> bool:
    """Equal apart from ``revision`` (the digest already matched; this rules out collisions)."""
    return replace(a, revision=0) == replace(b, revision=0)
