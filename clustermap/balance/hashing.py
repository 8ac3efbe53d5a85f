"""Consistent hashing: Maglev (the default) and a ketama ring (memcached compatibility).

Everything here is a pure function of sorted node names and weights, so every process on every
machine computes the same table; docs/hashing.md is the normative spec and publishes test
vectors that tests/unit/test_balance_hashing.py checks against this code.

- Key hash: ``xxh64(key_utf8, seed=0)`` (:func:`key_hash`); never Python's ``hash()``, which is
  salted per process.
- Maglev (Eisenbud et al., NSDI 2016) as Envoy builds it: table size 65537 (prime), per node
  ``offset = xxh64(name, 0) % M`` and ``skip = xxh64(name, 1) % (M - 1) + 1``, weights honoured by
  Envoy's "fill only when iteration * weight >= picks * max_weight" rule, evaluated in exact
  integers. Lookup is ``table[key_hash(key) % M]``.
- Ketama: the weighted md5 continuum of libketama/libmemcached (40 digests x 4 points per node
  at equal weight), first point ``>=`` the key's hash, wrapping to the first point.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from hashlib import md5
from itertools import pairwise
from math import floor

import xxhash

from clustermap.model import Node

__all__ = [
    "MAGLEV_TABLE_SIZE",
    "build_ketama",
    "build_maglev",
    "canonical_name",
    "ketama_hash",
    "ketama_name",
    "key_hash",
    "maglev_digest",
]

#: Maglev lookup table size: prime (so every skip generates a full permutation) and ~650 slots
#: per node at 100 nodes, which keeps balance within 0.2 %.
MAGLEV_TABLE_SIZE = 65537

#: Below this many empty slots the builder stops probing and computes each node's next empty slot
#: directly (see :func:`build_maglev`); both paths give the same table.
_TAIL_SLOTS = 160

#: libmemcached's MEMCACHED_POINTS_PER_SERVER_KETAMA and its points per md5 digest.
_KETAMA_POINTS = 160
_KETAMA_PER_DIGEST = 4
_LIBMEMCACHED_DEFAULT_PORT = 11211

_xxh64 = xxhash.xxh64_intdigest
_f32 = struct.Struct("<f")


def canonical_name(node: Node) -> str:
    """The name a node is hashed and sorted by: ``host:port``, IPv6 bracketed (``Node.address``).

    This is also the string Envoy hashes for Maglev, so a table built here matches Envoy's for the
    same hosts and weights.
    """
    return node.address


def key_hash(key: str | bytes) -> int:
    """The 64-bit hash of a request key: xxh64 of its UTF-8 bytes with seed 0."""
    if isinstance(key, str):
        return _xxh64(key.encode())
    return _xxh64(key)


def maglev_digest(names: Sequence[str], weights: Sequence[int]) -> int:
    """What a Maglev table was built over, in 64 bits: ``xxh3_64`` (seed 0) of the UTF-8 lines
    ``f"{name} {weight}\n"`` in canonical order. A worker uses a table published by the sidecar
    only when this equals the digest of its own eligible nodes (docs/region-format.md)."""
    return xxhash.xxh3_64_intdigest(
        "".join([f"{n} {w}\n" for n, w in zip(names, weights, strict=True)]).encode()
    )


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _maglev_turns(weights: Sequence[int], size: int) -> list[int]:
    """The order in which nodes claim slots: Envoy's iteration loop, computed without the loop.

    Envoy visits nodes in index order once per iteration ``t = 1, 2, ...`` and lets node ``i``
    claim a slot when ``t * w_i >= k_i * w_max`` (``k_i`` slots claimed so far). Node ``i``
    therefore claims at ``t = 1, 2, 3, ...`` if ``w_i == w_max`` and otherwise at ``t = 1`` and
    ``t = ceil(k * w_max / w_i)`` for ``k = 1, 2, ...``; by iteration
    ``T = ceil(size * w_max / sum(w))`` at least ``size`` claims have happened. The claims,
    keyed ``t * n + i``, sorted and cut at ``size`` are Envoy's order. Integers throughout.
    """
    n = len(weights)
    first = weights[0]
    if all(w == first for w in weights):
        return (list(range(n)) * -(-size // n))[:size]
    top = max(weights)
    last = -(-size * top // sum(weights))
    members: dict[int, list[int]] = {}
    for i, w in enumerate(weights):
        members.setdefault(w, []).append(i)
    runs: list[int] = []
    iterations: Sequence[int]
    for w, indices in members.items():
        if w == top:
            iterations = range(n, (last + 1) * n, n)
        else:
            iterations = [n, *(-(-k * top // w) * n for k in range(1, last * w // top + 1))]
        runs.extend([t + i for t in iterations for i in indices])
    runs.sort()  # one sorted run per weight: timsort merges them
    return [key % n for key in runs[:size]]


def build_maglev(
    names: Sequence[str], weights: Sequence[int], size: int = MAGLEV_TABLE_SIZE
) -> list[int]:
    """Build a Maglev lookup table: ``table[slot]`` is an index into ``names``.

    ``names`` must be unique and sorted (the caller's canonical order); weights must be
    positive. The population loop is Envoy's; two speed-ups leave the result unchanged:
    a node's probe position is kept incrementally instead of recomputing
    ``(offset + skip * next) % M``, and once fewer than 160 slots are empty each node's next
    empty slot in its permutation is found directly as the empty slot ``s`` minimising
    ``(s - position) * skip^-1 mod M`` (slots earlier in its permutation are all taken).
    """
    n = len(names)
    if n == 0:
        raise ValueError("maglev: no nodes")
    if len(weights) != n:
        raise ValueError("maglev: names and weights differ in length")
    if n > size:
        raise ValueError(f"maglev: {n} nodes do not fit a table of {size} slots")
    if not _is_prime(size):
        raise ValueError(f"maglev: table size {size} is not prime")
    if any(a >= b for a, b in pairwise(names)):
        raise ValueError("maglev: names must be unique and sorted")
    if any(w <= 0 for w in weights):
        raise ValueError("maglev: weights must be positive")

    if n == 1:
        return [0] * size  # one node owns every slot; the loop below would say the same
    positions: list[int] = []
    skips: list[int] = []
    for name in names:
        raw = name.encode()
        positions.append(_xxh64(raw) % size)
        skips.append(_xxh64(raw, 1) % (size - 1) + 1)

    turns = _maglev_turns(weights, size)
    tail = min(_TAIL_SLOTS, size)
    table = [-1] * size
    m = size
    for i in turns[: size - tail]:
        c = positions[i]
        if table[c] >= 0:
            k = skips[i]
            c += k
            if c >= m:
                c -= m
            while table[c] >= 0:
                c += k
                if c >= m:
                    c -= m
        table[c] = i
        positions[i] = c
    empty = [s for s in range(m) if table[s] < 0]
    for i in turns[size - tail :]:
        c = positions[i]
        inverse = pow(skips[i], -1, m)
        steps = [(s - c) * inverse % m for s in empty]
        table[empty.pop(steps.index(min(steps)))] = i
    return table


def ketama_name(node: Node, style: str = "ketama") -> str:
    """The per-node string ketama hashes into points.

    ``"ketama"``: ``host:port`` as :func:`canonical_name` (libketama, twemproxy, uhashring with
    ``host:port`` node names). ``"libmemcached"``: libmemcached's own format, the raw host with
    ``:port`` omitted when the port is 11211.
    """
    if style == "libmemcached":
        if node.port == _LIBMEMCACHED_DEFAULT_PORT:
            return node.host
        return f"{node.host}:{node.port}"
    return canonical_name(node)


def ketama_hash(key: str | bytes) -> int:
    """ketama's key hash: the first four md5 bytes, little-endian."""
    raw = key.encode() if isinstance(key, str) else key
    return int.from_bytes(md5(raw).digest()[:4], "little")


def _as_f32(x: float) -> float:
    return float(_f32.unpack(_f32.pack(x))[0])


def _ketama_digests(weight: int, total: int, live: int, style: str) -> int:
    """Digests (of four points each) for one node.

    ``"ketama"``: ``floor(40 * live * weight / total)`` in exact integers, as uhashring and
    most Python clients compute it. ``"libmemcached"``: libmemcached's
    ``floor(float(w) / float(W) * 160 / 4 * float(live) + 1e-10)`` with every float operation
    rounded to IEEE single precision as its C code does; this gives 39 instead of 40 digests
    for some node counts even at equal weights (25, 47, 50, ... nodes).
    """
    if style != "libmemcached":
        return _KETAMA_POINTS // _KETAMA_PER_DIGEST * live * weight // total
    pct = _as_f32(_as_f32(weight) / _as_f32(total))
    x = _as_f32(pct * _KETAMA_POINTS)
    x = _as_f32(x / _KETAMA_PER_DIGEST)
    x = _as_f32(x * _as_f32(live))
    return floor(x + 0.0000000001)


def build_ketama(
    names: Sequence[str], weights: Sequence[int], style: str = "ketama"
) -> tuple[list[int], list[int]]:
    """Build a ketama continuum: sorted point values and, aligned, the owning index into ``names``.

    ``names`` come from :func:`ketama_name` with the same ``style``. Node ``i`` contributes
    ``d_i`` (see :func:`_ketama_digests`) md5 digests of ``f"{name}-{j}"``
    (``j = 0 .. d_i - 1``), each giving four little-endian 32-bit points. Equal points are
    ordered by node index (the earlier name wins a lookup); libmemcached leaves that to qsort.
    """
    if not names:
        raise ValueError("ketama: no nodes")
    total = sum(weights)
    live = len(names)
    entries: list[tuple[int, int]] = []
    for index, (name, weight) in enumerate(zip(names, weights, strict=True)):
        for j in range(_ketama_digests(weight, total, live, style)):
            digest = md5(f"{name}-{j}".encode()).digest()
            for r in range(0, 16, 4):
                entries.append((int.from_bytes(digest[r : r + 4], "little"), index))
    entries.sort()
    return [value for value, _ in entries], [index for _, index in entries]
