"""Maglev tables the writer publishes beside hashed services: pure, no I/O.

Building a 65 537-slot Maglev table costs 20–40 ms in CPython. Built by each worker on its first
keyed pick of every new version, it made one slow request per worker per change and cost each
worker ~0.7 MiB; built once by the sidecar and published in the region, it costs each worker a
checksum and a digest (tens of µs) and no private memory: workers index the region's pages.

Which services get one (:func:`~clustermap.balance.picker.wants_maglev`): those whose default
strategy is ``consistent_hash`` or whose meta says ``hash=maglev``, with at least one eligible
node. A table is 64 KiB (up to 256 nodes) or 128 KiB, so publishing one for every service
would multiply a large map's region many times over (docs/performance.md).
"""

from __future__ import annotations

from typing import Final, NamedTuple

from clustermap.balance.hashing import build_maglev, canonical_name, maglev_digest
from clustermap.balance.picker import eligible_nodes, wants_maglev
from clustermap.model import Service
from clustermap.region import layout as L

__all__ = ["TABLE_BUDGET_S", "TableInput", "build_table", "table_input"]

#: Build time the writer spends on tables in one update. At least one table is always built;
#: the others are published in the next updates (workers asking before that build their own),
#: so a sidecar starting with hundreds of hashed services publishes its map at once.
TABLE_BUDGET_S: Final = 0.1


class TableInput(NamedTuple):
    """What a service's table is built over: its eligible nodes' names and weights."""

    names: list[str]
    weights: list[int]
    digest: int


def table_input(service: Service) -> TableInput | None:
    """The input of ``service``'s table, or None when it gets none."""
    if not wants_maglev(service):
        return None
    nodes = eligible_nodes(service)
    if not nodes:
        return None
    names = [canonical_name(n) for n in nodes]
    weights = [n.weight for n in nodes]
    return TableInput(names, weights, maglev_digest(names, weights))


def build_table(given: TableInput) -> bytes:
    """The table record's payload (docs/region-format.md)."""
    index = build_maglev(given.names, given.weights)
    return L.encode_table(index, len(given.names), given.digest)
