"""Slow start with a real cm-server, a real cm-sidecar and worker processes: a node joins, and
every worker's share of picks for it rises over the window, on the clock the sidecar published
in the region (docs/slow-start.md). Shares are bucketed by time since the published join time,
never by the test's own sleeps, so a slow machine only thins the buckets."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

from tests.support.procs import Child
from tests.support.stack import ServerProc, SidecarProc

WINDOW_S = 6.0
BUCKETS = 6

# A worker: waits for the 4th node, then picks (round_robin, the service's default) until the
# ramp is over and one more second has passed, counting picks per bucket of time since the join
# time the region holds: buckets 0..BUCKETS-1 cover the window, bucket BUCKETS what follows.
WORKER = r"""
import json, sys, time
import clustermap
cm = clustermap.open(sys.argv[1])
new, buckets = sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
deadline = time.monotonic() + 120
while len(cm.service("web").nodes) != 4:
    if time.monotonic() > deadline:
        sys.exit("never saw the 4th node")
    time.sleep(0.002)
ramp = cm.service("web").slow_start
if ramp is None:
    sys.exit("no slow start in the region")
position = [n.address for n in cm.service("web").nodes].index(new)
since = dict(ramp.since)[position]
window = ramp.window_ns
total = [0] * (buckets + 1)
hits = [0] * (buckets + 1)
pick, now = cm.pick, time.time_ns
while True:
    for _ in range(64):
        t = now()
        k = min(buckets, max(0, (t - since) * buckets // window))
        total[k] += 1
        if pick("web").address == new:
            hits[k] += 1
    if now() > since + window + 1_000_000_000:
        break
    time.sleep(0.0005)
print(json.dumps({"total": total, "hits": hits, "window_ns": window}), flush=True)
"""


def test_a_joining_node_ramps_up_in_every_worker(region_dir: Path) -> None:
    clusters = region_dir / "clusters.toml"
    clusters.write_text(f'[clusters.web]\nmeta = {{ slow_start = "{WINDOW_S:g}s" }}\n')
    region = region_dir / "test.region"
    server = ServerProc("--clusters", str(clusters))
    sidecar = None
    workers: list[Child] = []
    try:
        for i in range(3):
            server.register("web", "127.0.0.1", 9001 + i)
        sidecar = SidecarProc(region, [server.address])
        sidecar.wait_synced()
        workers = [
            Child.python("-c", WORKER, str(region), "127.0.0.1:9009", str(BUCKETS))
            for _ in range(2)
        ]
        for w in workers:
            w.expect("ready", timeout=60)
        server.register("web", "127.0.0.1", 9009)  # the join
        results = [json.loads(w.readline(timeout=120)) for w in workers]
    finally:
        for w in workers:
            w.close()
        if sidecar is not None:
            sidecar.close()
        server.close()
    for r in results:
        assert r["window_ns"] == int(WINDOW_S * 1e9)
        shares = [(h / t if t >= 200 else None) for h, t in zip(r["hits"], r["total"], strict=True)]
        ramp = [s for s in shares[:BUCKETS] if s is not None]
        assert len(ramp) >= 3, f"too few picks in the ramp's buckets: {r}"
        # The shape: rising bucket over bucket (with slack for bucket edges and chunking), from
        # well below a full share (1/4 of 4 nodes) to about a full share after the window.
        for a, b in pairwise(ramp):
            assert b >= a - 0.03, f"share fell during the ramp: {shares}"
        assert ramp[0] < 0.6 * 0.25, shares
        assert ramp[-1] > ramp[0] + 0.05, shares
        after = shares[BUCKETS]
        assert after is not None, r
        assert 0.2 <= after <= 0.3, shares
