"""The one change log: which services changed at which revision, for delta answers.

Whatever the store, the registry appends ``(revision, service)`` for each service a change
touched and asks :meth:`ChangeLog.since` which services changed after a subscriber's revision.
The log is bounded: past ``size`` entries the oldest go and :attr:`ChangeLog.floor` (the oldest
revision a delta can start from) moves up; an older subscriber gets a full map, unless the store
keeps history (etcd) and the registry has :meth:`ChangeLog.remember`\\ ed what changed between
that revision and the log (a "bridge").

Not synchronised: its owner (the registry, under its lock) serialises calls.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["ChangeLog"]

_BRIDGES = 64


class ChangeLog:
    """A bounded log of service changes (see the module docstring)."""

    def __init__(self, size: int = 10_000) -> None:
        if size < 1:
            raise ValueError("the change log size must be positive")
        self._size = size
        self._log: deque[tuple[int, str]] = deque()
        self._floor = 0
        self._head = 0
        self._bridges: dict[int, tuple[int, frozenset[str]]] = {}

    @property
    def floor(self) -> int:
        """The oldest revision :meth:`since` answers from without a bridge."""
        return self._floor

    def reset(self, revision: int) -> None:
        """Start over at ``revision`` (a new or reloaded map): older revisions get a full map."""
        self._log.clear()
        self._bridges.clear()
        self._floor = self._head = revision

    def append(self, revision: int, names: Iterable[str]) -> None:
        """``names`` changed at ``revision`` (revisions only grow)."""
        for name in names:
            self._log.append((revision, name))
        self._head = max(self._head, revision)
        while len(self._log) > self._size:
            self._floor = self._log.popleft()[0]

    def remember(self, revision: int, upto: int, names: frozenset[str]) -> None:
        """Between ``revision`` and ``upto`` (a revision the log covers), ``names`` changed."""
        self._bridges[revision] = (upto, names)
        while len(self._bridges) > _BRIDGES:
            self._bridges.pop(next(iter(self._bridges)))

    def bridged(self, revision: int) -> bool:
        return revision in self._bridges

    def since(self, revision: int) -> frozenset[str] | None:
        """The services changed after ``revision``; None if the log cannot say (a full map)."""
        if revision > self._head:
            return None
        names: set[str] = set()
        if revision < self._floor:
            bridge = self._bridges.get(revision)
            if bridge is None or bridge[0] < self._floor:
                return None
            revision, base = bridge
            names.update(base)
        for rev, name in reversed(self._log):
            if rev <= revision:
                break
            names.add(name)
        return frozenset(names)
