"""Hash quality: balance and disruption of Maglev (the default) against ketama, exactly.

Run: uv run python bench/bench_hash.py [--max-add 32] [--json PATH]

Nothing is sampled: both are computed over the whole key space, since keys hash uniformly onto
it. Balance is the largest node's share over the mean share (1.0 is perfect): for Maglev from the
65 537-slot table, for ketama from the arcs of its 160-points-per-node continuum (the ring
uhashring and libketama build). Disruption is the share of the key space whose node changes when
one node is added to N equal nodes; the ideal is 1/(N+1) (only the keys the new node takes).
"""

from __future__ import annotations

import argparse
from bisect import bisect_left
from collections import Counter

from common import machine, write_json

from clustermap.balance import MAGLEV_TABLE_SIZE, build_ketama, build_maglev

M = MAGLEV_TABLE_SIZE
SPACE = 2**32  # ketama points and key hashes are 32-bit


def pool(n: int) -> list[str]:
    """``n`` node names, in the order an operator would add them."""
    return [f"10.0.{i // 250}.{i % 250 + 1}:8080" for i in range(n)]


def maglev_owners(names: list[str]) -> list[str]:
    ordered = sorted(names)
    return [ordered[i] for i in build_maglev(ordered, [1] * len(ordered))]


def maglev_balance(n: int) -> float:
    counts = Counter(build_maglev(sorted(pool(n)), [1] * n))
    return max(counts.values()) / (M / n)


def maglev_moved(n: int) -> float:
    before, after = maglev_owners(pool(n)), maglev_owners(pool(n + 1))
    return sum(a != b for a, b in zip(before, after, strict=True)) / M


def ketama_ring(names: list[str]) -> tuple[list[int], list[str]]:
    ordered = sorted(names)
    points, owners = build_ketama(ordered, [1] * len(ordered))
    return points, [ordered[i] for i in owners]


def ketama_owner(ring: tuple[list[int], list[str]], h: int) -> str:
    """libketama's rule: the first point >= h, wrapping to the first point."""
    points, owners = ring
    i = bisect_left(points, h)
    return owners[i if i < len(points) else 0]


def ketama_balance(n: int) -> float:
    points, owners = ketama_ring(pool(n))
    share: Counter[str] = Counter()
    prev = points[-1] - SPACE  # the first point also owns the wrap-around arc
    for p, o in zip(points, owners, strict=True):
        share[o] += p - prev
        prev = p
    return max(share.values()) / (SPACE / n)


def ketama_moved(n: int) -> float:
    before, after = ketama_ring(pool(n)), ketama_ring(pool(n + 1))
    cuts = sorted(set(before[0]) | set(after[0]) | {SPACE - 1})
    moved, prev = 0, -1
    for b in cuts:  # every key in (prev, b] has the same node as key b, in both rings
        if ketama_owner(before, b) != ketama_owner(after, b):
            moved += b - prev
        prev = b
    return moved / SPACE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-add", type=int, default=32, help="largest N for the disruption curve")
    ap.add_argument("--balance-sizes", default="2,3,5,8,10,16,20,32,50,64,100,200,500")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    balance = []
    print(f"{'nodes':>6} {'maglev max/mean':>16} {'ketama max/mean':>16}")
    for n in (int(x) for x in args.balance_sizes.split(",")):
        row = {"nodes": n, "maglev": maglev_balance(n), "ketama": ketama_balance(n)}
        balance.append(row)
        print(f"{n:6} {row['maglev']:16.4f} {row['ketama']:16.4f}")
    moved = []
    print(f"\n{'N -> N+1':>9} {'ideal':>7} {'maglev':>7} {'ketama':>7}")
    for n in [*range(1, min(args.max_add, 16) + 1), *range(20, args.max_add + 1, 4), 50, 100]:
        if n > args.max_add and n not in (50, 100):
            continue
        row = {
            "nodes": n,
            "ideal": 1 / (n + 1),
            "maglev": maglev_moved(n),
            "ketama": ketama_moved(n),
        }
        moved.append(row)
        print(
            f"{n:4} -> {n + 1:<3} {row['ideal']:7.4f} {row['maglev']:7.4f} {row['ketama']:7.4f}"
            f"   ({row['maglev'] / row['ideal']:.2f}x / {row['ketama'] / row['ideal']:.2f}x ideal)"
        )
    write_json(args.json, {"balance": balance, "moved": moved})


if __name__ == "__main__":
    main()
