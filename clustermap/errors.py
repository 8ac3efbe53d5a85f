"""The exceptions ClusterMap raises.

Every error a worker can see derives from :class:`ClusterMapError`, so one ``except`` clause
covers them all. The message is one line and names who is at fault (the region file, the
service name, the map's health) because operators read it in logs, not in a debugger.
"""

from __future__ import annotations

__all__ = [
    "ClusterMapError",
    "CorruptRegion",
    "InvalidSubset",
    "NoAvailableNode",
    "RegionFull",
    "RegionUnavailable",
    "UnknownService",
    "WriterBusy",
]


class ClusterMapError(Exception):
    """Base class of every ClusterMap error."""


class RegionUnavailable(ClusterMapError):
    """The region file is missing, unreadable, or not ours to trust (symlink, foreign owner)."""


class CorruptRegion(ClusterMapError):
    """The region file exists but is not a valid ClusterMap region (garbage, truncated, newer
    format). Readers never guess: they raise this instead of returning a wrong node."""


class UnknownService(ClusterMapError, LookupError):
    """The map has no service of that name."""


class NoAvailableNode(ClusterMapError):
    """The service exists but none of its nodes may receive traffic (all down, draining or of
    weight 0, and the panic threshold does not apply)."""


class InvalidSubset(ClusterMapError, TypeError, ValueError):
    """A ``subset=`` that is not a mapping of meta keys to short strings: the caller's mistake,
    reported before any node is chosen (it is a TypeError and a ValueError too)."""


class RegionFull(ClusterMapError):
    """The writer could not reserve space for the region (ENOSPC on tmpfs). The previous region
    stays readable and unchanged."""


class WriterBusy(ClusterMapError):
    """Another live process is the region's writer."""
