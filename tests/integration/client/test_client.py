"""The worker-side client against real regions and real forked, threaded and greenlet workers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import clustermap
from clustermap import ClusterMap, NoAvailableNode, RegionUnavailable, UnknownService
from clustermap.model import Node, Service
from clustermap.region.writer import RegionWriter
from tests.support.procs import ROOT, python_env

NODES = tuple(Node(f"10.0.0.{i}", 8080, weight=1 + i % 3) for i in range(16))


def publish(path: Path, *services: Service, removals: tuple[str, ...] = ()) -> None:
    with RegionWriter(path, wait=5.0) as w:  # as a sidecar does: a map synced from a server
        w.publish(services, removals, sync_ns=time.time_ns())


def test_pick_follows_the_map_without_reopening(region_path: Path) -> None:
    publish(region_path, Service("a", NODES[:2]))
    cm = clustermap.open(region_path)
    assert {cm.pick("a").address for _ in range(4)} == {"10.0.0.0:8080", "10.0.0.1:8080"}
    publish(region_path, Service("a", (Node("10.9.9.9", 1),)))
    assert cm.pick("a").address == "10.9.9.9:1"
    assert cm.nodes("a") == (Node("10.9.9.9", 1),)
    publish(region_path, removals=("a",))
    with pytest.raises(UnknownService, match="'a'"):
        cm.pick("a")


def test_only_changed_services_are_decoded_again(region_path: Path) -> None:
    publish(region_path, Service("a", NODES), Service("b", NODES))
    cm = clustermap.open(region_path)
    pa, pb = cm.picker("a"), cm.picker("b")
    publish(region_path, Service("b", NODES[:3]))
    assert cm.picker("a") is pa  # one version load said "unchanged": no read, no decode
    assert cm.picker("b") is not pb
    assert len(cm.picker("b").nodes) == 3


def test_unchanged_services_stay_warm_across_a_region_replacement(region_path: Path) -> None:
    publish(region_path, Service("a", NODES))
    cm = clustermap.open(region_path)
    pa = cm.picker("a")
    size = cm.reader.file_size
    many = [Service(f"s{i}", NODES) for i in range(300)]  # forces a larger file
    publish(region_path, *many)
    assert cm.picker("a") is pa
    assert cm.reader.file_size > size
    assert cm.pick("s299").address.startswith("10.0.0.")


def test_health_and_errors(region_path: Path) -> None:
    drained = tuple(Node(n.host, n.port, status="drain") for n in NODES[:3])
    publish(region_path, Service("d", drained), Service("z", (Node("h", 1, weight=0),)))
    cm = clustermap.open(region_path)
    with pytest.raises(NoAvailableNode, match="d"):
        cm.pick("d")
    with pytest.raises(NoAvailableNode):
        cm.pick("z")
    assert cm.nodes("d") == ()
    with pytest.raises(UnknownService):
        cm.pick("nope")
    with pytest.raises(RegionUnavailable, match="no region"):
        clustermap.open(region_path.with_name("missing.region"))


def test_weighted_and_hash_picks_follow_the_strategy(region_path: Path) -> None:
    svc = Service("w", (Node("a", 1, 5), Node("b", 1, 1), Node("c", 1, 1)), strategy="weighted")
    publish(region_path, svc)
    cm = clustermap.open(region_path)
    counts = Counter(cm.pick("w").host for _ in range(700))
    assert counts == {"a": 500, "b": 100, "c": 100}
    assert len({cm.pick("w", "user:1").address for _ in range(50)}) == 1


DEFAULT_MAP = """
import clustermap, sys
try:
    clustermap.pick("a")
except clustermap.RegionUnavailable as exc:
    print("unavailable", exc)
sys.stdout.flush()
sys.stdin.readline()  # the test publishes the region, then lets us go on
print("picked", clustermap.pick("a").address)
"""


def test_default_map_waits_for_the_region_then_works(region_path: Path) -> None:
    env = python_env(CLUSTERMAP_REGION=str(region_path))
    with subprocess.Popen(
        [sys.executable, "-c", DEFAULT_MAP],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().startswith("unavailable")
        publish(region_path, Service("a", (Node("10.1.1.1", 80),)))
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "picked 10.1.1.1:80"
        assert proc.wait(10) == 0


def test_forked_children_do_not_all_start_on_the_same_node(region_path: Path) -> None:
    publish(region_path, Service("a", NODES), Service("b", NODES))
    cm = clustermap.open(region_path)
    cm.pick("a")  # warm before the fork, as a preloaded app might
    cm.pick("b")
    pa = cm.picker("a")
    firsts = []
    for _ in range(8):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report the first pick and whether "a" stayed warm
            os.close(r)
            node = cm.pick("a").address
            os.write(w, f"{node} {cm.picker('a') is pa}".encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            firsts.append(f.read().split())
        os.waitpid(pid, 0)
    assert all(warm == "True" for _, warm in firsts)  # no re-read or decode after fork
    assert len({node for node, _ in firsts}) > 1, firsts


def test_concurrent_threads_pick_correctly_while_the_map_changes(region_path: Path) -> None:
    publish(region_path, Service("a", NODES))
    cm = clustermap.open(region_path)
    errors: list[BaseException] = []
    valid = {n.address for n in NODES} | {"10.5.5.5:1"}
    stop = threading.Event()

    def worker() -> None:
        try:
            while not stop.is_set():
                for strategy in ("round_robin", "random", "weighted"):
                    assert cm.pick("a", strategy=strategy).address in valid
                assert cm.pick("a", "key").address in valid
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    with RegionWriter(region_path) as w:
        for i in range(200):
            w.publish([Service("a", (*NODES[: 1 + i % 16], Node("10.5.5.5", 1)))])
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


GEVENT = """
from gevent import monkey; monkey.patch_all()
import gevent, sys, clustermap
cm = clustermap.open(sys.argv[1])
seen = []
def worker():
    for _ in range(500):
        seen.append(cm.pick("a").address)
        gevent.sleep(0)
gevent.joinall([gevent.spawn(worker) for _ in range(50)], raise_error=True)
print(len(seen), len(set(seen)))
"""


def test_greenlets_pick_correctly(region_path: Path) -> None:
    publish(region_path, Service("a", NODES))
    out = subprocess.run(
        [sys.executable, "-c", GEVENT, str(region_path)],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["25000", "16"]


def test_default_strategy_comes_from_the_map(region_path: Path) -> None:
    publish(region_path, Service("w", (Node("a", 1, 3), Node("b", 1, 1)), strategy="weighted"))
    cm = ClusterMap(region_path)
    assert Counter(cm.pick("w").host for _ in range(400)) == {"a": 300, "b": 100}


def test_forked_children_draw_their_own_random_picks(region_path: Path) -> None:
    """Random picks are drawn in batches: a batch drawn before the fork must not be served again
    in every child (the at-fork hook drops it and the reseeded generator draws anew)."""
    publish(region_path, Service("r", NODES, strategy="random"))
    cm = clustermap.open(region_path)
    cm.pick("r")  # the master holds a batch of draws, as a preloaded app's would
    cm.pick("r", strategy="least_request")  # and least_request's two streams of indices
    sequences, least = [], []
    for _ in range(6):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its first picks, default and explicit
            os.close(r)
            picks = [cm.pick("r").address for _ in range(6)]
            picks += [cm.pick("r", strategy="random").address for _ in range(6)]
            picks.append("|")
            picks += [cm.pick("r", strategy="least_request").address for _ in range(8)]
            os.write(w, " ".join(picks).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            drawn, lr = f.read().split("|")
            sequences.append(drawn)
            least.append(lr)
        os.waitpid(pid, 0)
    assert all(sequences)
    assert all(least)
    assert len(set(sequences)) == len(sequences), sequences
    assert len(set(least)) == len(least), least
