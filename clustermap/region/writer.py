"""The region's writer: the sidecar publishes through it, and nothing else writes the file.

Two layers keep writers apart:

* **Election** — an exclusive ``flock`` on ``<region>.lock``, held for the writer's lifetime. The
  kernel releases it on any exit, so a second sidecar either waits (standby) or is refused with
  the holder's pid; it never writes.
* **The robust mutex** in the header guards each update. A writer that dies inside an update
  leaves it ``EOWNERDEAD``; the next writer repairs before ``pthread_mutex_consistent``.

An update is a redo-logged transaction: new records go into free space (readers cannot see them
yet), a txn record lists the slot stores, and one 8-byte store of its offset commits it. Then the
slots are stored, the generation bumped, the txn cleared. Repair after a dead writer finishes a
committed transaction and discards an uncommitted one, then re-derives the free space from the
slots, so a publish is all-or-nothing whatever instant the writer died at.

When the data area or the slot table is full, the writer builds a larger (or compacted) file
beside the live one, sets RETIRED in the old file's slots, renames the new one over the path and
keeps the old one open for a grace period; readers move over on their own.

Services that are picked by key get their Maglev table (and their declared subsets' tables)
built here, once per machine, and published right after their record
(:mod:`clustermap.region.tables`); workers index those pages in place, so the space of a
replaced table is reused only after a grace period.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import secrets
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple

import xxhash

from clustermap.errors import (
    ClusterMapError,
    CorruptRegion,
    RegionFull,
    RegionUnavailable,
    WriterBusy,
)
from clustermap.model import Service
from clustermap.region import election, trust
from clustermap.region import layout as L
from clustermap.region.alloc import Allocator
from clustermap.region.lock import LockTimeout, RobustMutex
from clustermap.region.tables import (
    MAX_SUBSET_TABLE_BYTES,
    TABLE_BUDGET_S,
    build_table,
    table_bytes,
    table_plan,
)

__all__ = ["RegionWriter", "WriterStats"]

log = logging.getLogger("clustermap.region")

_U64 = struct.Struct("<Q")
_MIN_DATA: Final = 64 * 1024
_MIN_SLOTS: Final = 64
_HEADROOM: Final = 1.25
_GRACE_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class WriterStats:
    """What the last publish did, for metrics and benchmarks."""

    generation: int
    written: int
    removed: int
    unchanged: int
    rebuilt: bool
    bytes_written: int


@dataclass(slots=True)
class _Entry:
    offset: int
    size: int  # bytes reserved (record rounded up to DATA_ALIGN)
    digest: int  # xxh3_64 of the payload, to skip unchanged upserts
    tables: tuple[int, ...] = ()  # nodes digests of the table records after it, in order
    extra: int = 0  # bytes of those tables beyond the first (subset tables)


class RegionWriter:
    """Open (creating if needed) the region at ``path`` as its only writer.

    ``wait``: False refuses at once with :class:`WriterBusy` if another writer is alive; a number
    of seconds waits that long for it to go away (standby). ``checkpoint`` is called with a name at
    each step of an update; tests use it to die at exact points.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        wait: float | bool = False,
        lock_timeout: float = 2.0,
        checkpoint: Callable[[str], None] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.lock_timeout = lock_timeout
        self.checkpoint = checkpoint or (lambda _point: None)
        self.pid = os.getpid()
        self.recovered = 0  # updates repaired after a dead writer, since open
        self.last_stats: WriterStats | None = None
        self._retiring: list[tuple[float, int, mmap.mmap]] = []
        #: Hashed services published without their tables (over an update's build budget).
        self._owed: dict[str, Service] = {}
        #: The last "declared subsets left without a table" line logged, per service.
        self._capped: dict[str, str] = {}
        #: Extents that held a table workers may still be indexing: (free after, offset, size).
        self._quarantine: list[tuple[float, int, int]] = []
        self._election_fd = self._elect(float(wait))
        try:
            self._open_or_create()
        except BaseException:
            os.close(self._election_fd)
            raise

    # -- election and file handling -------------------------------------------------------------

    def _elect(self, wait: float) -> int:
        _make_directory(self.path)
        lock_path = self.path + ".lock"
        _refuse_untrusted(lock_path)
        # Private (0600): anyone who can open the lock file can lock it, even read-only, and so
        # keep this sidecar from ever becoming the writer.
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RegionUnavailable(f"{lock_path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # a lock file left by an older version was 0644
            self._take(fd, wait)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _take(self, fd: int, wait: float) -> None:
        """Both election locks on ``fd`` within ``wait`` seconds, or :class:`WriterBusy`."""
        deadline = time.monotonic() + wait
        logged = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                try:
                    election.hold(fd)
                except OSError as exc:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    raise BlockingIOError from None
                return
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                holder = text if text.isdigit() else "?"  # the file may hold anything
                busy = f"{self.path}: busy: another writer (pid {holder}) holds {self.path}.lock"
                if time.monotonic() >= deadline:
                    raise WriterBusy(busy) from None
                if not logged:
                    log.info("%s; waiting to take over", busy)
                    logged = True
                time.sleep(0.05)

    def _open_or_create(self) -> None:
        for leftover in _leftovers(self.path):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        _refuse_untrusted(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self._install(self._build({}, None, gen=1, last_sync=0))
            return
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise CorruptRegion("empty file")
            head = os.pread(fd, L.HEADER_SIZE, 0)
            if not head.startswith(L.MAGIC):
                raise ClusterMapError(
                    f"{self.path}: exists and is not a ClusterMap region; refusing to overwrite it"
                )
            hdr = L.parse_header(head, size)
        except CorruptRegion as exc:
            os.close(fd)
            log.warning("replacing unusable region %s: %s", self.path, exc)
            self._install(self._build({}, None, gen=1, last_sync=0))
            return
        except BaseException:
            os.close(fd)
            raise
        self._attach(fd, hdr)
        with self._locked():
            self._write_word(L.WRITER_PID_OFF, self.pid)
            self._clear_retired()  # a writer that died between retiring this file and renaming

    def _attach(self, fd: int, hdr: L.FileHeader) -> None:
        self._fd = fd
        self._hdr = hdr
        self._mm = mmap.mmap(fd, hdr.file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mutex = RobustMutex(fd, L.MUTEX_OFF)
        self._derive_state()

    def _derive_state(self) -> None:
        """Rebuild every in-memory structure from the slots (after open, repair or rebuild).

        Never raises on bad contents: a slot whose record does not verify is emptied (and
        logged), and the directory is re-derived from the service records when it disagrees
        with them, so a damaged region degrades to fewer services instead of wedging the writer.
        """
        hdr, mm = self._hdr, self._mm
        self._gen = self._read_word(L.GENERATION_OFF) & ~L.RETIRED
        self._slots: dict[int, _Entry] = {}
        used: list[tuple[int, int]] = []
        kinds = {L.SLOT_META: L.KIND_META, L.SLOT_DIRECTORY: L.KIND_DIRECTORY}
        for slot in range(hdr.slot_count):
            version, off = self._slot(slot)
            version &= ~L.RETIRED
            if version == 0:
                continue
            valid = hdr.data_offset <= off <= hdr.file_size - L.RECORD_HEADER.size
            if valid:
                kind, length, rec_version, digest_seeded = L.parse_record_header(
                    mm[off : off + L.RECORD_HEADER.size]
                )
                end = off + L.RECORD_HEADER.size + length
                payload = mm[off + L.RECORD_HEADER.size : end]
                valid = (
                    end <= hdr.file_size
                    and kind == kinds.get(slot, L.KIND_SERVICE)
                    and rec_version == version
                    and L.verify_payload(payload, version, digest_seeded)
                )
            if not valid:
                log.error("%s: slot %d points at an invalid record; dropping it", self.path, slot)
                self._store_slot(slot, 0, 0)
                continue
            tables: list[int] = []
            extra = 0
            if slot >= L.FIRST_SERVICE_SLOT:
                for start, length, checksum, _, _ in L.table_records(
                    mm, off, version, hdr.file_size
                ):
                    found = mm[start : start + length]
                    if not L.verify_payload(found, version, checksum):
                        break
                    try:
                        tables.append(L.decode_table(found)[3])
                    except CorruptRegion:
                        break
                    if len(tables) > 1:
                        extra += L.align(L.RECORD_HEADER.size + length)
                    end = start + length
            size = L.align(end - off)
            self._slots[slot] = _Entry(
                off, size, xxhash.xxh3_64_intdigest(payload), tuple(tables), extra
            )
            used.append((off, size))
        self._alloc = Allocator(hdr.data_offset, hdr.file_size, used)
        self._quarantine = []
        service_slots = {s for s in self._slots if s >= L.FIRST_SERVICE_SLOT}
        self._dir: dict[str, int] = {}
        try:
            if L.SLOT_DIRECTORY in self._slots:
                self._dir = L.decode_directory(self._payload(L.SLOT_DIRECTORY), hdr.slot_count)
        except CorruptRegion:
            pass
        if set(self._dir.values()) != service_slots or len(self._dir) != len(service_slots):
            log.warning("%s: directory disagrees with the slots; re-deriving it", self.path)
            self._dir = {}
            for slot in sorted(service_slots):
                try:
                    self._dir[L.decode_service(self._payload(slot)).name] = slot
                except CorruptRegion:
                    log.error("%s: slot %d holds an undecodable service", self.path, slot)
        try:
            self._meta = (
                L.decode_meta(self._payload(L.SLOT_META))
                if L.SLOT_META in self._slots
                else L.Meta()
            )
        except CorruptRegion:
            self._meta = L.Meta()

    def _payload(self, slot: int) -> bytes:
        e = self._slots[slot]
        _, length, _, _ = L.parse_record_header(self._mm[e.offset : e.offset + 24])
        return self._mm[e.offset + 24 : e.offset + 24 + length]

    # -- the lock -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if os.getpid() != self.pid:
            raise ClusterMapError("a RegionWriter cannot be used in a forked child")
        try:
            owner_died = self._mutex.acquire(self.lock_timeout)
        except LockTimeout:
            # We hold the election lock, so no live writer can own the mutex: its owner died in a
            # way the kernel could not report. Recreate it rather than wedge forever.
            log.error("region mutex held by no live writer; reinitialising it")
            self._mutex.initialize()
            owner_died = self._mutex.acquire(self.lock_timeout)
        except OSError as exc:
            if exc.errno != errno.ENOTRECOVERABLE:
                raise
            log.error("region mutex was left unrecoverable; reinitialising it")
            self._mutex.initialize()
            owner_died = self._mutex.acquire(self.lock_timeout)
        try:
            if owner_died:
                self._repair()
                self._mutex.mark_consistent()
            elif self._read_word(L.TXN_OFF):
                self._repair()  # a writer of an older build, or a mutex we reinitialised
            yield
        finally:
            self._mutex.release()

    def _repair(self) -> None:
        """Finish a committed transaction or drop an uncommitted one, then re-derive state."""
        self.recovered += 1
        txn_off = self._read_word(L.TXN_OFF)
        if txn_off:
            try:
                gen, entries = self._read_txn(txn_off)
            except CorruptRegion as exc:
                log.error("discarding an unreadable committed transaction: %s", exc)
            else:
                for slot, version, off in entries:
                    self._store_slot(slot, version, off)
                self._write_word(L.GENERATION_OFF, gen)
                log.warning("previous writer died mid-publish; completed generation %d", gen)
            self._write_word(L.TXN_OFF, 0)
        else:
            log.warning("previous writer died holding the lock; its unfinished update was dropped")
        self._derive_state()

    def _read_txn(self, off: int) -> tuple[int, list[tuple[int, int, int]]]:
        if not self._hdr.data_offset <= off <= self._hdr.file_size - L.RECORD_HEADER.size:
            raise CorruptRegion(f"transaction offset {off} is outside the data area")
        kind, length, version, digest = L.parse_record_header(self._mm[off : off + 24])
        payload = self._mm[off + 24 : off + 24 + length]
        if kind != L.KIND_TXN or not L.verify_payload(payload, version, digest):
            raise CorruptRegion("transaction record fails its checksum")
        gen, entries = L.decode_txn(payload)
        for slot, _, rec_off in entries:
            if not 0 <= slot < self._hdr.slot_count or rec_off > self._hdr.file_size:
                raise CorruptRegion("transaction names a slot or offset out of range")
        return gen, entries

    # -- publishing -----------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._gen

    @property
    def meta(self) -> L.Meta:
        return self._meta

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._dir)

    def publish(
        self,
        upserts: Iterable[Service] = (),
        removals: Iterable[str] = (),
        *,
        meta: L.Meta | None = None,
        sync_ns: int | None = None,
        force: bool = False,
    ) -> WriterStats:
        """Publish changed services, removed services and new meta as one update.

        Upserts whose content equals what the region holds are skipped, so a full map costs only
        what changed; ``force`` rewrites them anyway, with a new version (workers then rebuild
        their pickers: the machine's zone changed). Nothing is visible to readers until the
        whole update is. Maglev tables of changed hashed services are built first, outside the
        lock, within
        :data:`~clustermap.region.tables.TABLE_BUDGET_S`; tables left over are published by the
        next updates (including :meth:`touch`).
        """
        upserts = list(upserts)
        removals = set(removals)
        tables = self._prepare_tables(upserts, removals)
        with self._locked():
            stats = self._publish_locked(upserts, removals, meta, tables, force)
            if sync_ns is not None:
                self._write_word(L.LAST_SYNC_OFF, sync_ns)
        self._close_retired()
        self.last_stats = stats
        return stats

    def replace_all(
        self, services: Iterable[Service], *, meta: L.Meta | None = None, sync_ns: int | None = None
    ) -> WriterStats:
        """Make the region hold exactly ``services`` (a full map)."""
        services = list(services)
        keep = {s.name for s in services}
        return self.publish(
            services, [n for n in self._dir if n not in keep], meta=meta, sync_ns=sync_ns
        )

    def touch(self, sync_ns: int | None = None) -> None:
        """Record a successful sync that changed nothing (and publish tables still owed)."""
        if self._owed:
            self.publish(sync_ns=time.time_ns() if sync_ns is None else sync_ns)
            return
        with self._locked():
            self._write_word(L.LAST_SYNC_OFF, time.time_ns() if sync_ns is None else sync_ns)

    @property
    def tables_owed(self) -> int:
        """Hashed services published without their Maglev table, for now."""
        return len(self._owed)

    def _prepare_tables(self, upserts: list[Service], removals: set[str]) -> dict[str, _Tables]:
        """Table payloads (with their nodes digests) for this update, by service name: each
        hashed service's whole table, then its declared subsets' (clustermap.region.tables).

        A table whose nodes did not change is not rebuilt: None stands for the one the region
        holds, which is copied only if the service's record is rewritten. A service's tables
        are built together or not at all; owed tables whose service is not in this update are
        paid back with what is left of the budget, by appending their service to ``upserts``.
        """
        tables: dict[str, _Tables] = {}
        for name in removals:
            self._owed.pop(name, None)
            self._capped.pop(name, None)
        named = {s.name for s in upserts}
        owed = [s for name, s in self._owed.items() if name not in named]
        for name in named:
            self._owed.pop(name, None)
        start = time.monotonic()
        built = 0
        used = sum(e.extra for e in self._slots.values())
        for s in [*upserts, *owed]:
            slot = self._dir.get(s.name)
            old = self._slots[slot] if slot is not None else None
            held = old.extra if old is not None else 0
            plan = table_plan(s, MAX_SUBSET_TABLE_BYTES - used + held)
            self._log_capped(s.name, plan.left_out)
            if not plan.inputs:
                self._owed.pop(s.name, None)
                continue
            have = set(old.tables) if old is not None else set()
            missing = [g for g in plan.inputs if g.digest not in have]
            if missing and built and time.monotonic() - start >= TABLE_BUDGET_S:
                self._owed[s.name] = s
                continue
            tables[s.name] = _Tables(
                tuple(g.digest for g in plan.inputs),
                [(g.digest, None if g.digest in have else build_table(g)) for g in plan.inputs],
            )
            built += len(missing)
            used += sum(table_bytes(g) for g in plan.inputs[1:]) - held
            if s.name in self._owed:
                del self._owed[s.name]
                upserts.append(s)
        return tables

    def _log_capped(self, name: str, line: str) -> None:
        """Log once (per change of what is left out) the declared subsets that get no table."""
        if self._capped.get(name, "") != line:
            if line:
                log.warning("%s", line)
                self._capped[name] = line
            else:
                del self._capped[name]

    @property
    def tables_capped(self) -> int:
        """Hashed services some of whose declared subsets get no table (over a limit)."""
        return len(self._capped)

    def _published_tables(self, name: str) -> dict[int, bytes]:
        """Copies of the payloads of ``name``'s published tables, by nodes digest."""
        slot = self._dir.get(name)
        if slot is None or not self._slots[slot].tables:
            return {}
        version, off = self._slot(slot)
        version &= ~L.RETIRED
        out: dict[int, bytes] = {}
        for start, length, checksum, _, digest in L.table_records(
            self._mm, off, version, self._hdr.file_size
        ):
            body = self._mm[start : start + length]
            if L.verify_payload(body, version, checksum):
                out.setdefault(digest, body)
        return out

    def _release(self, entry: _Entry) -> None:
        """Free a replaced record's space; one with a table only after the grace period, since
        workers index tables in place (docs/region-format.md)."""
        if entry.tables:
            self._quarantine.append((time.monotonic() + _GRACE_S, entry.offset, entry.size))
        else:
            self._alloc.free(entry.offset, entry.size)

    def _release_quarantined(self) -> None:
        now = time.monotonic()
        keep = []
        for until, off, size in self._quarantine:
            if now >= until:
                self._alloc.free(off, size)
            else:
                keep.append((until, off, size))
        self._quarantine = keep

    def _publish_locked(
        self,
        upserts: list[Service],
        removals: set[str],
        meta: L.Meta | None,
        tables: Mapping[str, _Tables],
        force: bool = False,
    ) -> WriterStats:
        self._release_quarantined()
        gen = self._gen + 1
        pending: list[_Pending] = []
        seen: set[str] = set()
        unchanged = 0
        for s in upserts:
            if s.name in seen:
                raise ValueError(f"service {s.name!r} appears twice in one publish")
            seen.add(s.name)
            payload = L.encode_service(s)
            digest = xxhash.xxh3_64_intdigest(payload)
            table = tables.get(s.name)
            tag = table.digests if table is not None else ()
            slot = self._dir.get(s.name)
            old = self._slots[slot] if slot is not None else None
            if old is not None and old.digest == digest and old.tables == tag and not force:
                unchanged += 1
                continue
            record = L.encode_record(L.KIND_SERVICE, gen, payload)
            written: list[int] = []
            extra = 0
            if table is not None:  # None in it: a table the region holds, nodes unchanged
                held = (
                    self._published_tables(s.name)
                    if any(b is None for _, b in table.bodies)
                    else {}
                )
                for d, b in table.bodies:
                    body = b if b is not None else held.get(d)
                    if body is None:
                        continue
                    record = L.with_table(record, L.encode_record(L.KIND_TABLE, gen, body))
                    if written:
                        extra += L.align(L.RECORD_HEADER.size + len(body))
                    written.append(d)
            pending.append(
                _Pending(
                    -1 if slot is None else slot, s.name, record, digest, tuple(written), extra
                )
            )
        removals = {n for n in removals if n in self._dir and n not in seen}
        new_names = [p.name for p in pending if p.slot < 0 and p.name is not None]
        if meta is not None and meta != self._meta:
            payload = L.encode_meta(meta)
            pending.append(
                _Pending(
                    L.SLOT_META,
                    None,
                    L.encode_record(L.KIND_META, gen, payload),
                    xxhash.xxh3_64_intdigest(payload),
                )
            )
        if not pending and not removals:
            return WriterStats(self._gen, 0, 0, unchanged, False, 0)

        directory = self._dir
        free_slots: list[int] = []
        if new_names or removals:  # only then does the directory change (copy-on-write)
            directory = dict(self._dir)
            for name in removals:
                del directory[name]
        if new_names:
            free_slots = sorted(
                set(range(L.FIRST_SERVICE_SLOT, self._hdr.slot_count))
                - set(directory.values())
                - {self._dir[n] for n in removals}  # freed slots are reused from the next publish
            )
        if len(new_names) > len(free_slots):
            self._rebuild(pending, removals, gen)
            return WriterStats(
                gen,
                len(pending),
                len(removals),
                unchanged,
                True,
                sum(len(p.record) for p in pending),
            )
        for name, slot in zip(new_names, free_slots, strict=False):
            directory[name] = slot
        if new_names or removals:
            payload = L.encode_directory(directory)
            pending.append(
                _Pending(
                    L.SLOT_DIRECTORY,
                    None,
                    L.encode_record(L.KIND_DIRECTORY, gen, payload),
                    xxhash.xxh3_64_intdigest(payload),
                )
            )

        self.checkpoint("locked")
        placed: list[tuple[int, _Entry]] = []
        try:
            for p in pending:
                size = L.align(len(p.record))
                off = self._alloc.alloc(size)
                if off is None:
                    raise _NoSpace
                self._mm[off : off + len(p.record)] = p.record
                target = directory[p.name] if p.name is not None else p.slot
                placed.append((target, _Entry(off, size, p.digest, p.tables, p.extra)))
            entries = [(slot, gen, e.offset) for slot, e in placed]
            entries += [(self._dir[n], 0, 0) for n in removals]
            txn = L.encode_record(L.KIND_TXN, gen, L.encode_txn(gen, entries))
            txn_size = L.align(len(txn))
            txn_off = self._alloc.alloc(txn_size)
            if txn_off is None:
                raise _NoSpace
        except _NoSpace:
            for _, e in placed:
                self._alloc.free(e.offset, e.size)
            self._rebuild(pending, removals, gen)
            return WriterStats(
                gen,
                len(pending),
                len(removals),
                unchanged,
                True,
                sum(len(p.record) for p in pending),
            )
        self._mm[txn_off : txn_off + len(txn)] = txn
        self.checkpoint("records-written")
        self._write_word(L.TXN_OFF, txn_off)  # the commit point
        self.checkpoint("committed")
        for i, (slot, version, off) in enumerate(entries):
            self._store_slot(slot, version, off)
            if i == len(entries) // 2:
                self.checkpoint("slots-half")
        self.checkpoint("slots-stored")
        self._write_word(L.GENERATION_OFF, gen)
        self.checkpoint("generation-stored")
        self._write_word(L.TXN_OFF, 0)
        self._alloc.free(txn_off, txn_size)
        for slot, entry in placed:
            old = self._slots.get(slot)
            if old is not None:
                self._release(old)
            self._slots[slot] = entry
        for name in removals:
            self._release(self._slots.pop(self._dir[name]))
        self._dir = directory
        self._gen = gen
        if meta is not None:
            self._meta = meta
        rebuilt = False
        capacity = self._hdr.file_size - self._hdr.data_offset
        if capacity > 4 * _MIN_DATA and self._alloc.free_bytes > capacity * 3 // 4:
            self._rebuild([], set(), gen + 1)  # compact: most of the file is free
            rebuilt = True
        return WriterStats(
            self._gen,
            len(placed),
            len(removals),
            unchanged,
            rebuilt,
            sum(e.size for _, e in placed),
        )

    # -- growth: a new file renamed over the old one --------------------------------------------

    def _rebuild(
        self,
        pending: list[_Pending],
        removals: set[str],
        gen: int,
    ) -> None:
        """Publish by writing a whole new region (grown or compacted) and renaming it in place."""
        records: dict[str, tuple[bytes, int]] = {}
        for name, slot in self._dir.items():
            if name not in removals:
                records[name] = (self._record_bytes(slot), self._slots[slot].digest)
        meta_rec = (
            (self._record_bytes(L.SLOT_META), self._slots[L.SLOT_META].digest)
            if L.SLOT_META in self._slots
            else None
        )
        for p in pending:
            if p.name is not None:
                records[p.name] = (p.record, p.digest)
            elif p.slot == L.SLOT_META:
                meta_rec = (p.record, p.digest)
        last_sync = self._read_word(L.LAST_SYNC_OFF)
        self._swap(self._build(records, meta_rec, gen=gen, last_sync=last_sync))

    def _record_bytes(self, slot: int) -> bytes:
        """The record in ``slot`` with whatever follows it in its extent (a table record)."""
        e = self._slots[slot]
        return self._mm[e.offset : e.offset + e.size]

    def _build(
        self,
        records: Mapping[str, tuple[bytes, int]],
        meta_rec: tuple[bytes, int] | None,
        *,
        gen: int,
        last_sync: int,
    ) -> tuple[str, int, L.FileHeader]:
        """Write a complete region file under a temporary name; return (tmp path, fd, header).

        Sized with 25 % headroom over what it holds, so a region is at most ~1.5 x its payload.
        Records keep their versions, so readers moving to the new file keep their decoded cache.
        """
        want_slots = int((len(records) + L.FIRST_SERVICE_SLOT) * _HEADROOM) + 1
        slot_count = max(_MIN_SLOTS, want_slots)
        data_need = sum(L.align(len(r)) for r, _ in records.values())
        if meta_rec is not None:
            data_need += L.align(len(meta_rec[0]))
        directory = {name: L.FIRST_SERVICE_SLOT + i for i, name in enumerate(sorted(records))}
        dir_payload = L.encode_directory(directory)
        dir_rec = L.encode_record(L.KIND_DIRECTORY, gen, dir_payload)
        data_offset = L.align(L.HEADER_SIZE + slot_count * L.SLOT_SIZE)
        data_size = max(_MIN_DATA, int((data_need + L.align(len(dir_rec))) * _HEADROOM))
        file_size = L.align(data_offset + data_size, mmap.PAGESIZE)
        hdr = L.FileHeader(
            file_size,
            L.HEADER_SIZE,
            slot_count,
            data_offset,
            time.time_ns(),
            secrets.randbits(63),
        )
        tmp = f"{self.path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)
            try:
                os.posix_fallocate(fd, 0, file_size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise RegionFull(
                        f"{self.path}: no space for a {file_size} byte region on "
                        f"{os.path.dirname(self.path) or '.'} ({exc.strerror}); "
                        "the previous map stays published"
                    ) from None
                raise
            mm = mmap.mmap(fd, file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                mm[0:64] = L.encode_header(hdr)
                pos = data_offset
                slots: list[tuple[int, int, int]] = []

                def put(slot: int, record: bytes) -> None:
                    nonlocal pos
                    version = L.parse_record_header(record)[2]
                    mm[pos : pos + len(record)] = record
                    slots.append((slot, version, pos))
                    pos += L.align(len(record))

                if meta_rec is not None:
                    put(L.SLOT_META, meta_rec[0])
                put(L.SLOT_DIRECTORY, dir_rec)
                for name, slot in directory.items():
                    put(slot, records[name][0])
                for slot, version, off in slots:
                    base = L.HEADER_SIZE + slot * L.SLOT_SIZE
                    mm[base : base + 16] = struct.pack("<QQ", version, off)
                mm[L.GENERATION_OFF : L.GENERATION_OFF + 8] = _U64.pack(gen)
                mm[L.WRITER_PID_OFF : L.WRITER_PID_OFF + 8] = _U64.pack(self.pid)
                mm[L.LAST_SYNC_OFF : L.LAST_SYNC_OFF + 8] = _U64.pack(last_sync)
            finally:
                mm.close()
            mutex = RobustMutex(fd, L.MUTEX_OFF)
            mutex.initialize()
            mutex.close()
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp, fd, hdr

    def _install(self, built: tuple[str, int, L.FileHeader]) -> None:
        tmp, fd, hdr = built
        os.rename(tmp, self.path)
        self._attach(fd, hdr)

    def _swap(self, built: tuple[str, int, L.FileHeader]) -> None:
        """Retire the live file (still locked by us) and install ``built`` in its place."""
        self.checkpoint("rebuilt")
        self._set_retired()
        self.checkpoint("retired")
        tmp, fd, hdr = built
        os.rename(tmp, self.path)
        self.checkpoint("renamed")
        old_fd, old_mm, old_mutex = self._fd, self._mm, self._mutex
        old_mutex.release()
        old_mutex.close()
        self._retiring.append((time.monotonic() + _GRACE_S, old_fd, old_mm))
        self._attach(fd, hdr)
        owner_died = self._mutex.acquire(self.lock_timeout)  # released by publish()'s finally
        if owner_died:  # impossible for a file nobody else has locked, but never skip repair
            self._repair()
            self._mutex.mark_consistent()

    def _set_retired(self) -> None:
        mm, hdr = self._mm, self._hdr
        table = bytearray(mm[hdr.slot_table : hdr.slot_table + hdr.slot_count * L.SLOT_SIZE])
        for i in range(0, len(table), L.SLOT_SIZE):
            (v,) = _U64.unpack_from(table, i)
            if v:
                table[i : i + 8] = _U64.pack(v | L.RETIRED)
        mm[hdr.slot_table : hdr.slot_table + len(table)] = bytes(table)
        self._write_word(L.GENERATION_OFF, self._read_word(L.GENERATION_OFF) | L.RETIRED)

    def _clear_retired(self) -> None:
        if not self._read_word(L.GENERATION_OFF) & L.RETIRED:
            return
        log.warning(
            "%s was retired by a writer that died before replacing it; reviving it", self.path
        )
        for slot in range(self._hdr.slot_count):
            version, off = self._slot(slot)
            if version & L.RETIRED:
                self._store_slot(slot, version & ~L.RETIRED, off)
        self._write_word(L.GENERATION_OFF, self._read_word(L.GENERATION_OFF) & ~L.RETIRED)

    def _close_retired(self, force: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for until, fd, mm in self._retiring:
            if force or now >= until:
                mm.close()
                os.close(fd)
            else:
                keep.append((until, fd, mm))
        self._retiring = keep

    # -- words and slots ------------------------------------------------------------------------

    def _read_word(self, off: int) -> int:
        value: int = _U64.unpack(self._mm[off : off + 8])[0]
        return value

    def _write_word(self, off: int, value: int) -> None:
        # A slice store of packed bytes: struct.pack_into would zero-fill first (torn reads).
        self._mm[off : off + 8] = _U64.pack(value)

    def _slot(self, slot: int) -> tuple[int, int]:
        base = L.HEADER_SIZE + slot * L.SLOT_SIZE
        version, off = struct.unpack("<QQ", self._mm[base : base + 16])
        return version, off

    def _store_slot(self, slot: int, version: int, off: int) -> None:
        base = L.HEADER_SIZE + slot * L.SLOT_SIZE
        self._write_word(base + 8, off)
        self._write_word(base, version)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the region; it stays readable with its last map."""
        if self._election_fd < 0:
            return
        self._close_retired(force=True)
        self._mutex.close()
        self._mm.close()
        os.close(self._fd)
        os.close(self._election_fd)
        self._election_fd = -1

    def __enter__(self) -> RegionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NoSpace(Exception):
    pass


class _Pending(NamedTuple):
    """A record to write; a new service's slot (-1 here) is assigned just before writing."""

    slot: int
    name: str | None
    record: bytes
    digest: int
    tables: tuple[int, ...] = ()
    extra: int = 0


class _Tables(NamedTuple):
    """A service's tables for one update: their nodes digests (whole service first), and each
    one's payload, None for one the region holds already (copied)."""

    digests: tuple[int, ...]
    bodies: list[tuple[int, bytes | None]]


def _refuse_untrusted(path: str) -> None:
    """Refuse a symlink, or a file owned by someone else (a planted region could steer traffic)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ClusterMapError(f"{path}: is a symlink; refusing to use it as a region")
    if not stat.S_ISREG(st.st_mode):
        raise ClusterMapError(f"{path}: is not a regular file")
    if st.st_uid != os.geteuid():
        raise ClusterMapError(
            f"{path}: owned by uid {st.st_uid}, not by this writer (uid {os.geteuid()})"
        )


def _make_directory(path: str) -> None:
    """Create the region's directory (0755: workers of other users read the region) unless it
    exists, then refuse it unless only this writer or root can change what it holds."""
    parent = os.path.dirname(os.path.abspath(path))
    missing: list[str] = []
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
            os.chmod(d, 0o755)  # whatever the umask: 0755, not 0777 and not 0700
        except FileExistsError:
            pass  # another writer of a neighbouring region made it: judged below
        except OSError as exc:
            raise RegionUnavailable(
                f"{path}: cannot create the region's directory {d}: {exc.strerror}"
            ) from None
    trust.check_directory(path, trust.writer_owners(), reader=False)


def _leftovers(path: str) -> list[str]:
    parent = os.path.dirname(path) or "."
    base = os.path.basename(path) + "."
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return [os.path.join(parent, n) for n in names if n.startswith(base) and n.endswith(".tmp")]
