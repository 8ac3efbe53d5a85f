"""Instruction counts of warm picks under callgrind: the pick ratios, immune to machine load.

Run: uv run python bench/bench_callgrind.py [--nodes 16] [--number 20000] [--json PATH]
[--only TEXT ...] (the rows whose label contains one of the TEXTs)

Wall-clock ratios (bench_pick.py) move with whatever else the machine runs; instructions
executed do not. For each statement, a child process runs it ``N`` and ``2 N`` times in a loop
under ``valgrind --tool=callgrind``; the difference of the two totals divided by ``N`` is the
instructions of one call, loop included, and start-up and warm-up cancel out. The ratio to a bare
Python function call taking the same arguments is the bar's unit (DESIGN §5b: round-robin,
random and weighted ≤ 4 ×, keyed ≤ 6 ×). Instructions are not nanoseconds (a cache miss costs
more than an add), but for these short, cache-resident paths the two ratios agree to within a
few tenths (docs/performance.md compares them). Needs ``valgrind``; takes about a minute.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import routed, write_json

import clustermap
from clustermap.model import Node, Service, SlowStart
from clustermap.region.layout import Meta
from clustermap.region.writer import RegionWriter
from clustermap.sidecar.feedback import FeedbackHub
from clustermap.sidecar.outlier import OutlierPolicy

CHILD = r"""
import itertools, sys
import clustermap
cm = clustermap.open(sys.argv[1])
pick, call = cm.pick, cm.call
def bare(service, key=None, strategy=None):
    return None
def bare_s(service, key=None, strategy=None, subset=None):
    return None
g = {"pick": pick, "call": call, "bare": bare, "bare_s": bare_s}
# timeit's own template: the statement inside a function, its names global (the same lookups
# as in bench_pick.py and in a request handler).
exec("def inner(_it):\n    for _i in _it:\n        %s\n" % sys.argv[3], g)
g["inner"](itertools.repeat(None, 2000))  # warm: first use builds pickers and tables
g["inner"](itertools.repeat(None, int(sys.argv[2])))
"""

#: (label, statement, baseline statement, bar as a multiple of the baseline)
ROWS = [
    ("pick(), round_robin", "pick('rr')", "bare('rr')", 4),
    ("pick(), weighted (smooth WRR)", "pick('weighted')", "bare('rr')", 4),
    ("pick(), random (service default)", "pick('random')", "bare('rr')", 4),
    (
        "pick(strategy='round_robin')",
        "pick('rr', strategy='round_robin')",
        "bare('rr', strategy='round_robin')",
        4,
    ),
    (
        "pick(strategy='random')",
        "pick('rr', strategy='random')",
        "bare('rr', strategy='random')",
        4,
    ),
    (
        "pick(strategy='weighted')",
        "pick('rr', strategy='weighted')",
        "bare('rr', strategy='weighted')",
        4,
    ),
    (
        "pick(strategy='weighted_random')",
        "pick('rr', strategy='weighted_random')",
        "bare('rr', strategy='weighted_random')",
        None,
    ),
    ("pick(key=...), Maglev", "pick('hash', 'user:42')", "bare('hash', 'user:42')", 6),
    (
        "pick(key=b...), Maglev, bytes key",
        "pick('hash', b'user:42')",
        "bare('hash', b'user:42')",
        6,
    ),
    (
        "pick(strategy='least_request')",
        "pick('rr', strategy='least_request')",
        "bare('rr', strategy='least_request')",
        10,
    ),
    (
        "with call(): pick, count in flight, record",
        "with call('rr'):\n            pass",
        "bare('rr')",
        15,
    ),
    # routing (docs/routing.md): the region records zone "a"
    (
        "pick(subset=...), round_robin",
        "pick('sub', subset={'version': 'v2'})",
        "bare_s('sub', subset={'version': 'v2'})",
        6,
    ),
    (
        "pick(key=..., subset=...), Maglev",
        "pick('sub', 'user:42', subset={'version': 'v2'})",
        "bare_s('sub', 'user:42', subset={'version': 'v2'})",
        6,
    ),
    ("pick(), round_robin in the local zone", "pick('zoned')", "bare('rr')", 4),
    (
        "pick(subset=...) in the local zone",
        "pick('zoned', subset={'version': 'v2'})",
        "bare_s('zoned', subset={'version': 'v2'})",
        6,
    ),
    # Slow start (docs/slow-start.md): a service with one node half-way through its ramp, and
    # one whose ramp is over.
    ("pick(), round_robin, a node in slow start", "pick('ramp')", "bare('rr')", 4),
    (
        "pick(strategy='weighted'), a node in slow start",
        "pick('ramp', strategy='weighted')",
        "bare('rr', strategy='weighted')",
        4,
    ),
    (
        "pick(strategy='least_request'), a node in slow start",
        "pick('ramp', strategy='least_request')",
        "bare('rr', strategy='least_request')",
        10,
    ),
    ("pick(), round_robin, slow start over", "pick('ramped')", "bare('rr')", 4),
]


def _ramp(count: int, started_s: int) -> SlowStart:
    """An hour's slow start of the last of ``count`` nodes, started ``started_s`` from now."""
    since = time.time_ns() + started_s * 1_000_000_000
    return SlowStart(3600 * 1_000_000_000, 1.0, 0.1, ((count - 1, since),))


def instructions(region: str, stmt: str, number: int) -> int:
    """Instructions callgrind counted for a child running ``stmt`` ``number`` times."""
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-c",
            CHILD,
            region,
            str(number),
            stmt,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
        # The child imports from its current directory first: one nobody else writes to, or a
        # listing that changes between the N and the 2 N run (/tmp) changes the import cost
        # that the difference must cancel. It gets the parent's clustermap explicitly.
        cwd=os.path.dirname(region),
        env={
            **os.environ,
            "PYTHONHASHSEED": "0",  # str hashes, hence dict probes, repeat
            "PYTHONPATH": os.pathsep.join(
                filter(
                    None, [str(Path(clustermap.__file__).parents[1]), os.environ.get("PYTHONPATH")]
                )
            ),
        },
    )
    m = re.search(r"Collected : (\d+)", proc.stderr)
    if m is None:
        raise RuntimeError(f"no callgrind total in:\n{proc.stderr[-2000:]}")
    return int(m.group(1))


def per_call(region: str, stmt: str, number: int) -> float:
    return (instructions(region, stmt, 2 * number) - instructions(region, stmt, number)) / number


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--number", type=int, default=20_000)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--only", nargs="+", help="only the rows whose label contains one of these")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("bench_callgrind: valgrind is not installed (apt-get install valgrind)")
    tmp = Path(tempfile.mkdtemp(prefix="cm-bench-", dir="/dev/shm"))
    try:
        region = str(tmp / "r.region")
        nodes = tuple(Node(f"10.0.0.{i}", 8080, weight=1 + i % 3) for i in range(args.nodes))
        # With the feedback files, as a sidecar makes them: least_request reads machine-wide
        # loads and call() counts in flight (docs/feedback.md).
        hub = FeedbackHub(
            region,
            rows=8,
            entries=64,
            capacity=1024,
            mode=0o660,
            group=None,
            policy=OutlierPolicy(),
        )
        services = [
            Service("rr", nodes),
            Service("weighted", nodes, strategy="weighted"),
            Service("random", nodes, strategy="random"),
            Service("hash", nodes, strategy="consistent_hash"),
            *routed(nodes),
            # The last node half-way through an hour's ramp; and a ramp an hour over.
            Service("ramp", nodes, slow_start=_ramp(len(nodes), -1800)),
            Service("ramped", nodes, slow_start=_ramp(len(nodes), -7200)),
        ]
        with RegionWriter(region) as w:
            w.publish([hub.decorate(s) for s in services], meta=Meta(zone="a"))
        cache: dict[str, float] = {}

        def cost(stmt: str) -> float:
            if stmt not in cache:
                cache[stmt] = per_call(region, stmt, args.number)
            return cache[stmt]

        print(f"instructions per call (callgrind), {args.nodes} nodes per service")
        print(f"{'what':40} {'instr':>8} {'baseline':>9} {'x bare':>7}  bar")
        table = []
        for label, stmt, baseline, bar in ROWS:
            if args.only and not any(text in label for text in args.only):
                continue
            ir, base = cost(stmt), cost(baseline)
            ratio = ir / base
            print(f"{label:40} {ir:8.0f} {base:9.0f} {ratio:7.2f}  {f'{bar}x' if bar else ''}")
            table.append(
                {
                    "label": label,
                    "stmt": stmt,
                    "instructions": ir,
                    "baseline": baseline,
                    "baseline_instructions": base,
                    "x_bare": ratio,
                    "bar": bar,
                }
            )
        write_json(args.json, {"nodes": args.nodes, "pid": os.getpid(), "rows": table})
        hub.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
