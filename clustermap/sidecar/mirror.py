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
    """The map at (epoch, revision) as the server has it, with per-service digests.

    A service the answer set aside as invalid (``PollAnswer.rejected``) is *quarantined*: its
    digest (as the server sent it) goes into the checksum, so the rest of the answer is still
    verified and no resync is needed, while ``services`` keeps its last good version (ours, or
    the one in ``last_good`` after a resync; none if it never had one). ``quarantined`` names
    those services with the reason; a valid version or a removal from the server clears it.
    """

    epoch: str = ""
    revision: int = 0
    services: dict[str, Service] = field(default_factory=dict)
    digests: dict[str, int] = field(default_factory=dict)
    checksum: int = 0
    quarantined: dict[str, str] = field(default_factory=dict)

    def apply(self, answer: PollAnswer, last_good: Mapping[str, Service] | None = None) -> Change:
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
            return self._full(answer, last_good or {})
        if answer.kind == DELTA:
            return self._delta(answer, last_good or {})
        raise ValueError(f"unknown answer kind {answer.kind!r}")

    def _keep(self, name: str, last_good: Mapping[str, Service]) -> Service | None:
        return self.services.get(name) or last_good.get(name)

    def _full(self, answer: PollAnswer, last_good: Mapping[str, Service]) -> Change:
        services = {s.name: s for s in answer.services}
        digests = {name: service_digest(s) for name, s in services.items()}
        for r in answer.rejected:
            digests[r.name] = r.digest
        checksum = map_checksum(digests.values())
        self._check(answer, checksum)
        quarantined = {r.name: r.reason for r in answer.rejected}
        for name in quarantined:
            kept = self._keep(name, last_good)
            if kept is not None:
                services[name] = kept
        upserted = tuple(
            n for n, d in digests.items() if self.digests.get(n) != d and n not in quarantined
        )
        removed = tuple(n for n in self.services if n not in services)
        self.epoch, self.revision = answer.epoch, answer.revision
        self.services, self.digests, self.checksum = services, digests, checksum
        self.quarantined = quarantined
        return Change(FULL, upserted, removed)

    def _delta(self, answer: PollAnswer, last_good: Mapping[str, Service]) -> Change:
        if answer.epoch != self.epoch:
            raise ChecksumMismatch(f"delta for epoch {answer.epoch!r}, ours is {self.epoch!r}")
        checksum = self.checksum
        new_digests: dict[str, int] = {}
        for s in answer.services:
            d = service_digest(s)
            checksum = update_checksum(checksum, self.digests.get(s.name), d)
            new_digests[s.name] = d
        for r in answer.rejected:
            checksum = update_checksum(checksum, self.digests.get(r.name), r.digest)
        gone = tuple(n for n in answer.removed if n in self.digests)
        for name in gone:
            checksum = update_checksum(checksum, self.digests[name], None)
        self._check(answer, checksum)
        upserted = tuple(n for n, d in new_digests.items() if self.digests.get(n) != d)
        for s in answer.services:
            self.services[s.name] = s
            self.quarantined.pop(s.name, None)
        self.digests.update(new_digests)
        for r in answer.rejected:
            self.digests[r.name] = r.digest
            self.quarantined[r.name] = r.reason
            kept = self._keep(r.name, last_good)
            if kept is not None:
                self.services[r.name] = kept
        removed = tuple(n for n in gone if n in self.services)
        for name in gone:
            self.services.pop(name, None)
            self.quarantined.pop(name, None)
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
        self.services, self.digests, self.quarantined = {}, {}, {}

    @property
    def view(self) -> Mapping[str, Service]:
        return self.services
