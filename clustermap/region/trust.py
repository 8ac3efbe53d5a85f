"""Whom a region is trusted from: one rule for the writer (cm-sidecar), workers and cmctl.

Whoever can replace the region file, or rename the directory holding it, chooses the nodes every
worker picks. So a region is trusted only when every link in its path is out of reach of other
local users:

* the file is a regular file (not a symlink), owned by a trusted uid and writable by no one else;
* each directory from the file's up to ``/`` is owned by a trusted uid (or root) and is not
  writable by group or others unless it has the sticky bit (``/dev/shm``, ``/tmp``: there others
  can add names but cannot rename or delete ours);
* the region's own directory is not a symlink.

Trusted uids: root, the process's own effective uid, and for readers the owners named in
``$CLUSTERMAP_REGION_OWNER`` (user names or uids, comma-separated: the sidecar's user when
workers run as another one). The writer trusts only root and itself.

Checks run when a region is opened (or replaced by a new file), never on a worker's warm path:
one ``lstat`` per path component.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from collections.abc import Iterable
from typing import Final

from clustermap.errors import RegionUnavailable

__all__ = [
    "OWNER_ENV",
    "check_directory",
    "check_file",
    "owner_name",
    "reader_owners",
    "writer_owners",
]

#: Environment variable naming the extra owners readers trust (the sidecar's user).
OWNER_ENV: Final = "CLUSTERMAP_REGION_OWNER"

_SHARED_WRITE: Final = stat.S_IWGRP | stat.S_IWOTH


def owner_name(uid: int) -> str:
    """``name (uid N)`` for messages, or ``uid N`` when the uid has no name."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def writer_owners() -> frozenset[int]:
    """The uids whose files and directories the writer publishes through."""
    return frozenset((0, os.geteuid()))


def reader_owners(setting: str | None = None) -> frozenset[int]:
    """Root, this process's uid and ``$CLUSTERMAP_REGION_OWNER`` (or ``setting``)."""
    owners = {0, os.geteuid()}
    raw = os.environ.get(OWNER_ENV, "") if setting is None else setting
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        if item.isdigit():
            owners.add(int(item))
            continue
        try:
            owners.add(pwd.getpwnam(item).pw_uid)
        except KeyError:
            raise RegionUnavailable(f"{OWNER_ENV}={raw}: no user named {item!r}") from None
    return frozenset(owners)


def _hint(uid: int, owners: Iterable[int], reader: bool) -> str:
    trusted = ", ".join(owner_name(u) for u in sorted(owners))
    if not reader:
        return f"the writer trusts only {trusted}"
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return (
        f"trusted owners are {trusted}; if {owner_name(uid)} runs cm-sidecar, "
        f"set {OWNER_ENV}={name}"
    )


def check_file(
    path: str, st: os.stat_result, owners: frozenset[int], *, reader: bool = True
) -> None:
    """Refuse the region file with ``st`` (from ``fstat`` of the opened fd) unless trusted."""
    if not stat.S_ISREG(st.st_mode):
        raise RegionUnavailable(f"{path}: not a regular file")
    if st.st_uid not in owners:
        raise RegionUnavailable(
            f"{path}: owned by {owner_name(st.st_uid)}, refusing to trust it "
            f"({_hint(st.st_uid, owners, reader)})"
        )
    if st.st_mode & _SHARED_WRITE:
        who = "world" if st.st_mode & stat.S_IWOTH else "group"
        raise RegionUnavailable(f"{path}: is {who}-writable; refusing to trust it")


def check_directory(path: str, owners: frozenset[int], *, reader: bool = True) -> None:
    """Refuse the directory holding the region at ``path`` (and every directory above it)
    unless only trusted owners can change what it holds."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        st = os.lstat(parent)
    except OSError as exc:
        raise RegionUnavailable(f"{parent}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise RegionUnavailable(f"{parent}: the region's directory is a symlink; refusing it")
    # Above the region's own directory a symlink is a name its owner can re-point at will: it
    # must be a trusted owner's. Then judge the real directories it leads to.
    prefix = "/"
    for part in parent.split("/"):
        if not part:
            continue
        prefix = os.path.join(prefix, part)
        with contextlib.suppress(OSError):
            link = os.lstat(prefix)
            if stat.S_ISLNK(link.st_mode) and link.st_uid not in owners:
                raise RegionUnavailable(
                    f"{prefix}: symlink owned by {owner_name(link.st_uid)}, who could re-point "
                    f"it; refusing it ({_hint(link.st_uid, owners, reader)})"
                )
    current = os.path.realpath(parent)
    while True:
        try:
            st = os.stat(current)
        except OSError as exc:
            raise RegionUnavailable(f"{current}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise RegionUnavailable(f"{current}: not a directory")
        if st.st_uid not in owners:
            raise RegionUnavailable(
                f"{current}: directory owned by {owner_name(st.st_uid)}, who could replace "
                f"the region; refusing it ({_hint(st.st_uid, owners, reader)})"
            )
        if st.st_mode & _SHARED_WRITE and not st.st_mode & stat.S_ISVTX:
            mode = stat.S_IMODE(st.st_mode)
            raise RegionUnavailable(
                f"{current}: directory is writable by group or others (mode {mode:04o}) "
                "without the sticky bit: anyone could replace the region; refusing it"
            )
        if current == "/":
            return
        current = os.path.dirname(current)
