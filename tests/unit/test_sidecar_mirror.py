"""The sidecar's mirror of the server map: full, delta, not-modified, and checksum checks."""

from __future__ import annotations

import pytest

from clustermap.checksum import map_checksum, service_digest
from clustermap.model import Node, Service
from clustermap.sidecar.mirror import ChecksumMismatch, Mirror
from clustermap.wire import DELTA, FULL, NOT_MODIFIED, NOT_READY, PollAnswer, Rejected


def svc(name: str, *ports: int) -> Service:
    return Service(name, tuple(Node("10.0.0.1", p) for p in ports))


def answer(
    kind: str,
    revision: int,
    services: list[Service],
    removed: tuple[str, ...] = (),
    result: list[Service] | None = None,
    epoch: str = "e1",
) -> PollAnswer:
    final = services if result is None else result
    return PollAnswer(
        kind,
        epoch,
        revision,
        map_checksum(service_digest(s) for s in final),
        tuple(services),
        removed,
    )


def test_full_then_delta_then_not_modified() -> None:
    m = Mirror()
    change = m.apply(answer(FULL, 5, [svc("a", 1), svc("b", 2)]))
    assert (change.upserted, change.removed) == (("a", "b"), ())
    change = m.apply(answer(DELTA, 6, [svc("b", 3)], ("a",), result=[svc("b", 3)]))
    assert (change.upserted, change.removed) == (("b",), ("a",))
    assert m.services == {"b": svc("b", 3)}
    assert m.revision == 6
    assert not m.apply(PollAnswer(NOT_MODIFIED, "e1", 9, m.checksum))
    assert m.revision == 9
    assert not m.apply(PollAnswer(NOT_READY, "", 0, 0))
    assert m.revision == 9


def test_a_delta_that_does_not_add_up_changes_nothing() -> None:
    m = Mirror()
    m.apply(answer(FULL, 5, [svc("a", 1)]))
    bad = PollAnswer(DELTA, "e1", 6, 12345, (svc("a", 2),))
    with pytest.raises(ChecksumMismatch, match="checksum"):
        m.apply(bad)
    assert m.services == {"a": svc("a", 1)}
    assert m.revision == 5


def test_a_delta_from_another_epoch_is_refused() -> None:
    m = Mirror()
    m.apply(answer(FULL, 5, [svc("a", 1)]))
    with pytest.raises(ChecksumMismatch, match="epoch"):
        m.apply(answer(DELTA, 6, [svc("a", 2)], epoch="e2"))


def test_a_full_reports_only_what_changed() -> None:
    m = Mirror()
    m.apply(answer(FULL, 5, [svc("a", 1), svc("b", 2)]))
    change = m.apply(answer(FULL, 1, [svc("a", 1), svc("c", 3)], epoch="e2"))
    assert (change.upserted, change.removed) == (("c",), ("b",))
    assert m.epoch == "e2"


def quarantining(
    kind: str, revision: int, good: list[Service], bad: list[Service], result: list[Service]
) -> PollAnswer:
    """An answer whose ``bad`` services were set aside (their digests are the server's)."""
    return PollAnswer(
        kind,
        "e1",
        revision,
        map_checksum(service_digest(s) for s in result),
        tuple(good),
        rejected=tuple(Rejected(s.name, service_digest(s), "host is not valid") for s in bad),
    )


def test_a_rejected_service_keeps_its_last_good_version_and_the_checksum_still_holds() -> None:
    m = Mirror()
    m.apply(answer(FULL, 1, [svc("a", 1), svc("b", 1)]))
    change = m.apply(
        quarantining(DELTA, 2, [svc("b", 2)], [svc("a", 666)], [svc("a", 666), svc("b", 2)])
    )
    assert change.upserted == ("b",)
    assert m.services == {"a": svc("a", 1), "b": svc("b", 2)}
    assert m.quarantined == {"a": "host is not valid"}
    # The server's map includes the bad version: a not-modified answer agrees, no resync.
    assert not m.apply(PollAnswer(NOT_MODIFIED, "e1", 3, m.checksum))
    # A change to another service is still verified: one that does not add up is refused.
    with pytest.raises(ChecksumMismatch):
        m.apply(PollAnswer(DELTA, "e1", 4, 12345, (svc("b", 3),)))
    # The server's next version of a is valid: it replaces the kept one and the flag clears.
    change = m.apply(answer(DELTA, 5, [svc("a", 7)], result=[svc("a", 7), svc("b", 2)]))
    assert change.upserted == ("a",)
    assert m.services["a"] == svc("a", 7)
    assert m.quarantined == {}


def test_after_a_resync_the_published_version_is_kept() -> None:
    m = Mirror()
    full = quarantining(FULL, 9, [svc("b", 1)], [svc("a", 666), svc("c", 1)], [])
    full = PollAnswer(
        FULL,
        "e1",
        9,
        map_checksum(service_digest(s) for s in (svc("a", 666), svc("b", 1), svc("c", 1))),
        full.services,
        rejected=full.rejected,
    )
    change = m.apply(full, last_good={"a": svc("a", 1)})
    assert m.services == {"a": svc("a", 1), "b": svc("b", 1)}  # c never had a good version
    assert set(m.quarantined) == {"a", "c"}
    assert change.upserted == ("b",)
    change = m.apply(
        PollAnswer(DELTA, "e1", 10, map_checksum([service_digest(svc("b", 1))]), removed=("a", "c"))
    )
    assert change.removed == ("a",)
    assert m.services == {"b": svc("b", 1)}
    assert m.quarantined == {}
