"""A real cm-sidecar publishes the Maglev table of a hashed service once; worker processes find
it after a real change on the server, all the same, equal to docs/hashing.md, and build none."""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.request
from array import array
from pathlib import Path

import clustermap
from clustermap.model import Service
from clustermap.region.reader import RegionReader
from clustermap.region.tables import MAX_SUBSET_TABLES
from tests.support.procs import Child, wait_for
from tests.support.stack import CMCTL, ServerProc, SidecarProc, free_port
from tests.unit.test_balance_docs import VECTORS

# Both workers' start: for each node count given, in turn, wait until the service has it (the
# body of the loop follows in each worker).
_AWAIT_EACH_COUNT = r"""
import hashlib, json, sys, time
from array import array
import clustermap
cm = clustermap.open(sys.argv[1])
keys = json.loads(sys.argv[3])
for count in map(int, sys.argv[2].split(",")):
    deadline = time.monotonic() + 60
    while len(cm.service("cache-svc").nodes) != count:
        if time.monotonic() > deadline:
            sys.exit(f"never saw {count} nodes")
        time.sleep(0.005)
"""

# A worker: waits until the service has each expected node count in turn, then makes its first
# keyed picks of that version and reports what its picker used.
WORKER = (
    _AWAIT_EACH_COUNT
    + r"""    picks = [cm.pick("cache-svc", k).address for k in keys]
    picker = cm.picker("cache-svc")
    table = picker.maglev
    print(json.dumps({
        "nodes": count,
        "picks": picks,
        "shared": picker.maglev_shared,
        "region_view": isinstance(table, memoryview) and type(table.obj).__name__ == "mmap",
        "sha256": hashlib.sha256(array("I", table).tobytes()).hexdigest(),
    }), flush=True)
"""
)


def test_sidecar_table_after_a_change_is_shared_identical_and_documented(
    region_dir: Path,
) -> None:
    clusters = region_dir / "clusters.toml"
    clusters.write_text('[clusters.cache-svc]\nstrategy = "consistent_hash"\n')
    region = region_dir / "test.region"
    rows = VECTORS["maglev-a"]
    names = [r[0] for r in rows]
    keys = [json.loads(r[0]) for r in VECTORS["maglev-keys"]]
    documented = [r[2] for r in VECTORS["maglev-keys"]]
    table_sha = dict(VECTORS["maglev-a-table"])["sha256(table as u32 little-endian)"]
    server = ServerProc("--clusters", str(clusters))
    sidecar = None
    workers: list[Child] = []
    try:
        for name in names[:-1]:  # set A without its last node
            host, _, port = name.rpartition(":")
            server.register("cache-svc", host.strip("[]"), int(port))
        sidecar = SidecarProc(region, [server.address])
        sidecar.wait_synced()
        workers = [
            Child.python(
                "-c", WORKER, str(region), f"{len(names) - 1},{len(names)}", json.dumps(keys)
            )
            for _ in range(3)
        ]
        before = [json.loads(w.readline(timeout=60)) for w in workers]
        assert all(r["shared"] and r["region_view"] for r in before), before
        assert len({r["sha256"] for r in before}) == 1
        # The change: set A's last node registers; every worker's first keyed picks of the new
        # version use the table the sidecar published with it.
        host, _, port = names[-1].rpartition(":")
        server.register("cache-svc", host.strip("[]"), int(port))
        after = [json.loads(w.readline(timeout=60)) for w in workers]
        for r in after:
            assert r["nodes"] == len(names)
            assert r["shared"], r  # no worker built a table: it came from the region
            assert r["region_view"], r
            assert r["sha256"] == table_sha  # equals docs/hashing.md, in every process
            assert r["picks"] == documented
        cm = clustermap.open(region)
        wait_for(lambda: len(cm.service("cache-svc").nodes) == len(names))
        assert [cm.pick("cache-svc", k).address for k in keys] == documented
        for w in workers:
            assert w.wait(timeout=30) == 0, w.stderr()
    finally:
        for w in workers:
            w.close()
        if sidecar is not None:
            sidecar.close()
        server.close()


# A worker: waits for each expected node count in turn, then makes its first keyed picks of that
# version inside each subset and reports whether its picker used a table from the region.
SUBSET_WORKER = (
    _AWAIT_EACH_COUNT
    + r"""    out = {"nodes": count}
    for version in ("v1", "v2"):
        subset = {"version": version}
        picks = [cm.pick("cache-svc", k, subset=subset).address for k in keys]
        picker = cm.picker("cache-svc", subset)
        out[version] = {
            "picks": picks,
            "shared": picker.maglev_shared,
            "sha256": hashlib.sha256(array("I", picker.maglev).tobytes()).hexdigest(),
        }
    print(json.dumps(out), flush=True)
"""
)


def test_sidecar_subset_tables_after_a_change_are_shared_and_equal_a_workers_own(
    region_dir: Path,
) -> None:
    """The subsets a hashed service declares (meta subset_keys) get their tables from the real
    sidecar with each real change: no worker builds one, and each equals a local build."""
    clusters = region_dir / "clusters.toml"
    clusters.write_text(
        '[clusters.cache-svc]\nstrategy = "consistent_hash"\n'
        '[clusters.cache-svc.meta]\nsubset_keys = "version"\n'
    )
    region = region_dir / "test.region"
    keys = [f"user:{i}" for i in range(64)]
    server = ServerProc("--clusters", str(clusters))
    sidecar = None
    workers: list[Child] = []
    try:
        for i in range(8):
            server.register("cache-svc", f"10.9.0.{i}", 80, version=f"v{1 + i % 2}")
        sidecar = SidecarProc(region, [server.address])
        sidecar.wait_synced()
        workers = [
            Child.python("-c", SUBSET_WORKER, str(region), "8,9", json.dumps(keys))
            for _ in range(2)
        ]
        before = [json.loads(w.readline(timeout=60)) for w in workers]
        for r in before:
            assert r["v1"]["shared"], r
            assert r["v2"]["shared"], r
        server.register("cache-svc", "10.9.0.8", 80, version="v2")  # the change
        after = [json.loads(w.readline(timeout=60)) for w in workers]
        cm = clustermap.open(region)
        wait_for(lambda: len(cm.service("cache-svc").nodes) == 9)
        for version in ("v1", "v2"):
            subset = {"version": version}
            nodes = [n for n in cm.service("cache-svc").nodes if n.meta["version"] == version]
            local = clustermap.balance.ServicePicker(Service("cache-svc", tuple(nodes)))
            want = [local.pick(key=k).address for k in keys]
            sha = hashlib.sha256(array("I", local.maglev or ()).tobytes()).hexdigest()
            for r in after:
                assert r["nodes"] == 9
                assert r[version]["shared"], r  # the first keyed pick of the new version
                assert r[version]["picks"] == want
                assert r[version]["sha256"] == sha  # equals the worker's own build
            assert {cm.pick("cache-svc", k, subset=subset).meta["version"] for k in keys} == {
                version
            }
        for w in workers:
            assert w.wait(timeout=30) == 0, w.stderr()
    finally:
        for w in workers:
            w.close()
        if sidecar is not None:
            sidecar.close()
        server.close()


def _cmctl(region: Path, *args: str) -> str:
    return subprocess.run(
        [CMCTL, "--region", str(region), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def _metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def test_cmctl_status_shows_services_whose_subset_tables_are_capped(region_dir: Path) -> None:
    """A service declaring more subsets than get a table is counted in ``cmctl status`` (text and
    --json) and on /metrics, not only in a log line; the count clears when it is under again."""
    clusters = region_dir / "clusters.toml"
    clusters.write_text(
        '[clusters.cache-svc]\nstrategy = "consistent_hash"\n'
        '[clusters.cache-svc.meta]\nsubset_keys = "shard"\n'
    )
    region = region_dir / "test.region"
    shards = MAX_SUBSET_TABLES + 2  # one subset per node: two over the per-service limit
    server = ServerProc("--clusters", str(clusters))
    sidecar = None
    try:
        for i in range(shards):
            server.register("cache-svc", f"10.9.1.{i}", 80, shard=f"s{i:02d}")
        port = free_port()
        sidecar = SidecarProc(region, [server.address], "--metrics", f"127.0.0.1:{port}")
        shown = sidecar

        def capped() -> int | None:
            m = shown.meta()
            return None if m is None else m.tables_capped

        wait_for(lambda: capped() == 1, what="the capped count in the region")
        st = json.loads(_cmctl(region, "status", "--json"))
        assert st["subset_tables_capped"] == 1
        assert "subset_tables_capped" not in st["counters"]  # a count of now, not a running total
        text = _cmctl(region, "status")
        rows = dict(line.split(None, 1) for line in text.splitlines() if line.strip())
        assert rows["capped"].startswith("1 services: some subset tables over a limit"), text
        assert "subset_tables_capped" not in text
        assert _metric(port, "clustermap_sidecar_subset_tables_capped") == 1
        # a restarted sidecar carries on from the region, tables included, and still counts it
        sidecar.close()
        sidecar = shown = SidecarProc(region, [server.address], "--metrics", f"127.0.0.1:{port}")
        server.register("other-svc", "10.9.2.1", 80)  # published by the new sidecar, with its meta
        wait_for(lambda: "other-svc" in RegionReader(region).snapshot().services)
        assert capped() == 1
        assert _metric(port, "clustermap_sidecar_subset_tables_capped") == 1
        for i in range(MAX_SUBSET_TABLES, shards):  # back to the limit: every subset has a table
            server.deregister("cache-svc", f"10.9.1.{i}", 80)
        wait_for(lambda: capped() == 0, what="the capped count to clear")
        assert json.loads(_cmctl(region, "status", "--json"))["subset_tables_capped"] == 0
        assert _metric(port, "clustermap_sidecar_subset_tables_capped") == 0
    finally:
        if sidecar is not None:
            sidecar.close()
        server.close()
