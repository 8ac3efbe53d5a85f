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
import time
import weakref
from collections import Counter
from collections.abc import Mapping

import xxhash

from clustermap.balance import MAGLEV_TABLE_SIZE, MaglevTable, ServicePicker
from clustermap.balance.picker import MaglevSource
from clustermap.balance.routing import Route, route, subset_pairs, zone_name
from clustermap.balance.trial import offer_trial
from clustermap.defaults import DEFAULT_REGION
from clustermap.errors import ClusterMapError, UnknownService
from clustermap.feedback.calls import Call, CustomCall, free_calls, record
from clustermap.feedback.worker import Feedback
from clustermap.model import Node, Service
from clustermap.region.layout import SLOT_META
from clustermap.region.reader import RegionReader

__all__ = ["DEFAULT_REGION", "MAX_SUBSETS", "ClusterMap", "default_region_path"]

_xxh64 = xxhash.xxh64_intdigest
_new = object.__new__
_take_call = free_calls.pop

# (words of the file it was read from, index of its slot's version word, version, the picker of
# key-less picks (subset and zone applied), the picker of keyed picks (subset only; it holds the
# service as the subset sees it)): see clustermap.balance.routing.
_Entry = tuple[memoryview, int, int, ServicePicker, ServicePicker]

#: Subset routes one handle keeps (per service and subset); the oldest go first beyond it, so a
#: caller passing ever new subsets costs a rebuild per pick, never unbounded memory.
MAX_SUBSETS = 256


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
        "_zone",
        "_zone_v",
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
        # (service, subset items as given or sorted) -> entry: see _subset_entry
        self._subsets: dict[tuple[str, tuple[tuple[str, str], ...]], _Entry] = {}
        self._zone = ""  # the machine's zone as the region records it (docs/routing.md)
        self._zone_v = -1  # ... read at this version of the meta record
        _handles.add(self)
        if not lazy:
            self._ensure_reader()

    # -- the hot path -------------------------------------------------------------------------

    def pick(
        self,
        service: str,
        key: str | bytes | None = None,
        strategy: str | None = None,
        subset: Mapping[str, str] | None = None,
    ) -> Node:
        """A node of ``service`` for this request.

        With ``key`` (and no strategy) the pick is by consistent hashing, identical in every
        process. ``subset`` keeps the nodes whose meta has all those pairs (docs/routing.md).
        Raises :class:`UnknownService`, :class:`NoAvailableNode` or, for a subset that is not
        a mapping of strings, :class:`InvalidSubset`. (``strategy`` and ``subset`` are not
        keyword-only on purpose: in CPython 3.11 the ``*`` marker alone adds ~20 ns per call.)
        """
        if subset is None:
            try:
                words, index, version, picker, keyed = self._entries[service]
            except KeyError:
                return _choose(self._refresh(service), key, strategy)
            if words[index] != version:  # the service changed (or the file was replaced)
                return _choose(self._refresh(service), key, strategy)
        else:
            try:  # warm: one tuple of the pairs as given, one dict lookup
                entry = self._subsets[(service, tuple(subset.items()))]
            except (KeyError, TypeError, AttributeError):  # not cached (or not a mapping)
                entry = self._subset_entry(service, subset)
            else:
                if entry[0][entry[1]] != entry[2]:
                    entry = self._subset_entry(service, subset)
            words, index, version, picker, keyed = entry
        if strategy is None:
            if key is None:
                return next(picker.default_it)
            # Inlined consistent_hash (one Python frame less per pick). A str key is assumed
            # without a type test (~190 instructions); the first bytes key of this picker
            # moves the table to ``bytes_maglev``, which assumes bytes keys the same way, and
            # the first str key after that sends its keyed picks to the tested branch.
            table = keyed.str_maglev
            if table is not None:
                try:
                    return keyed.nodes[table[_xxh64(key.encode()) % MAGLEV_TABLE_SIZE]]  # type: ignore[union-attr]
                except AttributeError:  # bytes (or no key type at all)
                    keyed.str_maglev = None
                    keyed.bytes_maglev = table
                except IndexError:  # not a table of these nodes: the picker replaces it
                    pass
            else:
                table = keyed.bytes_maglev
                if table is not None:
                    try:
                        return keyed.nodes[table[_xxh64(key) % MAGLEV_TABLE_SIZE]]  # type: ignore[arg-type]
                    except TypeError:  # str (or no key type at all): mixed keys
                        keyed.bytes_maglev = None
                    except IndexError:
                        pass
                else:
                    table = keyed.maglev
                    if table is not None:
                        raw = key.encode() if isinstance(key, str) else key
                        try:
                            return keyed.nodes[table[_xxh64(raw) % MAGLEV_TABLE_SIZE]]
                        except IndexError:
                            pass
            return keyed.consistent_hash(key)
        it = picker.iters.get(strategy)  # key-less strategies, inlined the same way
        if it is not None:
            return next(it)
        if strategy == "least_request":
            return picker.least_request()
        return keyed.pick(key, strategy)

    # -- everything else ----------------------------------------------------------------------

    def nodes(self, service: str, subset: Mapping[str, str] | None = None) -> tuple[Node, ...]:
        """The healthy nodes of ``service`` (``up``, weight > 0, not ejected), in map order;
        with ``subset``, those whose meta has all its pairs (the service's subset fallback
        applies; NoAvailableNode if none). Every zone: zones steer picks, not this list."""
        picker = self._entry(service, subset)[4]
        ejected = picker.ejected
        if not ejected:
            return picker.service.healthy_nodes()
        nodes = picker.service.nodes
        return tuple(n for k, n in enumerate(nodes) if n.healthy and k not in ejected)

    def service(self, service: str) -> Service:
        """The whole service as the map has it, every node whatever its status."""
        return self._entry(service)[4].service

    def picker(self, service: str, subset: Mapping[str, str] | None = None) -> ServicePicker:
        """The cached picker of key-less picks of ``service`` (in ``subset``): what ``pick``
        uses, the zone applied."""
        return self._entry(service, subset)[3]

    def route(self, service: str, subset: Mapping[str, str] | None = None) -> Route:
        """How picks of ``service`` (in ``subset``) are routed now, with the zone decision and
        its reason: built afresh, for tools (``cmctl pick``); workers use the cached pickers."""
        with self._lock:
            reader = self._ensure_reader()
            zone = self._machine_zone(reader)
        pairs = subset_pairs(subset) if subset is not None else ()
        return route(self.service(service), pairs, zone, time.time_ns())

    @property
    def zone(self) -> str:
        """The machine's zone as the region records it ("" if none)."""
        with self._lock:
            return self._machine_zone(self._ensure_reader())

    def _entry(self, service: str, subset: Mapping[str, str] | None = None) -> _Entry:
        """The fresh cache entry of ``service`` (in ``subset``), as ``pick`` finds it."""
        if subset is not None:
            try:
                entry = self._subsets[(service, tuple(subset.items()))]
            except (KeyError, TypeError, AttributeError):
                return self._subset_entry(service, subset)
            if entry[0][entry[1]] != entry[2]:
                return self._subset_entry(service, subset)
            return entry
        found = self._entries.get(service)
        if found is None or found[0][found[1]] != found[2]:
            return self._refresh(service)
        return found

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
                picker, keyed = old[3], old[4]
            else:
                found = route(
                    service,
                    (),
                    self._machine_zone(reader),
                    time.time_ns(),
                    _published_maglev(reader, name, version),
                )
                picker, keyed = found.picker, found.keyed
                fb = picker.load_source = keyed.load_source = self._feedback_state()
                if service.overlay is not None and service.overlay.trials:  # half-open nodes
                    offer_trial(service, picker, fb.owner, time.time_ns())
            entry: _Entry = (reader.words, reader.version_index(slot), version, picker, keyed)
            self._entries[name] = entry
            return entry

    def _machine_zone(self, reader: RegionReader) -> str:
        """The zone in the region's meta record, re-read when that record changed (the
        sidecar republishes every service when the zone changes: cached pickers follow)."""
        version = reader.slot_version(SLOT_META)
        if version != self._zone_v:
            try:
                self._zone = zone_name(reader.meta().zone)
            except ClusterMapError:
                self._zone = ""
            self._zone_v = version
        return self._zone

    def _subset_entry(self, service: str, subset: Mapping[str, str]) -> _Entry:
        """The cached entry of ``service`` inside ``subset``, built if missing or stale:
        pickers over the nodes whose meta has every pair (clustermap.balance.routing). Cached
        under the pairs as given (what the warm path looks up) and sorted (shared by every
        order of the same pairs), at most MAX_SUBSETS of them."""
        pairs = subset_pairs(subset)
        given = (service, tuple(subset.items()))
        main = self._entry(service)
        if not pairs:
            entry = main
        else:
            entry = self._subsets.get((service, pairs)) or main
            if entry is main or entry[0] is not main[0] or entry[2] != main[2]:
                with self._lock:
                    zone = self._machine_zone(self._ensure_reader())
                reader = self._reader
                source = None if reader is None else _published_maglev(reader, service, main[2])
                found = route(main[4].service, pairs, zone, time.time_ns(), source)
                found.picker.load_source = found.keyed.load_source = self._feedback_state()
                entry = (main[0], main[1], main[2], found.picker, found.keyed)
        with self._lock:
            subsets = self._subsets
            for k in (given, (service, pairs)):
                if k not in subsets:
                    while len(subsets) >= MAX_SUBSETS:
                        del subsets[next(iter(subsets))]
                subsets[k] = entry
        return entry

    def _reset_after_fork(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # another thread may have held it at the fork
        if self._feedback is not None:
            self._feedback.after_fork()  # the parent's feedback row is not ours
        self._fbw = None
        for entry in [*self._entries.values(), *self._subsets.values()]:
            for picker in {id(entry[3]): entry[3], id(entry[4]): entry[4]}.values():
                picker.after_fork()
                picker.feedback_slots = None

    # -- feedback (docs/feedback.md) ----------------------------------------------------------

    def call(
        self,
        service: str,
        key: str | bytes | None = None,
        strategy: str | None = None,
        subset: Mapping[str, str] | None = None,
        ok_exceptions: tuple[type[BaseException], ...] | None = None,
        failure_exceptions: tuple[type[BaseException], ...] | None = None,
    ) -> Call:
        """``with cm.call("svc") as node:`` picks like :meth:`pick` and counts the call in flight
        machine-wide until the block ends, then records its outcome (see
        :mod:`clustermap.feedback.calls` for which exceptions count as failures; the sidecar
        derives the latency from the calls in flight). ``subset``
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
                words, index, version, picker, keyed = self._entries[service]
            except KeyError:
                pass
            else:
                if words[index] == version:
                    node = next(picker.default_it)
                    slots = keyed.feedback_slots  # keyed: its service holds every node
                    try:  # inlined _cached_slot
                        i = slots[node[0]]  # type: ignore[index]
                        if i < -1:
                            i = slots[id(node)]  # type: ignore[index]
                    except (KeyError, TypeError):  # (None: no slot cached yet)
                        i = self._feedback_slot(keyed, node)
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
        subset: Mapping[str, str] | None,
        ok_exceptions: tuple[type[BaseException], ...] | None,
        failure_exceptions: tuple[type[BaseException], ...] | None,
    ) -> Call:
        if subset is not None:
            entry = self._entry(service, subset)
        else:
            try:
                entry = self._entries[service]
                if entry[0][entry[1]] != entry[2]:
                    entry = self._refresh(service)
            except KeyError:
                entry = self._refresh(service)
        node = (
            next(entry[3].default_it)
            if key is None and strategy is None
            else _choose(entry, key, strategy)
        )
        picker = entry[4]  # its service holds every node this pick may return
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
            picker = self._entry(service)[4]
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

    def __repr__(self) -> str:
        return f"ClusterMap({self.path!r}, {len(self._entries)} services cached)"


def _choose(entry: _Entry, key: str | bytes | None, strategy: str | None) -> Node:
    """A pick from ``entry`` off the hot path: keyed picks from its keyed picker."""
    if key is not None and (strategy is None or strategy == "consistent_hash"):
        return entry[4].pick(key, strategy)
    return entry[3].pick(key, strategy)


def _published_maglev(reader: RegionReader, name: str, version: int) -> MaglevSource:
    """Where a picker finds the Maglev table the sidecar published with this version over its
    nodes (the whole service's or a declared subset's). The slot is looked up when the table
    is wanted: a replacement file may have moved the service."""

    def load(nodes: int, digest: int) -> MaglevTable | None:
        try:
            slot = reader.directory().get(name)
            found = None if slot is None else reader.maglev_table(slot, version, nodes, digest)
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
