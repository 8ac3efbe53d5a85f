"""A process-shared robust pthread mutex living in the region's header page (glibc, ctypes).

Three ways such a mutex still hangs forever, and what this module does about each
(``shared/notes/shm-facts.md`` has the measurements):

1. The holder unmaps the region, then dies: the kernel can no longer mark the mutex as orphaned.
   CPython's shutdown unmaps every ``mmap.mmap``, so the header page holding the mutex is mapped
   a second time with ``libc.mmap`` and unmapped only while the mutex is not held.
2. Unlocking after EOWNERDEAD without ``pthread_mutex_consistent`` makes it ENOTRECOVERABLE
   forever: :meth:`RobustMutex.acquire` reports the dead owner to the caller, who repairs the data
   and then calls :meth:`RobustMutex.mark_consistent` before anything else.
3. ``pthread_mutex_trylock`` on an ENOTRECOVERABLE mutex leaves the lock word set: never used.

Waits are ``pthread_mutex_clocklock`` slices of 50 ms on CLOCK_MONOTONIC, so Python signal
handlers run between slices and a wait can be abandoned. The mutex type is ERRORCHECK: locking
twice from one thread returns EDEADLK instead of hanging.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import time
from typing import Final

__all__ = ["LockTimeout", "RobustMutex"]

_PTHREAD_MUTEX_ERRORCHECK: Final = 2
_PTHREAD_PROCESS_SHARED: Final = 1
_PTHREAD_MUTEX_ROBUST: Final = 1
_CLOCK_MONOTONIC: Final = 1
_SLICE_S: Final = 0.05
_PAGE: Final = mmap.PAGESIZE
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    for name in (
        "pthread_mutex_init",
        "pthread_mutex_unlock",
        "pthread_mutex_consistent",
        "pthread_mutex_clocklock",
        "pthread_mutexattr_init",
        "pthread_mutexattr_destroy",
        "pthread_mutexattr_setpshared",
        "pthread_mutexattr_setrobust",
        "pthread_mutexattr_settype",
    ):
        getattr(libc, name).restype = ctypes.c_int
    libc.pthread_mutex_clocklock.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.POINTER(_Timespec),
    ]
    return libc


_libc = _load_libc()


class LockTimeout(TimeoutError):
    """The mutex stayed held by a live owner for the whole wait."""


class RobustMutex:
    """The robust mutex at ``offset`` in the first page of the file open as ``fd``."""

    def __init__(self, fd: int, offset: int) -> None:
        if offset + 64 > _PAGE:
            raise ValueError("the mutex must live in the file's first page")
        addr = _libc.mmap(None, _PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of the region's lock page failed: {os.strerror(err)}")
        self._base: int | None = addr
        self._mutex = ctypes.c_void_p(addr + offset)
        self.held = False

    def initialize(self) -> None:
        """(Re)create the mutex unlocked. Only safe when no other process can be using it: at file
        creation, or by the elected writer replacing a mutex that cannot be recovered."""
        attr = ctypes.create_string_buffer(64)
        _check(_libc.pthread_mutexattr_init(attr), "pthread_mutexattr_init")
        try:
            _check(_libc.pthread_mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED), "setpshared")
            _check(_libc.pthread_mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST), "setrobust")
            _check(_libc.pthread_mutexattr_settype(attr, _PTHREAD_MUTEX_ERRORCHECK), "settype")
            ctypes.memset(self._mutex, 0, 64)
            _check(_libc.pthread_mutex_init(self._mutex, attr), "pthread_mutex_init")
        finally:
            _libc.pthread_mutexattr_destroy(attr)

    def acquire(self, timeout: float) -> bool:
        """Lock within ``timeout`` seconds. Returns True when the previous owner died holding it:
        the caller must then repair the protected data and call :meth:`mark_consistent`.

        Raises :class:`LockTimeout`, or ``OSError(ENOTRECOVERABLE)`` for a mutex that an earlier
        process released without repairing it.
        """
        deadline = time.monotonic() + timeout
        ts = _Timespec()
        while True:
            now = time.clock_gettime(time.CLOCK_MONOTONIC)
            until = now + min(_SLICE_S, max(deadline - time.monotonic(), 0.0))
            ts.tv_sec = int(until)
            ts.tv_nsec = int((until - int(until)) * 1e9)
            rc = _libc.pthread_mutex_clocklock(self._mutex, _CLOCK_MONOTONIC, ctypes.byref(ts))
            if rc == 0:
                self.held = True
                return False
            if rc == errno.EOWNERDEAD:
                self.held = True
                return True
            if rc == errno.ETIMEDOUT:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"region lock still held after {timeout:.1f} s")
                continue
            raise OSError(rc, f"locking the region mutex failed: {os.strerror(rc)}")

    def mark_consistent(self) -> None:
        _check(_libc.pthread_mutex_consistent(self._mutex), "pthread_mutex_consistent")

    def release(self) -> None:
        self.held = False
        _check(_libc.pthread_mutex_unlock(self._mutex), "pthread_mutex_unlock")

    def close(self) -> None:
        """Unmap the lock page, unless it is held (then leave it mapped so that, if this process
        dies, the kernel can still mark the mutex as orphaned)."""
        if self._base is not None and not self.held:
            _libc.munmap(self._base, _PAGE)
            self._base = None


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise OSError(rc, f"{what} failed: {os.strerror(rc)}")
