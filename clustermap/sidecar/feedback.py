"""The sidecar's side of feedback: it owns the files, reads every row, publishes verdicts.

* Creates ``<region>.feedback`` (mode ``feedback_mode``, group ``feedback_group``: the workers
  write their rows there) and ``<region>.load`` (0644: workers only read it), both reserved with
  ``posix_fallocate`` so a full tmpfs fails here, not with SIGBUS in a worker. A valid file of the
  same geometry is kept across sidecar restarts, so workers keep their rows.
* Assigns every node of the map a stable id (:class:`NodeIds`), published in the service record.
* Every sweep (``feedback_interval``), reads all rows with one ``pread`` (never a mapping: a
  worker may truncate the file), skips rows no live process holds (``F_OFD_GETLK``), turns each
  changed row into deltas, publishes the machine-wide calls in flight per node into the load
  file, the latencies :class:`~clustermap.sidecar.latency.Latencies` derives from them, and hands
  the outcomes to :class:`~clustermap.sidecar.outlier.Outliers`.

Rows are untrusted: :func:`~clustermap.feedback.layout.parse_row` clamps them, and a row whose
counters go backwards or jump absurdly is ignored until its owner changes, logged once.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import mmap
import os
import secrets
import stat
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from clustermap.feedback import layout as L
from clustermap.feedback.ofd import held
from clustermap.feedback.worker import feedback_paths
from clustermap.model import Ejection, Overlay, Service, Trial
from clustermap.sidecar.latency import Latencies
from clustermap.sidecar.outlier import Ejected, Observation, OutlierPolicy, Outliers

__all__ = ["FeedbackHub", "NodeIds"]

log = logging.getLogger("clustermap.sidecar.feedback")

_MASK: Final = (1 << 64) - 1
#: More calls than this between two sweeps of one row is not a worker, it is garbage.
_MAX_DELTA: Final = 1 << 20
#: A row that called a service within this long may be granted a half-open node's trial.
_RECENT_S: Final = 60.0
#: A freed node id is not reused for this long, so a worker's stale picker cannot credit a
#: new node with an old one's calls.
_QUARANTINE_S: Final = 60.0


@dataclass(slots=True)
class NodeIds:
    """Stable ids for ``(service, host, port)``, below ``capacity``; freed ids rest a while."""

    capacity: int
    ids: dict[tuple[str, str, int], int] = field(default_factory=dict)
    _free: list[int] = field(default_factory=list)
    _resting: list[tuple[float, int]] = field(default_factory=list)
    _next: int = 0
    _full_logged: bool = False

    def seed(self, service: Service) -> None:
        """Keep the ids a previous sidecar published (read back from the region)."""
        if service.overlay is None or len(service.overlay.ids) != len(service.nodes):
            return
        for node, i in zip(service.nodes, service.overlay.ids, strict=True):
            key = (service.name, node.host, node.port)
            if 0 <= i < self.capacity and key not in self.ids and i not in self.ids.values():
                self.ids[key] = i
                self._next = max(self._next, i + 1)

    def of(self, service: str, host: str, port: int) -> int:
        key = (service, host, port)
        i = self.ids.get(key)
        if i is not None:
            return i
        now = time.monotonic()
        while self._resting and self._resting[0][0] <= now:
            self._free.append(self._resting.pop(0)[1])
        if self._free:
            i = self._free.pop()
        elif self._next < self.capacity:
            i = self._next
            self._next += 1
        else:
            if not self._full_logged:
                self._full_logged = True
                log.error(
                    "feedback: all %d node ids are in use; new nodes get no feedback "
                    "(raise feedback_nodes)",
                    self.capacity,
                )
            return -1
        self.ids[key] = i
        return i

    def release(self, keys: Iterable[tuple[str, str, int]]) -> list[int]:
        """Free the ids of ``keys`` (after their rest); returns the ids freed."""
        until = time.monotonic() + _QUARANTINE_S
        freed = [i for key in keys if (i := self.ids.pop(key, None)) is not None]
        self._resting += [(until, i) for i in freed]
        return freed


@dataclass(slots=True)
class _Row:
    owner: int = 0
    raw: bytes = b""
    entries: dict[int, L.Entry] = field(default_factory=dict)
    bad: bool = False


class FeedbackHub:
    """Owns the feedback files of one region and turns rows into verdicts."""

    def __init__(
        self,
        region: str,
        *,
        rows: int,
        entries: int,
        capacity: int,
        mode: int,
        group: str | None,
        policy: OutlierPolicy,
    ) -> None:
        self.rows_path, self.load_path = feedback_paths(region)
        self.ids = NodeIds(capacity)
        self.outliers = Outliers(policy)
        self.garbage = 0  # rows ignored as garbage since start
        self.rows_in_use = 0
        self._rows: dict[int, _Row] = {}
        self._inflight: dict[int, int] = {}
        self._services: dict[str, Service] = {}
        self._service_ids: dict[str, list[int]] = {}
        self._service_of: dict[int, str] = {}
        self._primed = False
        self._walls: dict[float, int] = {}
        self.latencies = Latencies()
        self._done: dict[int, tuple[int, float]] = {}  # id -> (calls, reported s) this sweep
        # Half-open trials: service -> {row: (owner word, last sweep it called the service)};
        # node id -> (row, owner) of its trial; what the trial rows said this sweep.
        self._recent: dict[str, dict[int, tuple[int, float]]] = {}
        self._probes: dict[int, tuple[int, int]] = {}
        self._outcomes: dict[int, bool | None] = {}
        self._now = 0.0
        gid = _gid(group)
        self._fd, self.header = _open_rows(self.rows_path, rows, entries, mode, gid)
        try:
            self._load_mm, self.capacity = _open_load(self.load_path, capacity)
        except BaseException:
            os.close(self._fd)
            raise
        self.load = memoryview(self._load_mm).cast("Q")
        self.ids.capacity = self.capacity

    # -- the map ---------------------------------------------------------------------------------

    def seed(self, services: Iterable[Service]) -> None:
        for s in services:
            self.ids.seed(s)

    def decorate(self, service: Service) -> Service:
        """``service`` with its overlay: node ids and current ejections (remembered for sweeps)."""
        self._services[service.name] = service
        ids = tuple(self.ids.of(service.name, n.host, n.port) for n in service.nodes)
        self._service_ids[service.name] = list(ids)
        for i in ids:
            if i >= 0:
                self._service_of[i] = service.name
        ejected = []
        trials = []
        for position, i in enumerate(ids):
            e = self.outliers.ejected(i) if i >= 0 else None
            if e is not None:
                ejected.append(Ejection(position, self._wall(e), e.reason))
                if e.half_open is not None:
                    trials.append(Trial(position, e.half_open.owner, self._wall(e)))
        return replace(service, overlay=Overlay(ids, tuple(ejected), tuple(trials)))

    def _wall(self, e: Ejected) -> int:
        """The wall clock (ns) at which workers end ``e`` (:meth:`Outliers.published_until`),
        fixed once so republishing is deterministic."""
        outliers = self.outliers
        until = outliers.published_until(e)
        wall = self._walls.get(until)
        if wall is None:
            wall = time.time_ns() + int((until - time.monotonic()) * 1e9)
            live = {
                outliers.published_until(v)
                for i in outliers.ejected_ids()
                if (v := outliers.ejected(i))
            }
            self._walls = {k: w for k, w in self._walls.items() if k in live}
            self._walls[until] = wall
        return wall

    def retain(self, before: Iterable[Service], current: Mapping[str, Service]) -> None:
        """After a publish: forget the services and nodes it removed. ``before`` are the
        previous versions of the services the publish changed or removed, ``current`` the
        published map: this costs what changed, not the size of the map (it runs on every
        change, before the next one is applied)."""
        gone: list[tuple[str, str, int]] = []
        for old in before:
            new = current.get(old.name)
            if new is None:
                self._services.pop(old.name, None)
                self._service_ids.pop(old.name, None)
                self._recent.pop(old.name, None)
                gone += [(old.name, n.host, n.port) for n in old.nodes]
            else:
                keep = {(n.host, n.port) for n in new.nodes}
                gone += [
                    (old.name, n.host, n.port) for n in old.nodes if (n.host, n.port) not in keep
                ]
        freed = self.ids.release(gone)
        for i in freed:
            self._service_of.pop(i, None)
        self.latencies.drop(freed)
        self.outliers.drop(freed)

    # -- sweeping ---------------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> tuple[set[str], list[tuple[str, str, Ejected]]]:
        """Read every row once; (services to republish, new ejections as (service, address,
        verdict))."""
        now = time.monotonic() if now is None else now
        self._now = now
        ejected = self.outliers.ejected_ids()
        self._probes = {
            i: (e.half_open.row, e.half_open.owner)
            for i in ejected
            if (e := self.outliers.ejected(i)) is not None and e.half_open is not None
        }
        self._outcomes = {}
        seen = self._read_rows()
        if not self._primed:  # a restarted sidecar: the rows' history is a baseline, not news
            self._primed = True
            seen = {}
        self._costs(self._latencies(now))
        of = self._service_of
        if self.outliers.interval_due(now):  # every service's interval counts are judged
            names = set(self._service_ids)
        else:
            names = {of[i] for i in seen if i in of} | {of[i] for i in ejected if i in of}
        services = {name: self._service_ids[name] for name in names}
        changed, new = self.outliers.step(now, seen, services, self._outcomes, self._choose)
        self.load[L.SWEEP_OFF // 8] = time.time_ns()
        out = []
        for name, node_id, verdict in new:
            s = self._services[name]
            node = s.nodes[services[name].index(node_id)]
            out.append((name, node.address, verdict))
        return changed, out

    def _read_rows(self) -> dict[int, Observation]:
        head = self.header
        size = head.row_size
        try:
            data = os.pread(self._fd, head.rows * size, L.HEADER_SIZE)
        except OSError as exc:
            log.error("feedback: cannot read %s: %s", self.rows_path, exc)
            self._done = {}
            return {}
        seen: dict[int, list[float]] = {}  # id -> [ok, failed, tail, calls, latency seconds]
        touched: set[int] = set()
        in_use = 0
        for r in range(head.rows):
            raw = data[r * size : (r + 1) * size]
            owner = int.from_bytes(raw[:8], "little") if len(raw) == size else 0
            prev = self._rows.get(r)
            if owner == 0 or not held(self._fd, L.HEADER_SIZE + r * size, size):
                if prev is not None:  # released: its calls in flight no longer count
                    self._lost(r, prev)
                    self._drop(prev, touched)
                    del self._rows[r]
                continue
            in_use += 1
            if prev is not None and prev.owner == owner and prev.raw == raw:
                continue
            if prev is None or prev.owner != owner:
                if prev is not None:
                    self._lost(r, prev)
                    self._drop(prev, touched)
                prev = self._rows[r] = _Row(owner)
            if prev.bad:
                continue
            self._apply(r, prev, raw, seen, touched)
        self.rows_in_use = in_use
        for i in touched:
            if i < self.capacity:
                self.load[L.HEADER_SIZE // 8 + i] = max(0, self._inflight.get(i, 0))
        self._done = {i: (int(v[3]), v[4]) for i, v in seen.items()}
        self._costs(touched)
        return {i: Observation(int(v[0]), int(v[1]), int(v[2])) for i, v in seen.items()}

    def _costs(self, ids: set[int]) -> None:
        """Each node's expected wait for least_request: (calls in flight + 1) x latency."""
        load, capacity = self.load, self.capacity
        base = L.HEADER_SIZE // 8
        for i in ids:
            if i < capacity:
                load[base + 2 * capacity + i] = min(
                    (load[base + i] + 1) * load[base + capacity + i], L.WORD_MASK
                )

    def _latencies(self, now: float) -> set[int]:
        """Publish the latencies that changed at this sweep (:mod:`~clustermap.sidecar.latency`:
        from the calls in flight by Little's law); the ids whose latency word changed."""
        changed = self.latencies.step(now, self._inflight, self._done)
        base = L.HEADER_SIZE // 8 + self.capacity
        for i, value in changed.items():
            if i < self.capacity:
                self.load[base + i] = max(1, int(value))
        return set(changed)

    def _apply(
        self, r: int, row: _Row, raw: bytes, seen: dict[int, list[float]], touched: set[int]
    ) -> None:
        _, entries, rejected = L.parse_row(raw, self.header.entries, self.capacity)
        new = {e.node_id: e for e in entries}
        deltas = []
        previous = row.entries
        for e in entries:
            old = previous.get(e.node_id)
            if old == e:  # most entries of a changed row did not change
                continue
            d_ok = (e.ok - (old.ok if old else 0)) & L.OK_MASK
            d_failed = (e.failed - (old.failed if old else 0)) & _MASK
            d_latency = e.latency - (old.latency if old else 0.0)
            if d_ok > _MAX_DELTA or d_failed > _MAX_DELTA or d_latency < 0:
                self._garbage(r, row, touched, "counters going backwards or jumping")
                return
            deltas.append((e, d_ok, d_failed, d_latency))
        if rejected or not new.keys() >= previous.keys():
            self._garbage(r, row, touched, "entries with bad ids, or entries gone")
            return
        probes = self._probes
        called: set[str] = set()
        for e, d_ok, d_failed, d_latency in deltas:
            if probes and probes.get(e.node_id) == (r, row.owner) and (d_ok or d_failed):
                # the trial's outcome (a failure wins if the row somehow made more than one)
                self._outcomes[e.node_id] = self._outcomes.get(e.node_id, True) and not d_failed
            name = self._service_of.get(e.node_id)
            if name is not None and name not in called:
                called.add(name)
                self._recent.setdefault(name, {})[r] = (row.owner, self._now)
            old = previous.get(e.node_id)
            change = e.in_flight - (old.in_flight if old else 0)
            if change:
                self._inflight[e.node_id] = self._inflight.get(e.node_id, 0) + change
                touched.add(e.node_id)
            if d_ok or d_failed or d_latency:
                acc = seen.setdefault(e.node_id, [0, 0, 0, 0, 0.0])
                acc[0] += d_ok
                acc[1] += d_failed
                acc[2] += min(e.streak, d_failed)
                acc[3] += d_ok + d_failed
                acc[4] += d_latency
        row.entries = new
        row.raw = raw

    def _lost(self, r: int, row: _Row) -> None:
        """``row``'s owner is gone (or its row is garbage): a trial it held has no outcome."""
        for i, probe in self._probes.items():
            if probe == (r, row.owner):
                self._outcomes.setdefault(i, None)

    def _choose(self, name: str, node_id: int, tried: frozenset[int]) -> tuple[int, int] | None:
        """The row for a trial of ``name``'s node: the live row that called the service most
        recently (within :data:`_RECENT_S`), not tried yet for this trial."""
        best: tuple[float, int, int] | None = None
        for r, (owner, when) in self._recent.get(name, {}).items():
            row = self._rows.get(r)
            if (
                r in tried
                or row is None
                or row.owner != owner
                or row.bad
                or self._now - when > _RECENT_S
            ):
                continue
            if best is None or when > best[0]:
                best = (when, r, owner)
        return None if best is None else (best[1], best[2])

    def _garbage(self, r: int, row: _Row, touched: set[int], why: str) -> None:
        self._lost(r, row)
        self._drop(row, touched)
        row.bad = True
        self.garbage += 1
        log.warning("feedback: row %d (owner %#x) ignored: %s", r, row.owner, why)

    def _drop(self, row: _Row, touched: set[int]) -> None:
        for e in row.entries.values():
            if e.in_flight:
                self._inflight[e.node_id] = self._inflight.get(e.node_id, 0) - e.in_flight
                touched.add(e.node_id)
        row.entries = {}

    def address(self, name: str, node_id: int) -> str:
        """``host:port`` of ``name``'s node with id ``node_id`` ("?" if gone)."""
        s = self._services.get(name)
        ids = self._service_ids.get(name, [])
        if s is None or node_id not in ids:
            return "?"
        return s.nodes[ids.index(node_id)].address

    def ejected(self) -> list[tuple[str, str, Ejected]]:
        out = []
        for name, s in sorted(self._services.items()):
            for n in s.nodes:
                i = self.ids.ids.get((name, n.host, n.port), -1)
                e = self.outliers.ejected(i) if i >= 0 else None
                if e is not None:
                    out.append((name, n.address, e))
        return out

    def close(self) -> None:
        self.load.release()
        with contextlib.suppress(BufferError):
            self._load_mm.close()
        os.close(self._fd)


def _gid(group: str | None) -> int:
    if group is None:
        return -1
    if group.isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid


def _reserve(path: str, size: int, mode: int, gid: int, header: bytes) -> None:
    """Build a file under a temporary name (space reserved, header written), rename it in."""
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        os.pwrite(fd, header, 0)
        if gid >= 0:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def _open_existing(path: str) -> tuple[int, os.stat_result] | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("feedback: replacing %s: %s", path, exc.strerror)
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        log.warning("feedback: replacing %s (not a regular file of ours)", path)
        return None
    return fd, st


def _open_rows(
    path: str, rows: int, entries: int, mode: int, gid: int
) -> tuple[int, L.FeedbackHeader]:
    found = _open_existing(path)
    if found is not None:
        fd, st = found
        try:
            head = L.parse_feedback_header(os.pread(fd, 64, 0), st.st_size)
            if head.rows == rows and head.entries == entries:
                if gid >= 0 and st.st_gid != gid:
                    os.fchown(fd, -1, gid)
                os.fchmod(fd, mode)
                return fd, head
        except L.LayoutError:
            pass
        os.close(fd)
    _reserve(
        path,
        L.feedback_size(rows, entries),
        mode,
        gid,
        L.encode_feedback_header(rows, entries, secrets.randbits(63)),
    )
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    return fd, L.parse_feedback_header(os.pread(fd, 64, 0), os.fstat(fd).st_size)


def _open_load(path: str, capacity: int) -> tuple[mmap.mmap, int]:
    found = _open_existing(path)
    fd = -1
    if found is not None:
        fd, st = found
        try:
            head = L.parse_load_header(os.pread(fd, 64, 0), st.st_size)
            if head.capacity != capacity:
                raise L.LayoutError("capacity changed")
            os.fchmod(fd, 0o644)
        except L.LayoutError:
            os.close(fd)
            fd = -1
    if fd < 0:
        _reserve(
            path,
            L.load_size(capacity),
            0o644,
            -1,
            L.encode_load_header(capacity, secrets.randbits(63)),
        )
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mm = mmap.mmap(fd, L.load_size(capacity))
    finally:
        os.close(fd)
    # Start from nothing: the counts are rebuilt from the live rows by the first sweep, and
    # every latency (and so every cost) is 1 µs until measured.
    mm[L.HEADER_SIZE : L.HEADER_SIZE + 8 * capacity] = bytes(8 * capacity)
    mm[L.HEADER_SIZE + 8 * capacity :] = struct.pack(f"<{2 * capacity}Q", *([1] * 2 * capacity))
    mm[L.ZERO_OFF : L.ZERO_OFF + 16] = struct.pack("<QQ", 0, 1)
    return mm, capacity
