"""A worker process's side of feedback: its row in ``<region>.feedback`` and the load table.

Nothing here may break a pick. Every failure (files missing, unwritable, corrupt, every row
taken) turns feedback off for the process with one log line, and picks go on exactly as
before; the files are tried again every :data:`RETRY_S` seconds. The hot path (the client's
``call``) touches only :attr:`Feedback.floats` at word indices this object handed out.

A row belongs to this process while it holds an OFD lock on the row's bytes; the kernel drops
the lock when the process dies, so a dead worker's calls stop counting and its row is reclaimed
by the next process that needs one. After a fork the child closes the inherited descriptor
(the lock stays the parent's) and claims its own row on first use.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import stat
import threading
import time
from typing import Final

from clustermap.feedback import layout as L
from clustermap.feedback.ofd import try_lock

__all__ = ["RETRY_S", "Feedback", "feedback_paths"]

log = logging.getLogger("clustermap.feedback")

#: While feedback is off, look for the files again this often (seconds).
RETRY_S: Final = 10.0
_W: Final = L.ENTRY_WORDS


def feedback_paths(region: str) -> tuple[str, str]:
    """(rows file, load file) beside ``region``."""
    return region + ".feedback", region + ".load"


class _Off(Exception):
    """Feedback cannot be used in this process; the message says why."""


class Feedback:
    """This process's feedback state for one region. Thread-safe for its slow paths; the
    counters are written only by the process that owns the row."""

    __slots__ = (
        "_fd",
        "_lock",
        "_logged",
        "_mm",
        "_next",
        "_pid",
        "_retry_at",
        "_row_end",
        "_slots",
        "capacity",
        "floats",
        "load",
        "owner",
        "reason",
        "region",
        "row",
        "words",
    )

    def __init__(self, region: str) -> None:
        self.region = region
        #: The feedback file's words (read-write), or None while feedback is off.
        self.words: memoryview | None = None
        #: The same words as float64 (an entry's ``calls`` and ``latency``), or None.
        self.floats: memoryview[float] | None = None
        #: The load file's words (read-only), or None.
        self.load: memoryview | None = None
        self.capacity = 0
        self.row = -1
        #: Our row's owner word, ``(nonce << 32) | pid``; 0 without a row.
        self.owner = 0
        self.reason = "not started"
        self._fd = -1
        self._mm: mmap.mmap | None = None
        self._next = 0  # word index of the next free entry of our row
        self._slots: dict[int, int] = {}  # node id -> word index of its entry's in-flight word
        self._row_end = 0
        self._pid = os.getpid()
        self._retry_at = 0.0
        self._logged = False
        self._lock = threading.Lock()

    # -- opening ---------------------------------------------------------------------------------

    def ready(self) -> bool:
        """True when this process has a row (opening the files and claiming one if needed)."""
        if self.words is not None and self._pid == os.getpid():
            return True
        if time.monotonic() < self._retry_at:
            return False
        with self._lock:
            if self._pid != os.getpid():
                self.after_fork()
            if self.words is None:
                try:
                    self._open()
                except _Off as exc:
                    self._off(str(exc))
                except (OSError, ValueError, BufferError) as exc:
                    self._off(f"{type(exc).__name__}: {exc}")
        return self.words is not None

    def _off(self, why: str) -> None:
        self.reason = why
        self._retry_at = time.monotonic() + RETRY_S
        if not self._logged:
            self._logged = True
            log.warning("clustermap feedback is off in pid %d: %s", os.getpid(), why)

    def _open(self) -> None:
        rows_path, load_path = feedback_paths(self.region)
        if self.load is None:
            self._open_load(load_path)
        try:
            fd = os.open(rows_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _Off(f"{rows_path} does not exist (is cm-sidecar running?)") from None
        except OSError as exc:
            raise _Off(f"{rows_path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Off(f"{rows_path}: not a regular file")
            try:
                head = L.parse_feedback_header(os.pread(fd, 64, 0), st.st_size)
            except L.LayoutError as exc:
                raise _Off(f"{rows_path}: {exc}") from None
            row = self._claim(fd, head)
            mm = mmap.mmap(fd, L.feedback_size(head.rows, head.entries))
        except BaseException:
            os.close(fd)
            raise
        words = memoryview(mm).cast("Q")
        base = L.row_offset(head, row) // 8
        # Clear what a dead previous owner left, with the owner word 0 meanwhile, so the sidecar
        # never credits its counters to us; then publish our claim.
        words[base] = 0
        mm[(base + 1) * 8 : (base * 8 + head.row_size)] = bytes(head.row_size - 8)
        owner = L.owner_word(secrets.randbits(31) + 1, os.getpid())
        words[base] = owner
        self._fd, self._mm, self.row, self.owner = fd, mm, row, owner
        self._next = base + L.ROW_HEADER // 8
        self._slots = {}
        self._row_end = base + head.row_size // 8
        self.floats = memoryview(mm).cast("d")
        self.reason = f"on: row {row} of {head.rows} in {rows_path}"
        if self._logged:
            log.warning("clustermap feedback is on again in pid %d", os.getpid())
            self._logged = False
        self.words = words

    def _claim(self, fd: int, head: L.FeedbackHeader) -> int:
        start = os.getpid() % head.rows  # spread processes over rows: fewer failed attempts
        for k in range(head.rows):
            row = (start + k) % head.rows
            if try_lock(fd, L.row_offset(head, row), head.row_size):
                return row
        raise _Off(
            f"all {head.rows} rows of {self.region}.feedback are taken by live processes "
            "(raise the sidecar's feedback_rows); this process's calls are not counted"
        )

    def _open_load(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise _Off(f"{path} does not exist (is cm-sidecar running?)") from None
            raise _Off(f"{path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_mode & stat.S_IWOTH:
                raise _Off(f"{path}: not a regular file, or world-writable; refusing to trust it")
            try:
                head = L.parse_load_header(os.pread(fd, 64, 0), st.st_size)
            except L.LayoutError as exc:
                raise _Off(f"{path}: {exc}") from None
            mm = mmap.mmap(fd, L.load_size(head.capacity), mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.capacity = head.capacity
        self.load = memoryview(mm).cast("Q")

    # -- the counters ----------------------------------------------------------------------------

    def entry(self, node_id: int) -> int:
        """Word index of a fresh entry for ``node_id`` in our row (its ``in flight`` word), or
        -1 when the row is full or the id is out of range. Called once per node per process;
        the caller caches the answer."""
        words = self.words
        if words is None or not 0 <= node_id < self.capacity:
            return -1
        with self._lock:
            known = self._slots.get(node_id)
            if known is not None:
                return known
            i = self._next
            if i + _W > self._row_end:
                if not self._logged:
                    self._logged = True
                    log.warning(
                        "clustermap feedback: row %d is full; further nodes are not counted in "
                        "pid %d (raise the sidecar's feedback_entries)",
                        self.row,
                        os.getpid(),
                    )
                return -1
            self._next = i + _W
            for k in range(1, _W):
                words[i + k] = 0  # (the row was cleared when claimed; never trust it twice)
            words[i] = node_id + 1  # the tag last: the entry is complete when it is visible
            self._slots[node_id] = i + 1
            return i + 1

    def load_view(self) -> tuple[memoryview, int, int, int] | None:
        """For least_request: (load words, index of node id 0's cost, capacity, index of a word
        holding 1)."""
        if self.load is None:
            self.ready()
        if self.load is None:
            return None
        return self.load, L.HEADER_SIZE // 8 + 2 * self.capacity, self.capacity, L.ONE_OFF // 8

    def after_fork(self) -> None:
        """In a forked child: give up the parent's row (without touching it), claim anew later."""
        if self._fd >= 0:
            os.close(self._fd)  # our reference only: the parent keeps its lock
        self._fd = -1
        # The inherited mapping stays valid (and the load table in it is shared), but the
        # parent's row is not ours to write: forget it. The next ready() claims our own.
        self.words = None
        self.floats = None
        self._mm = None
        self._slots = {}
        self.row = -1
        self.owner = 0
        self._pid = os.getpid()
        self._retry_at = 0.0
        self._logged = False
        self._lock = threading.Lock()
        self.reason = "not started"
