"""Registration and polls on cm-servers of two source trees, alternated in one run.

Wall-clock throughput on a shared machine drifts with the load of the moment, so comparing two
versions means running them alternately (A B B A A B ...) within one sitting. This bench takes
the cm-server of each given tree (its ``.venv/bin/cm-server``: run ``uv sync`` there first),
starts a fresh one per round and store on one shared 3-member etcd cluster (a key prefix per
run) or in memory, and drives it from ``--threads`` client threads (one channel each) for
``--duration`` seconds per scenario, as bench_etcd.py does (100 services × 10 nodes preloaded):

* ``register``: new nodes without TTL into 10 services, as fast as possible;
* ``register_1``: the same from one client thread (a single client's latency);
* ``poll_not_modified``: a current subscriber, no Watch stream open.

Besides requests/s and p50, each scenario reports the server's CPU time per request (user +
system, from /proc/PID/stat), the figure least distorted by other load.

    git worktree add --detach /tmp/cm-base 9795726 && (cd /tmp/cm-base && uv sync --locked)
    uv run python bench/bench_register.py --tree before=/tmp/cm-base --tree after=. \\
        [--rounds 3] [--stores memory,etcd] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from common import machine, write_json  # noqa: E402
from drive import drive, new_nodes, polls, preload  # noqa: E402

from clustermap import wire  # noqa: E402
from clustermap._pb.clustermap.v1 import (  # noqa: E402
    registry_pb2_grpc,
    subscription_pb2_grpc,
)
from tests.integration.etcd.harness import EtcdCluster, start_cluster  # noqa: E402
from tests.support.procs import Child, python_env, wait_for  # noqa: E402
from tests.support.stack import listening_address  # noqa: E402

SCENARIOS = ("register", "register_1", "poll_not_modified")


class Server:
    """One cm-server of ``tree`` on a free port."""

    def __init__(self, tree: Path, store: str) -> None:
        exe = tree / ".venv" / "bin" / "cm-server"
        argv = [str(exe), "--listen", "127.0.0.1:0", "--warmup", "0", "--heartbeat-ttl", "10"]
        env = {k: v for k, v in python_env().items() if k != "PYTHONPATH"}  # the tree's own code
        self.child = Child([*argv, "--store", store], env=env)

        def listening() -> str | None:
            if self.child.proc.poll() is not None:
                raise AssertionError(f"cm-server exited: {self.child.stderr()}")
            return listening_address(self.child.stderr())

        self.address = wait_for(listening, 60, "cm-server to listen")
        self.channel = grpc.insecure_channel(self.address)
        self.registry = registry_pb2_grpc.RegistryStub(self.channel)
        self.pid = self.child.pid

    def close(self) -> None:
        self.channel.close()
        self.child.close()


def scenarios(server: Server, threads: int, duration: float, which: list[str]) -> dict[str, dict]:
    preload(server.registry)
    register = new_nodes()
    out = {}
    if "register" in which:
        out["register"] = drive(server.address, threads, duration, register, server.pid)
    if "register_1" in which:
        out["register_1"] = drive(server.address, 1, duration, register, server.pid)
    if "poll_not_modified" not in which:
        return out
    probe = subscription_pb2_grpc.SubscriptionStub(server.channel)
    cur = wire.poll_answer_from_pb(probe.Poll(wire.poll_request(), timeout=10))

    out["poll_not_modified"] = drive(
        server.address, threads, duration, polls(cur.epoch, cur.revision), server.pid
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--stores", default="memory,etcd")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--json")
    a = p.parse_args()
    trees = [(n, Path(t).resolve()) for n, _, t in (x.partition("=") for x in a.tree)]
    trees = trees or [("this", ROOT)]
    stores = a.stores.split(",")
    cluster: EtcdCluster | None = start_cluster(3) if "etcd" in stores else None
    runs: dict[str, dict[str, list[dict]]] = {}  # "store tree" -> scenario -> runs
    n = 0
    try:
        for r in range(a.rounds):
            order = trees if r % 2 == 0 else trees[::-1]
            for name, tree in order:
                for store in stores:
                    n += 1
                    url = "memory" if store == "memory" else cluster.url(f"bench{n}")  # type: ignore[union-attr]
                    server = Server(tree, url)
                    try:
                        res = scenarios(server, a.threads, a.duration, a.scenarios.split(","))
                    finally:
                        server.close()
                    row = runs.setdefault(f"{store} {name}", {})
                    for scen, fig in res.items():
                        row.setdefault(scen, []).append(fig)
                    print(f"round {r + 1} {store:<6} {name:<8} " + "  ".join(
                        f"{s} {f['per_s']}/s p50 {f['p50_ms']} ms {f['cpu_us']} µs"
                        for s, f in res.items()
                    ), flush=True)  # fmt: skip
    finally:
        if cluster is not None:
            cluster.close()
    print(f"\n{machine()}; {a.threads} client threads, {a.duration:g} s per scenario, "
          f"{a.rounds} rounds alternated; medians (each run in brackets)")  # fmt: skip
    for scen in a.scenarios.split(","):
        print(f"\n{scen}")
        for key, row in runs.items():
            figs = row[scen]
            med = {k: statistics.median(f[k] for f in figs) for k in ("per_s", "p50_ms", "cpu_us")}
            each = ", ".join(str(f["per_s"]) for f in figs)
            print(
                f"  {key:<18} {med['per_s']:>7.0f}/s ({each})  p50 {med['p50_ms']:.1f} ms"
                f"  server CPU {med['cpu_us']:.0f} µs/request"
            )
    write_json(a.json, {"runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
