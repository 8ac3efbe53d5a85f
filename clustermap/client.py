"""The worker-side view of the map: ``pick`` on every request, at the cost of a few calls.

Each :class:`ClusterMap` caches, per service, the decoded service's picker together with the
slot version it was decoded at. A warm ``pick`` is one dict lookup, one 8-byte load from the
region compared with that version, and the picker's O(1) choice: no lock, no syscall, no
allocation. Anything else (first use, a changed service, a replaced region file, a fork) takes the
slow path, under a lock, which only touches what changed.

Fork safety without hooks in the user's code: ``os.register_at_fork`` covers ``os.fork`` (gunicorn,
multiprocessing); uWSGI forks from C without running those handlers, so inside uWSGI the same reset
is registered with ``uwsgidecorators.postfork``; and the slow path compares the pid as a last
resort. After a fork every picker redraws its round-robin start, so workers forked from one master
do not all hit the same backend first.
"""

from __future__ import annotations

import importlib
import os
import random
import threading
import weakref
from collections.abc import Callable
from typing import Final

import xxhash

from clustermap.balance import MAGLEV_TABLE_SIZE, MaglevTable, ServicePicker
from clustermap.errors import ClusterMapError, UnknownService
from clustermap.model import Node, Service
from clustermap.region.reader import RegionReader

__all__ = ["DEFAULT_REGION", "ClusterMap", "default_region_path"]

DEFAULT_REGION: Final = "/dev/shm/clustermap/default.region"

_xxh64 = xxhash.xxh64_intdigest

# (words of the file it was read from, index of its slot's version word, version, picker)
_Entry = tuple[memoryview, int, int, ServicePicker]


def default_region_path() -> str:
    return os.environ.get("CLUSTERMAP_REGION") or DEFAULT_REGION


class ClusterMap:
    """A read-only handle on one region; thread-, greenlet- and fork-safe.

    ``lazy=True`` defers opening the region to the first call and retries on every call while it
    is missing (a worker may start before the sidecar has published anything).
    """

    __slots__ = ("__weakref__", "_entries", "_lock", "_pid", "_reader", "path")

    path: str | None

    def __init__(self, path: str | os.PathLike[str] | None = None, *, lazy: bool = False) -> None:
        #: None: ``$CLUSTERMAP_REGION`` or the default path, resolved when the region is opened.
        self.path = os.fspath(path) if path is not None else None
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._reader: RegionReader | None = None
        _handles.add(self)
        if not lazy:
            self._ensure_reader()

    # -- the hot path -------------------------------------------------------------------------

    def pick(
        self, service: str, key: str | bytes | None = None, strategy: str | None = None
    ) -> Node:
        """A node of ``service`` for this request.

        With ``key`` (and no strategy) the pick is by consistent hashing, identical in every
        process. Raises :class:`UnknownService` or :class:`NoAvailableNode`. (``strategy`` is not
        keyword-only on purpose: in CPython 3.11 the ``*`` marker alone adds ~20 ns per call.)
        """
        try:
            words, index, version, picker = self._entries[service]
        except KeyError:
            return self._refresh(service)[3].pick(key, strategy)
        if words[index] != version:  # the service changed (or the file was replaced)
            return self._refresh(service)[3].pick(key, strategy)
        if strategy is None:
            if key is None:
                return next(picker.default_it)
            table = picker.maglev  # inlined consistent_hash: one Python frame less per pick
            if table is not None:
                raw = key.encode() if isinstance(key, str) else key
                try:
                    return picker.nodes[table[_xxh64(raw) % MAGLEV_TABLE_SIZE]]
                except IndexError:  # not a table of these nodes: the picker replaces it
                    pass
            return picker.consistent_hash(key)
        it = picker.iters.get(strategy)  # key-less strategies, inlined the same way
        if it is not None:
            return next(it)
        return picker.pick(key, strategy)

    # -- everything else ----------------------------------------------------------------------

    def nodes(self, service: str) -> tuple[Node, ...]:
        """The healthy nodes of ``service`` (``up``, weight > 0), in map order."""
        return self.service(service).healthy_nodes()

    def service(self, service: str) -> Service:
        """The whole service as the map has it, every node whatever its status."""
        entry = self._entries.get(service)
        if entry is None or entry[0][entry[1]] != entry[2]:
            entry = self._refresh(service)
        return entry[3].service

    def picker(self, service: str) -> ServicePicker:
        """The cached picker of ``service`` (what ``pick`` uses)."""
        entry = self._entries.get(service)
        if entry is None or entry[0][entry[1]] != entry[2]:
            entry = self._refresh(service)
        return entry[3]

    def services(self) -> list[str]:
        """Names of every service in the map, sorted."""
        with self._lock:
            return self._ensure_reader().names()

    @property
    def reader(self) -> RegionReader:
        """The underlying region reader (for tools: status, snapshots)."""
        with self._lock:
            return self._ensure_reader()

    def _ensure_reader(self) -> RegionReader:
        if self._reader is None:
            self._reader = RegionReader(self.path or default_region_path())
        return self._reader

    def _refresh(self, name: str) -> _Entry:
        with self._lock:
            if os.getpid() != self._pid:  # forked without our hooks running
                random.seed()
                self._reset_after_fork()
            reader = self._ensure_reader()
            try:
                slot, version, service = reader.lookup(name)
            except UnknownService:
                self._entries.pop(name, None)
                raise
            old = self._entries.get(name)
            # The same version in a replacement file is the same content: keep the warm picker.
            if old is not None and old[2] == version:
                picker = old[3]
            else:
                picker = ServicePicker(service, _published_maglev(reader, name, version))
            entry: _Entry = (reader.words, reader.version_index(slot), version, picker)
            self._entries[name] = entry
            return entry

    def _reset_after_fork(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # another thread may have held it at the fork
        for entry in self._entries.values():
            entry[3].after_fork()

    def __repr__(self) -> str:
        return f"ClusterMap({self.path!r}, {len(self._entries)} services cached)"


def _published_maglev(
    reader: RegionReader, name: str, version: int
) -> Callable[[], MaglevTable | None]:
    """Where a picker finds the Maglev table the sidecar published with this version. The slot
    is looked up when the table is wanted: a replacement file may have moved the service."""

    def load() -> MaglevTable | None:
        try:
            slot = reader.directory().get(name)
            found = None if slot is None else reader.maglev_table(slot, version)
        except ClusterMapError:
            return None
        return None if found is None else MaglevTable(*found)

    return load


_handles: weakref.WeakSet[ClusterMap] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # CPython reseeds ``random`` in a forked child too, but only if ``random`` registered its
    # hook before ours; reseeding here makes the fresh round-robin starts independent of that.
    random.seed()
    for handle in list(_handles):
        handle._reset_after_fork()


def _register_fork_hooks() -> None:
    os.register_at_fork(after_in_child=_after_fork_in_child)
    try:  # only importable inside a uWSGI process, which forks from C
        importlib.import_module("uwsgi")
        uwsgidecorators = importlib.import_module("uwsgidecorators")
    except ImportError:
        return

    uwsgidecorators.postfork(_after_fork_in_child)  # uWSGI's C fork runs no at-fork hooks


_register_fork_hooks()
