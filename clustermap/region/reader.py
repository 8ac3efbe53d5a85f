"""The region's reader: read-only mapping, no lock, every read validated.

A reader never blocks a writer or another reader, and dying mid-read affects nobody: it holds
nothing but a read-only mapping. Each record read is copied out of the mapping, then checked
(kind, version equal to the slot's, checksum) before it is decoded; a record being overwritten
or not yet complete fails the check and the read is retried. After :data:`READ_BUDGET_S` of
failures the region is declared corrupt rather than guessed at.

Opening (and following a replacement) first checks who could have written the file:
:mod:`clustermap.region.trust` refuses a region, or a directory above it, that a user the reader
does not trust could have replaced. Never on the hot path.

The hot path for workers is :meth:`RegionReader.slot_version`: one aligned 8-byte load that says
whether a service changed since it was decoded.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import time
from typing import Final

from clustermap.errors import ClusterMapError, CorruptRegion, RegionUnavailable, UnknownService
from clustermap.model import Service
from clustermap.region import layout as L
from clustermap.region import trust
from clustermap.region.election import writer_running

__all__ = ["READ_BUDGET_S", "RegionReader", "Snapshot"]

READ_BUDGET_S: Final = 1.0
_HDR: Final = L.RECORD_HEADER.size
_MASK: Final = ~L.RETIRED & 0xFFFF_FFFF_FFFF_FFFF


class _Switched(Exception):
    """The file was replaced; the caller restarts its read against the new one."""


class Snapshot:
    """A consistent view of the whole map: every service as of one generation."""

    __slots__ = ("generation", "last_sync_ns", "meta", "repair_pending", "services", "writer_pid")

    def __init__(
        self,
        generation: int,
        meta: L.Meta,
        services: dict[str, Service],
        last_sync_ns: int,
        writer_pid: int,
        repair_pending: bool,
    ) -> None:
        self.generation = generation
        self.meta = meta
        self.services = services
        self.last_sync_ns = last_sync_ns
        self.writer_pid = writer_pid
        #: A writer died mid-publish and no writer has finished its update yet: each service is
        #: intact, but the set may mix the old and the new generation.
        self.repair_pending = repair_pending


class RegionReader:
    """A read-only view of the region at ``path``; follows the writer across file replacement."""

    def __init__(self, path: str | os.PathLike[str], *, read_budget: float = READ_BUDGET_S) -> None:
        self.path = os.fspath(path)
        self.read_budget = read_budget
        self._bad: dict[int, int] = {}  # slot -> version word that failed for a whole budget
        self._dir: dict[str, int] = {}
        self._dir_version = -1
        self._open()

    # -- opening and following replacement ------------------------------------------------------

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RegionUnavailable(
                f"{self.path}: no region (is cm-sidecar running and writing there?)"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RegionUnavailable(
                    f"{self.path}: is a symlink; refusing to follow it"
                ) from None
            raise RegionUnavailable(f"{self.path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            owners = trust.reader_owners()
            trust.check_file(self.path, st, owners)
            trust.check_directory(self.path, owners)
            size = st.st_size
            if size < L.HEADER_SIZE or size % 8:
                raise CorruptRegion(f"{self.path}: truncated or not a region ({size} bytes)")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            self.header = L.parse_header(mm[: L.HEADER_SIZE], size)
        except CorruptRegion as exc:
            mm.close()
            raise CorruptRegion(f"{self.path}: {exc}") from None
        self._ident = (st.st_dev, st.st_ino)
        self._mm = mm
        self._size = size
        self.words = memoryview(mm).cast("Q")
        self._view = memoryview(mm)
        self._dir = {}
        self._dir_version = -1
        self._bad = {}

    def _follow(self) -> None:
        """Called on a RETIRED mark: move to the file now at the path, if it is a new one."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return  # the writer is between retire and rename, or gone: keep the old content
        if (st.st_dev, st.st_ino) != self._ident:
            self._open()
            raise _Switched

    def refresh(self) -> bool:
        """Check for a replaced file (cheap unless one was retired); True if we moved."""
        if self.words[L.GENERATION_OFF // 8] & L.RETIRED:
            try:
                self._follow()
            except _Switched:
                return True
        return False

    # -- words ----------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Bumped by every publish: one load tells whether anything changed."""
        self.refresh()
        return int(self.words[L.GENERATION_OFF // 8]) & _MASK

    @property
    def last_sync_ns(self) -> int:
        return int(self.words[L.LAST_SYNC_OFF // 8])

    @property
    def writer_pid(self) -> int:
        return int(self.words[L.WRITER_PID_OFF // 8])

    @property
    def file_size(self) -> int:
        return self._size

    def version_index(self, slot: int) -> int:
        """Index into :attr:`words` of ``slot``'s version word (for a worker's hot path)."""
        return (L.HEADER_SIZE + slot * L.SLOT_SIZE) // 8

    def slot_version(self, slot: int) -> int:
        return int(self.words[(L.HEADER_SIZE + slot * L.SLOT_SIZE) // 8])

    # -- records --------------------------------------------------------------------------------

    def _record(self, slot: int, kind: int) -> tuple[int, bytes] | None:
        """(version, payload) of ``slot``, validated; None for an empty slot."""
        words, mm, size = self.words, self._mm, self._size
        base = (L.HEADER_SIZE + slot * L.SLOT_SIZE) // 8
        deadline = 0.0
        attempt = 0
        while True:
            raw = int(words[base])
            if raw & L.RETIRED:
                self._follow()
            if self._bad.get(slot) == raw:
                raise CorruptRegion(f"{self.path}: slot {slot} holds an invalid record")
            version = raw & _MASK
            if version == 0:
                return None
            off = int(words[base + 1])
            if self.header.data_offset <= off <= size - _HDR:
                rkind, length, rversion, digest = L.parse_record_header(mm[off : off + _HDR])
                if rkind == kind and rversion == version and off + _HDR + length <= size:
                    payload = mm[off + _HDR : off + _HDR + length]
                    if L.verify_payload(payload, version, digest):
                        return version, payload
            # Torn, overwritten or out-of-order: retry; past the budget, call it corrupt.
            attempt += 1
            now = time.monotonic()
            if attempt == 1:
                deadline = now + self.read_budget
            elif now > deadline:
                # Remember it: until the writer stores a new version there, fail fast instead of
                # stalling every request for a whole budget.
                self._bad[slot] = raw
                raise CorruptRegion(
                    f"{self.path}: slot {slot} has no valid record after {self.read_budget:g} s"
                )
            if attempt > 16:
                time.sleep(min(0.001, 0.00001 * attempt))

    def maglev_table(
        self, slot: int, version: int, nodes: int | None = None, digest: int | None = None
    ) -> tuple[memoryview, int, int] | None:
        """``(entries, node count, nodes digest)`` of the Maglev table published with version
        ``version`` of the service in ``slot``, or None if there is none (an older writer, a
        service the writer publishes no table for, or the slot has moved on). With ``nodes``
        and ``digest``, the table built over those nodes (the whole service's or a declared
        subset's, docs/region-format.md); else the first one (the whole service's).

        ``entries`` is a view of the region's pages, shared by every worker: no copy. It stays
        valid as long as the slot holds ``version`` (the caller checks that word before each
        use, as for the service itself) and the writer does not reuse the space it occupies,
        which it does only after the slot has moved on and a grace period has passed.
        """
        words, base = self.words, (L.HEADER_SIZE + slot * L.SLOT_SIZE) // 8
        if int(words[base]) & _MASK != version or version == 0:
            return None
        off = int(words[base + 1])
        if off < self.header.data_offset:
            return None
        if nodes is None or digest is None:
            payload = L.table_payload(self._view, off, version, self._size)
        else:
            payload = None
            for start, length, checksum, count, found in L.table_records(
                self._view, off, version, self._size
            ):
                if count == nodes and found == digest:
                    view = self._view[start : start + length]
                    payload = view if L.verify_payload(view, version, checksum) else None
                    break
        if payload is None or int(words[base]) & _MASK != version:
            return None
        try:
            entries, width, nodes, digest = L.decode_table(payload)
        except CorruptRegion:
            return None
        if width == 2 and sys.byteorder != "little":
            return None  # entries are little-endian; a big-endian reader builds its own
        return entries.cast("B" if width == 1 else "H"), nodes, digest

    def meta(self) -> L.Meta:
        while True:
            try:
                rec = self._record(L.SLOT_META, L.KIND_META)
                return L.Meta() if rec is None else L.decode_meta(rec[1])
            except _Switched:
                continue

    def directory(self) -> dict[str, int]:
        """Service name -> slot, re-read only when the directory record changed."""
        while True:
            try:
                return self._directory()
            except _Switched:
                continue

    def _directory(self) -> dict[str, int]:
        if self.slot_version(L.SLOT_DIRECTORY) != self._dir_version:
            rec = self._record(L.SLOT_DIRECTORY, L.KIND_DIRECTORY)
            if rec is None:
                self._dir, self._dir_version = {}, 0
            else:
                self._dir = L.decode_directory(rec[1], self.header.slot_count)
                self._dir_version = rec[0]
        return self._dir

    def names(self) -> list[str]:
        return sorted(self.directory())

    def lookup(self, name: str) -> tuple[int, int, Service]:
        """(slot, version, service) for ``name``; raises :class:`UnknownService`.

        The directory and the service slots are published in one update but read separately,
        so a mismatch (a slot just reused, a service just removed) is re-checked before it is
        believed.
        """
        for _ in range(64):
            try:
                slot = self._directory().get(name)
                if slot is None:
                    break
                rec = self._record(slot, L.KIND_SERVICE)
                if rec is not None:
                    service = L.decode_service(rec[1])
                    if service.name == name:
                        return slot, rec[0], service
                self._dir_version = -1  # the directory is behind the slots: re-read it
            except _Switched:
                continue
        raise self._missing(name)

    def _missing(self, name: str) -> ClusterMapError:
        """UnknownService, unless the region never held a map (neither from a server nor from a
        snapshot): then no service is known *yet*, and :class:`RegionUnavailable` says why, as
        ``cmctl status`` does (a wrong server address, a server still warming up, no sidecar)."""
        meta = self.meta()
        if self.last_sync_ns or self.directory() or meta.source == "snapshot":
            return UnknownService(f"unknown service {name!r}")
        why = [meta.reason or "no answer from a server yet"]
        if writer_running(self.path) is False:
            why.append(f"no sidecar is running (last was pid {self.writer_pid})")
        return RegionUnavailable(f"{self.path}: the sidecar has not synced yet ({'; '.join(why)})")

    def service(self, name: str) -> Service:
        return self.lookup(name)[2]

    def snapshot(self) -> Snapshot:
        """Every service as of one generation (retried while a publish is in progress)."""
        start = time.monotonic()
        deadline = start + self.read_budget * 5
        while True:
            try:
                before = int(self.words[L.GENERATION_OFF // 8])
                if before & L.RETIRED:
                    self._follow()
                txn = int(self.words[L.TXN_OFF // 8])
                meta = self.meta()
                services = {}
                for name, slot in self._directory().items():
                    rec = self._record(slot, L.KIND_SERVICE)
                    if rec is None:
                        break
                    svc = L.decode_service(rec[1])
                    if svc.name != name:
                        break
                    services[name] = svc
                else:
                    after = int(self.words[L.GENERATION_OFF // 8])
                    txn_after = int(self.words[L.TXN_OFF // 8])
                    stuck = txn and txn == txn_after and time.monotonic() - start > 0.2
                    if before == after and ((txn == 0 and txn_after == 0) or stuck):
                        return Snapshot(
                            before & _MASK,
                            meta,
                            services,
                            self.last_sync_ns,
                            self.writer_pid,
                            repair_pending=bool(stuck),
                        )
                self._dir_version = -1
            except _Switched:
                continue
            if time.monotonic() > deadline:
                raise CorruptRegion(f"{self.path}: no consistent snapshot within the read budget")
            time.sleep(0.0005)
