"""The sidecar's copy of the server's map, kept in step by full and delta answers (pure).

Every answer is applied copy-on-write and checked against the checksum the server sent *before*
it replaces the mirror: a delta applied to the wrong base, a lost answer or a server bug is
detected here and answered with a full resync, never published.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from clustermap.checksum import map_checksum, service_digest, update_checksum
from clustermap.model import Service
from clustermap.wire import DELTA, FULL, NOT_MODIFIED, NOT_READY, PollAnswer

__all__ = ["Change", "ChecksumMismatch", "Mirror"]

_NOTHING: Final[tuple[str, ...]] = ()


class ChecksumMismatch(Exception):
    """Applying an answer gave a map whose checksum is not the server's; the mirror is unchanged."""


@dataclass(frozen=True, slots=True)
class Change:
    """What one answer changed: names of upserted and removed services."""

    kind: str
    upserted: tuple[str, ...] = _NOTHING
    removed: tuple[str, ...] = _NOTHING

    def __bool__(self) -> bool:
        return bool(self.upserted or self.removed)


@dataclass(slots=True)
class Mirror:
    """The map at (epoch, revision) as the server has it, with per-service digests."""

    epoch: str = ""
    revision: int = 0
    services: dict[str, Service] = field(default_factory=dict)
    digests: dict[str, int] = field(default_factory=dict)
    checksum: int = 0

    def apply(self, answer: PollAnswer) -> Change:
        """Apply one answer, or raise :class:`ChecksumMismatch` leaving the mirror as it was."""
        if answer.kind == NOT_READY:
            return Change(NOT_READY)
        if answer.kind == NOT_MODIFIED:
            if answer.epoch != self.epoch or answer.checksum != self.checksum:
                raise ChecksumMismatch(
                    f"not-modified at revision {answer.revision}, but our map "
                    f"(epoch {self.epoch!r}, checksum {self.checksum:#x}) is not the server's"
                )
            self.revision = answer.revision
            return Change(NOT_MODIFIED)
        if answer.kind == FULL:
            return self._full(answer)
        if answer.kind == DELTA:
            return self._delta(answer)
        raise ValueError(f"unknown answer kind {answer.kind!r}")

    def _full(self, answer: PollAnswer) -> Change:
        services = {s.name: s for s in answer.services}
        digests = {name: service_digest(s) for name, s in services.items()}
        checksum = map_checksum(digests.values())
        self._check(answer, checksum)
        upserted = tuple(n for n, d in digests.items() if self.digests.get(n) != d)
        removed = tuple(n for n in self.services if n not in services)
        self.epoch, self.revision = answer.epoch, answer.revision
        self.services, self.digests, self.checksum = services, digests, checksum
        return Change(FULL, upserted, removed)

    def _delta(self, answer: PollAnswer) -> Change:
        if answer.epoch != self.epoch:
            raise ChecksumMismatch(f"delta for epoch {answer.epoch!r}, ours is {self.epoch!r}")
        checksum = self.checksum
        new_digests: dict[str, int] = {}
        for s in answer.services:
            d = service_digest(s)
            checksum = update_checksum(checksum, self.digests.get(s.name), d)
            new_digests[s.name] = d
        removed = tuple(n for n in answer.removed if n in self.services)
        for name in removed:
            checksum = update_checksum(checksum, self.digests[name], None)
        self._check(answer, checksum)
        upserted = tuple(n for n, d in new_digests.items() if self.digests.get(n) != d)
        for s in answer.services:
            self.services[s.name] = s
        self.digests.update(new_digests)
        for name in removed:
            del self.services[name]
            del self.digests[name]
        self.revision, self.checksum = answer.revision, checksum
        return Change(DELTA, upserted, removed)

    def _check(self, answer: PollAnswer, checksum: int) -> None:
        if checksum != answer.checksum:
            raise ChecksumMismatch(
                f"{answer.kind} to revision {answer.revision} gives checksum {checksum:#x}, "
                f"the server's is {answer.checksum:#x}"
            )

    def reset(self) -> None:
        """Forget everything, so the next poll asks for a full map."""
        self.epoch, self.revision, self.checksum = "", 0, 0
        self.services, self.digests = {}, {}

    @property
    def view(self) -> Mapping[str, Service]:
        return self.services
