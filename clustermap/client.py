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
from collections import Counter
from collections.abc import Callable

import xxhash

from clustermap.balance import MAGLEV_TABLE_SIZE, MaglevTable, ServicePicker
from clustermap.balance.picker import make_picker
from clustermap.defaults import DEFAULT_REGION
from clustermap.errors import ClusterMapError, NoAvailableNode, UnknownService
from clustermap.feedback.calls import Call, CustomCall, free_calls, record
from clustermap.feedback.worker import Feedback
from clustermap.model import Ejection, Node, Overlay, Service
from clustermap.region.reader import RegionReader

__all__ = ["DEFAULT_REGION", "ClusterMap", "default_region_path"]

_xxh64 = xxhash.xxh64_intdigest
_new = object.__new__
_take_call = free_calls.pop

# (words of the file it was read from, index of its slot's version word, version, picker)
_Entry = tuple[memoryview, int, int, ServicePicker]


def default_region_path() -> str:
    return os.environ.get("CLUSTERMAP_REGION") or DEFAULT_REGION


class ClusterMap:
    """A read-only handle on one region; thread-, greenlet- and fork-safe.

    ``lazy=True`` defers opening the region to the first call and retries on every call while it
    is missing (a worker may start before the sidecar has published anything).
    """

    __slots__ = (
        "__weakref__",
        "_entries",
        "_fbw",
        "_feedback",
        "_lock",
        "_pid",
        "_reader",
        "_subsets",
        "path",
    )

    path: str | None

    def __init__(self, path: str | os.PathLike[str] | None = None, *, lazy: bool = False) -> None:
        #: None: ``$CLUSTERMAP_REGION`` or the default path, resolved when the region is opened.
        self.path = os.fspath(path) if path is not None else None
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._reader: RegionReader | None = None
        self._feedback: Feedback | None = None
        self._fbw: memoryview[float] | None = None  # this process's feedback row as float64 words
        self._subsets: dict[
            tuple[str, tuple[tuple[str, str], ...]], tuple[ServicePicker, ServicePicker]
        ] = {}
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
        if strategy == "least_request":
            return picker.least_request()
        return picker.pick(key, strategy)

    # -- everything else ----------------------------------------------------------------------

    def nodes(self, service: str) -> tuple[Node, ...]:
        """The healthy nodes of ``service`` (``up``, weight > 0, not ejected), in map order."""
        picker = self.picker(service)
        ejected = picker.ejected
        if not ejected:
            return picker.service.healthy_nodes()
        nodes = picker.service.nodes
        return tuple(n for k, n in enumerate(nodes) if n.healthy and k not in ejected)

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
                picker = make_picker(service, _published_maglev(reader, name, version))
                picker.load_source = self._feedback_state()
            entry: _Entry = (reader.words, reader.version_index(slot), version, picker)
            self._entries[name] = entry
            return entry

    def _reset_after_fork(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # another thread may have held it at the fork
        if self._feedback is not None:
            self._feedback.after_fork()  # the parent's feedback row is not ours
        self._fbw = None
        for entry in self._entries.values():
            entry[3].after_fork()
            entry[3].feedback_slots = None
        for _, sub in self._subsets.values():
            sub.after_fork()
            sub.feedback_slots = None

    # -- feedback (docs/feedback.md) ----------------------------------------------------------

    def call(
        self,
        service: str,
        key: str | bytes | None = None,
        strategy: str | None = None,
        subset: dict[str, str] | None = None,
        ok_exceptions: tuple[type[BaseException], ...] | None = None,
        failure_exceptions: tuple[type[BaseException], ...] | None = None,
    ) -> Call:
        """``with cm.call("svc") as node:`` picks like :meth:`pick` and counts the call in flight
        machine-wide until the block ends, then records its outcome and latency (see
        :mod:`clustermap.feedback.calls` for which exceptions count as failures). ``subset``
        keeps the nodes whose meta has all those pairs (NoAvailableNode if none). (Pass
        ``ok_exceptions`` / ``failure_exceptions`` by keyword; they are not keyword-only because
        in CPython 3.11 a keyword-only default costs a dict lookup per call.)"""
        fw = self._fbw
        if (
            fw is not None
            and key is None
            and strategy is None
            and subset is None
            and ok_exceptions is None
            and failure_exceptions is None
        ):  # the common case, inlined: no allocation, one dict lookup besides the pick's
            try:
                words, index, version, picker = self._entries[service]
            except KeyError:
                pass
            else:
                if words[index] == version:
                    node = next(picker.default_it)
                    slots = picker.feedback_slots
                    try:  # inlined _cached_slot
                        i = slots[node[0]]  # type: ignore[index]
                        if i < -1:
                            i = slots[id(node)]  # type: ignore[index]
                    except (KeyError, TypeError):  # (None: no slot cached yet)
                        i = self._feedback_slot(picker, node)
                    try:
                        c = _take_call()
                    except IndexError:
                        c = _new(Call)
                        c._failed = None
                    c.node = node
                    c._i = i
                    c._w = fw if i >= 0 else None
                    return c
        return self._call(service, key, strategy, subset, ok_exceptions, failure_exceptions)

    def _call(
        self,
        service: str,
        key: str | bytes | None,
        strategy: str | None,
        subset: dict[str, str] | None,
        ok_exceptions: tuple[type[BaseException], ...] | None,
        failure_exceptions: tuple[type[BaseException], ...] | None,
    ) -> Call:
        if subset:
            picker = self._subset_picker(service, subset)
            node = picker.pick(key, strategy)
        else:
            picker = self.picker(service)
            node = (
                next(picker.default_it)
                if key is None and strategy is None
                else self.pick(service, key, strategy)
            )
        if ok_exceptions is None and failure_exceptions is None:
            try:
                c = _take_call()
            except IndexError:
                c = _new(Call)
        else:
            c = _new(CustomCall)
            c.ok_exceptions = ok_exceptions or ()
            c.failure_exceptions = (
                (Exception,) if failure_exceptions is None else failure_exceptions
            )
        c.node = node
        c._failed = None
        fw = self._fbw
        if fw is None and self._feedback_ready():
            fw = self._fbw
        if fw is not None:
            i = self._cached_slot(picker, node)
            if i >= 0:
                c._w = fw
                c._i = i
                return c
        c._w = None
        return c

    def _feedback_ready(self) -> bool:
        fb = self._feedback_state()
        if fb.ready():
            self._fbw = fb.floats
            return True
        return False

    def report(self, service: str, node: Node, ok: bool, latency: float | None = None) -> bool:
        """Record one finished call to ``node`` (``latency`` in seconds), for callers that cannot
        use :meth:`call`. Never raises: False when nothing was recorded (feedback off, a node
        or service the map does not have)."""
        try:
            picker = self.picker(service)
        except ClusterMapError:
            return False
        fb = self._feedback_state()
        if not fb.ready():
            return False
        i = self._feedback_slot(picker, node)
        if i < 0:
            return False
        seconds = 0.0 if latency is None or not latency > 0 else min(float(latency), 3600.0)
        record(fb.words, fb.floats, i, not ok, seconds, 0)  # type: ignore[arg-type]
        return True

    def feedback_status(self) -> str:
        """Whether this process writes feedback, and why not (for logs and tests)."""
        fb = self._feedback_state()
        fb.ready()
        return fb.reason

    def _feedback_state(self) -> Feedback:
        fb = self._feedback
        if fb is None:
            path = self._reader.path if self._reader is not None else None
            fb = self._feedback = Feedback(path or self.path or default_region_path())
        return fb

    def _cached_slot(self, picker: ServicePicker, node: Node) -> int:
        """:meth:`_feedback_slot` through the picker's cache (``call`` inlines this)."""
        slots = picker.feedback_slots
        if slots is not None:
            i = slots.get(node[0])
            if i is not None and i < -1:
                i = slots.get(id(node))
            if i is not None:
                return i
        return self._feedback_slot(picker, node)

    def _feedback_slot(self, picker: ServicePicker, node: Node) -> int:
        """This process's entry for ``node`` of ``picker``'s service (-1: none), cached on the
        picker for the nodes it holds: by host when the host is the service's only node there
        (a string key costs less than ``id()``), else by ``id(node)`` with the host marked -2."""
        service = picker.service
        overlay = service.overlay
        if overlay is None or self._feedback is None:
            return -1
        nodes = service.nodes
        position = next((k for k, n in enumerate(nodes) if n is node), -1)
        mine = position >= 0
        if not mine:
            position = next((k for k, n in enumerate(nodes) if n.key == node.key), -1)
            if position < 0:
                return -1
        i = self._feedback.entry(overlay.ids[position])
        if mine:
            slots = picker.feedback_slots
            if slots is None:
                hosts = Counter(n.host for n in nodes)
                slots = picker.feedback_slots = {h: -2 for h, k in hosts.items() if k > 1}
            if slots.get(node.host) == -2:
                slots[id(node)] = i
            else:
                slots[node.host] = i
        return i

    def _subset_picker(self, service: str, subset: dict[str, str]) -> ServicePicker:
        """A picker over the nodes whose meta has every pair of ``subset``, cached per version."""
        base = self.picker(service)
        pairs = tuple(sorted(subset.items()))
        hit = self._subsets.get((service, pairs))
        if hit is not None and hit[0] is base:
            return hit[1]
        svc = base.service
        keep = [k for k, n in enumerate(svc.nodes) if all(n.meta.get(a) == b for a, b in pairs)]
        if not keep:
            raise NoAvailableNode(f"service {service!r} has no node with {dict(pairs)}")
        overlay = svc.overlay
        if overlay is not None:
            new = {old: k for k, old in enumerate(keep)}
            overlay = Overlay(
                tuple(overlay.ids[k] for k in keep),
                tuple(
                    Ejection(new[e.position], e.until_ns, e.reason)
                    for e in overlay.ejected
                    if e.position in new
                ),
            )
        sub = make_picker(
            Service(
                svc.name,
                tuple(svc.nodes[k] for k in keep),
                svc.strategy,
                svc.panic_threshold,
                svc.revision,
                svc.meta,
                overlay,
            )
        )
        sub.load_source = self._feedback_state()
        self._subsets[(service, pairs)] = (base, sub)
        return sub

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
