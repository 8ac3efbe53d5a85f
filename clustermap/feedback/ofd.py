"""Open-file-description byte-range locks: who holds a row, asked without taking it.

An OFD lock (``F_OFD_SETLK``) belongs to the open file description, not to the process: the
kernel drops it when the last descriptor of that description closes, which includes any death of
the process. A forked child shares its parent's descriptions, so it must close the inherited
descriptor and open its own before claiming a row. ``F_OFD_GETLK`` answers "is this range
locked?" without locking anything, across PID namespaces.
"""

from __future__ import annotations

import fcntl
import os
import struct

__all__ = ["held", "try_lock"]

# struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (int), padding.
_FLOCK = struct.Struct("hhqqi4x")


def try_lock(fd: int, start: int, length: int) -> bool:
    """Take a write lock on ``[start, start + length)`` of ``fd``; False if someone holds it."""
    try:
        fcntl.fcntl(
            fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        )
    except (BlockingIOError, PermissionError):
        return False
    return True


def held(fd: int, start: int, length: int) -> bool:
    """Whether another open file description holds a lock on any byte of the range."""
    answer = fcntl.fcntl(
        fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    )
    return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)
