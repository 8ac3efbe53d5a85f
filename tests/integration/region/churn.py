"""Deterministic map content for fault tests, and a writer process to run in a child.

Every service's content is a pure function of (name, revision), so a reader can verify any
service it reads without talking to the writer: a torn or mixed read cannot pass the check.

Usage: python churn.py REGION MODE [ARGS]
  churn N                 publish forever, N services, a random subset per update; prints
                          "ready" then one "pub GEN" line per update
  die-at POINT            publish one fixed update (see ``update``) and SIGKILL itself at POINT
  exit-locked HOW         hold the lock in a thread and leave by HOW: exit | raise | sigterm
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading

from clustermap.model import Node, Service
from clustermap.region.layout import Meta
from clustermap.region.writer import RegionWriter


def service(name: str, revision: int) -> Service:
    n = 1 + (revision * 7 + len(name)) % 9
    nodes = tuple(
        Node(
            f"10.{revision % 256}.{i}.{len(name)}",
            1000 + (revision + i) % 60000,
            weight=1 + (revision + i) % 5,
            status=("up", "down", "drain")[(revision + i) % 3],
            meta={"rev": str(revision), "svc": name},
        )
        for i in range(n)
    )
    return Service(name, nodes, revision=revision, meta={"rev": str(revision)})


def verify(svc: Service) -> None:
    """Raise AssertionError unless ``svc`` is exactly what ``service`` gives for its revision."""
    expected = service(svc.name, svc.revision)
    if svc != expected:
        raise AssertionError(f"torn or mixed service {svc.name} r{svc.revision}: {svc!r:.200}")


def base_map() -> list[Service]:
    return [service(f"svc-{i}", 1) for i in range(8)]


def update() -> tuple[list[Service], list[str]]:
    """The update die-at publishes: 5 changed, 1 new, 1 removed."""
    return [service(f"svc-{i}", 2) for i in range(5)] + [service("svc-new", 2)], ["svc-7"]


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    if mode == "churn":
        count = int(sys.argv[3])
        w = RegionWriter(path, wait=10.0)
        from clustermap.region.reader import RegionReader

        current = {n: s.revision for n, s in RegionReader(path).snapshot().services.items()}
        rev = max(current.values(), default=0)
        print("ready", flush=True)
        while True:
            rev += 1
            names = random.sample([f"svc-{i}" for i in range(count)], k=random.randint(1, count))
            w.publish([service(n, rev) for n in names], meta=Meta(revision=rev))
            print("pub", w.generation, flush=True)
    elif mode == "die-at":
        point = sys.argv[3]

        def checkpoint(name: str) -> None:
            if name == point:
                os.kill(os.getpid(), signal.SIGKILL)

        w = RegionWriter(path, checkpoint=checkpoint)
        print("ready", flush=True)
        ups, rms = update()
        w.publish(ups, rms, meta=Meta(revision=2))
        print("survived", flush=True)
    elif mode == "exit-locked":
        how = sys.argv[3]
        locked = threading.Event()

        def hold(name: str) -> None:
            if name == "locked":
                locked.set()
                threading.Event().wait()  # hold the mutex until the process goes away

        w = RegionWriter(path, checkpoint=hold)
        t = threading.Thread(target=w.publish, args=([service("held", 9)],), daemon=True)
        t.start()
        locked.wait()
        print("locked", flush=True)
        if how == "exit":
            sys.exit(3)
        elif how == "raise":
            raise RuntimeError("uncaught while another thread holds the region lock")
        elif how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait()
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
