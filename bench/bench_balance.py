"""Benchmark the balance layer against a bare function call measured in the same run.

    uv run python bench/bench_balance.py [--quick] [--json PATH]

DESIGN §5 bars: a warm round-robin/random/weighted pick <= 5x a bare call, a consistent-hash pick
<= 8x. uhashring's get_node is shown for comparison (it is what users would reach for), as are
the one-off build costs a worker pays once per service version. Medians of repeated timeit runs;
no assertions, the numbers are for people.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from collections.abc import Callable

from common import write_json
from uhashring import HashRing

from clustermap.balance import ServicePicker, build_ketama, build_maglev, smooth_wrr
from clustermap.model import Node, Service


def bare() -> None:
    return None


def per_op_ns(stmt: str, env: dict[str, object], number: int, repeat: int) -> float:
    """Median ns per execution of ``stmt``; a string statement, so no wrapper call is counted."""
    runs = timeit.Timer(stmt, globals=env).repeat(repeat=repeat, number=number)
    return statistics.median(runs) / number * 1e9


def once_ms(fn: Callable[..., object], *args: object, repeat: int) -> float:
    """Median wall time of one call, in ms (builds are too slow for timeit's loops)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn(*args)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6


def nodes(n: int, weighted: bool) -> tuple[Node, ...]:
    return tuple(
        Node(f"10.0.{i // 250}.{i % 250 + 1}", 8080, weight=(1 + i % 5) if weighted else 1)
        for i in range(n)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    number, repeat = (20_000, 3) if args.quick else (200_000, 9)

    base = per_op_ns("bare()", {"bare": bare}, number, repeat)
    print(f"python {sys.version.split()[0]}; medians of {repeat} x {number} calls")
    print(f"{'baseline: bare function call':44} {base:8.1f} ns   1.00x")

    key = "user:12345"
    out: dict[str, object] = {"bare_ns": base, "picks": [], "builds_ms": []}
    for n in (16, 100):
        service = Service("bench", nodes(n, weighted=True))
        picker = ServicePicker(service)
        ketama = ServicePicker(Service("bench", service.nodes, meta={"hash": "ketama"}))
        wpicker = ServicePicker(Service("bench", service.nodes, strategy="weighted"))
        rpicker = ServicePicker(Service("bench", service.nodes, strategy="random"))
        for warm in (picker, wpicker):
            warm.pick(strategy="weighted")
            warm.pick(key=key)
        ketama.pick(key=key)
        ring_md5 = HashRing(nodes=[n.address for n in picker.nodes])
        ring_ketama = HashRing(nodes=[n.address for n in picker.nodes], hash_fn="ketama")
        env: dict[str, object] = {
            "picker": picker,
            "wpicker": wpicker,
            "rpicker": rpicker,
            "ketama": ketama,
            "ring_md5": ring_md5,
            "ring_ketama": ring_ketama,
            "key": key,
        }
        rows = [
            ("pick()  [default round_robin]", "5x", "picker.pick()"),
            ("pick(strategy='round_robin')", "5x", "picker.pick(strategy='round_robin')"),
            ("round_robin()", "5x", "picker.round_robin()"),
            ("pick(strategy='random')", "5x", "picker.pick(strategy='random')"),
            ("random()", "5x", "picker.random()"),
            ("pick()  [default random]", "5x", "rpicker.pick()"),
            ("pick()  [default weighted]", "5x", "wpicker.pick()"),
            ("pick(strategy='weighted')", "5x", "picker.pick(strategy='weighted')"),
            ("weighted()", "5x", "picker.weighted()"),
            ("weighted_random()", "5x", "picker.weighted_random()"),
            ("pick(key=...)  [maglev]", "8x", "picker.pick(key=key)"),
            ("consistent_hash(key)  [maglev]", "8x", "picker.consistent_hash(key)"),
            ("pick(key=...)  [ketama, compat]", "-", "ketama.pick(key=key)"),
            ("uhashring get_node (md5 ring)", "-", "ring_md5.get_node(key)"),
            ("uhashring get_node (ketama)", "-", "ring_ketama.get_node(key)"),
        ]
        print(f"\n{n} nodes (weights 1..5)                        ns/op   ratio  bar")
        for label, bar, stmt in rows:
            ns = per_op_ns(stmt, env, number, repeat)
            print(f"  {label:42} {ns:8.1f}   {ns / base:5.2f}x  {bar}")
            out["picks"].append(  # type: ignore[attr-defined]
                {"nodes": n, "label": label, "ns": ns, "x_bare": ns / base, "bar": bar}
            )

    print("\nbuilds (once per service version per process), median ms")
    build_repeat = 3 if args.quick else 5
    for n in (10, 100, 1000):
        equal = nodes(n, weighted=False)
        names = sorted(x.address for x in equal)
        weighted = [1 + i % 5 for i in range(n)]
        equal_weights = [1] * n
        maglev_eq = once_ms(build_maglev, names, equal_weights, repeat=build_repeat)
        maglev_w = once_ms(build_maglev, names, weighted, repeat=build_repeat)
        ketama_ms = once_ms(build_ketama, names, equal_weights, repeat=build_repeat)
        wrr_ms = once_ms(smooth_wrr, weighted, repeat=build_repeat)
        print(
            f"  {n:5} nodes: maglev {maglev_eq:6.1f} (equal) {maglev_w:6.1f} (weights 1..5)"
            f"   ketama ring {ketama_ms:6.1f}   wrr schedule {wrr_ms:6.1f}"
        )
        out["builds_ms"].append(  # type: ignore[attr-defined]
            {
                "nodes": n,
                "maglev_equal": maglev_eq,
                "maglev_weighted": maglev_w,
                "ketama": ketama_ms,
                "wrr": wrr_ms,
            }
        )
    write_json(args.json, out)


if __name__ == "__main__":
    main()
