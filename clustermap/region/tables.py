"""Maglev tables the writer publishes beside hashed services: pure, no I/O.

Building a 65 537-slot Maglev table costs 20–40 ms in CPython. Built by each worker on its first
keyed pick of every new version, it made one slow request per worker per change and cost each
worker ~0.7 MiB; built once by the sidecar and published in the region, it costs each worker a
checksum and a digest (tens of µs) and no private memory: workers index the region's pages.

Which services get one (:func:`~clustermap.balance.picker.wants_maglev`): those whose default
strategy is ``consistent_hash`` or whose meta says ``hash=maglev``, with at least one eligible
node. A table is 64 KiB (up to 256 nodes) or 128 KiB, so publishing one for every service
would multiply a large map's region many times over (docs/performance.md).

Such a service may also declare subset selectors (meta ``subset_keys``, Envoy's
subset_selectors): then each declared subset with an eligible node gets a table too, over its
eligible nodes, as a worker's keyed pick inside that subset would build it. Tables are
identified by their nodes (count and digest), so subsets with the same eligible nodes share
one. Bounded: :data:`MAX_SUBSET_TABLES` per service and :data:`MAX_SUBSET_TABLE_BYTES` in the
whole region; a subset beyond them works as an undeclared one (its table built by each worker
on its first keyed pick).
"""

from __future__ import annotations

from typing import Final, NamedTuple

from clustermap.balance.hashing import (
    MAGLEV_TABLE_SIZE,
    build_maglev,
    canonical_name,
    maglev_digest,
)
from clustermap.balance.picker import eligible_nodes, wants_maglev
from clustermap.balance.routing import declared_subsets, describe, subset_service
from clustermap.model import Service
from clustermap.region import layout as L

__all__ = [
    "MAX_SUBSET_TABLES",
    "MAX_SUBSET_TABLE_BYTES",
    "TABLE_BUDGET_S",
    "TableInput",
    "TablePlan",
    "build_table",
    "table_bytes",
    "table_input",
    "table_plan",
]

#: Build time the writer spends on tables in one update. The tables of at least one service are
#: always built; other services' are published in the next updates (workers asking before that
#: build their own), so a sidecar starting with hundreds of hashed services publishes its map
#: at once. A service's tables (whole and subsets) are always built and published together.
TABLE_BUDGET_S: Final = 0.1

#: Subset tables one service may carry besides its whole table (the region format's bound).
MAX_SUBSET_TABLES: Final = L.MAX_TABLE_RECORDS - 1

#: Bytes of subset tables the whole region may hold (512 tables of up to 256 nodes).
MAX_SUBSET_TABLE_BYTES: Final = 32 * 1024 * 1024


class TableInput(NamedTuple):
    """What a table is built over: eligible nodes' names and weights, and their digest."""

    names: list[str]
    weights: list[int]
    digest: int


class TablePlan(NamedTuple):
    """A service's tables: the whole service's first, then its declared subsets' (distinct
    node sets, at most :data:`MAX_SUBSET_TABLES`); ``left_out`` says which subsets were over a
    limit, for the log ("" if none)."""

    inputs: list[TableInput]
    left_out: str


def _input(service: Service) -> TableInput | None:
    nodes = eligible_nodes(service)
    if not nodes:
        return None
    names = [canonical_name(n) for n in nodes]
    weights = [n.weight for n in nodes]
    return TableInput(names, weights, maglev_digest(names, weights))


def table_input(service: Service) -> TableInput | None:
    """The input of ``service``'s whole table, or None when it gets none."""
    return _input(service) if wants_maglev(service) else None


def table_bytes(given: TableInput) -> int:
    """Bytes a table record takes in the region (64-byte aligned, record header included)."""
    width = 1 if len(given.names) <= 256 else 2
    return L.align(L.RECORD_HEADER.size + 24 + MAGLEV_TABLE_SIZE * width)


def table_plan(service: Service, subset_bytes: int = MAX_SUBSET_TABLE_BYTES) -> TablePlan:
    """The tables of ``service``, with at most ``subset_bytes`` of subset tables (what is
    left of the region's :data:`MAX_SUBSET_TABLE_BYTES`)."""
    whole = table_input(service)
    if whole is None:
        return TablePlan([], "")
    inputs = [whole]
    seen = {(len(whole.names), whole.digest)}
    skipped: list[str] = []
    for pairs in declared_subsets(service):
        given = _input(subset_service(service, pairs))
        if given is None or (len(given.names), given.digest) in seen:
            continue
        size = table_bytes(given)
        if len(inputs) > MAX_SUBSET_TABLES or size > subset_bytes:
            skipped.append(describe(pairs))
            continue
        seen.add((len(given.names), given.digest))
        inputs.append(given)
        subset_bytes -= size
    left_out = ""
    if skipped:
        left_out = (
            f"service {service.name!r}: {len(skipped)} declared subsets get no published table "
            f"(over {MAX_SUBSET_TABLES} per service or {MAX_SUBSET_TABLE_BYTES >> 20} MiB of "
            f"subset tables per region), workers build theirs on first use: "
            + ", ".join(skipped[:5])
            + (", ..." if len(skipped) > 5 else "")
        )
    return TablePlan(inputs, left_out)


def build_table(given: TableInput) -> bytes:
    """The table record's payload (docs/region-format.md)."""
    index = build_maglev(given.names, given.weights)
    return L.encode_table(index, len(given.names), given.digest)
