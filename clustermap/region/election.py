"""Who writes a region: an exclusive lock on ``<region>.lock``, held for the writer's lifetime.

The writer takes two locks on that file, both released by the kernel on any exit:

* ``flock(LOCK_EX)``: the election itself (a second writer waits or is refused);
* an OFD write lock on byte 0 (``F_OFD_SETLK``): so anyone can *ask* whether a writer is running
  with ``F_OFD_GETLK``, which takes no lock (a probe that took one, even briefly, could refuse a
  sidecar starting at that instant) and, unlike ``/proc/locks``, answers across PID namespaces
  (a worker container asking about the sidecar container).

The file holds the writer's pid as text, for messages.
"""

from __future__ import annotations

import fcntl
import os
import struct

__all__ = ["hold", "writer_running"]

# struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (int), padding.
_FLOCK = struct.Struct("hhqqi4x")


def hold(fd: int) -> None:
    """Advertise the writer on ``fd`` (already holding the flock) to :func:`writer_running`."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))


def writer_running(region: str) -> bool | None:
    """True if a writer holds ``region``; False if none does; None if it cannot be told."""
    try:
        fd = os.open(region + ".lock", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
    except OSError:
        return None
    finally:
        os.close(fd)
    return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)
