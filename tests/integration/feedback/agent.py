"""A worker process for the feedback tests, driven line by line on stdin.

Commands (one per line; each answers one line on stdout):

    report SERVICE ADDRESS ok|fail N     N results through clustermap.report -> "ok N"
    callfail SERVICE NAME N              N calls on the node with meta name=NAME, each raising
    hold SERVICE NAME N                  N calls entered on that node and left open -> "held N"
    release                              exit every held call -> "released N"
    http SERVICE N [STRATEGY]            N calls, each a real GET / on the picked node inside
                                         ``with call()`` (a 5xx raises: a failure)
                                         -> JSON {address: count}
    picks SERVICE STRATEGY N             N picks -> JSON {address: count}
    nodes SERVICE                        JSON list of clustermap.nodes(SERVICE)
    status                               feedback_status()
    forks N                              N children in turn, each makes a call and exits;
                                         -> JSON list of the children's feedback_status()
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections import Counter
from contextlib import ExitStack

import clustermap


def main() -> None:
    cm = clustermap.open(sys.argv[1])
    held = ExitStack()
    count = 0
    print("ready", os.getpid(), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "report":
            service, address, outcome, n = args
            node = next(x for x in cm.service(service).nodes if x.address == address)
            done = sum(cm.report(service, node, outcome == "ok", 0.001) for _ in range(int(n)))
            print("ok", done, flush=True)
        elif cmd == "callfail":
            service, name, n = args
            for _ in range(int(n)):
                try:
                    with cm.call(service, subset={"name": name}):
                        raise ConnectionRefusedError("backend down")
                except ConnectionRefusedError:
                    pass
            print("ok", n, flush=True)
        elif cmd == "hold":
            service, name, n = args
            for _ in range(int(n)):
                held.enter_context(cm.call(service, subset={"name": name}))
                count += 1
            print("held", count, flush=True)
        elif cmd == "release":
            held.close()
            print("released", count, flush=True)
            count = 0
        elif cmd == "http":
            service, n, *how = args
            got: Counter[str] = Counter()
            for _ in range(int(n)):
                try:
                    with cm.call(service, strategy=how[0] if how else None) as node:
                        got[node.address] += 1
                        urllib.request.urlopen(f"http://{node.address}/", timeout=10).read()
                except OSError:  # HTTPError (a 5xx) and refused connections: failures
                    pass
            print(json.dumps(got), flush=True)
        elif cmd == "picks":
            service, strategy, n = args
            picks = Counter(cm.pick(service, strategy=strategy).address for _ in range(int(n)))
            print(json.dumps(picks), flush=True)
        elif cmd == "nodes":
            print(json.dumps([n.address for n in cm.nodes(args[0])]), flush=True)
        elif cmd == "status":
            print(cm.feedback_status(), flush=True)
        elif cmd == "forks":
            statuses = []
            for _ in range(int(args[0])):
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(r)
                    with cm.call("api"):
                        pass
                    os.write(w, cm.feedback_status().encode())
                    os._exit(0)
                os.close(w)
                with os.fdopen(r) as f:
                    statuses.append(f.read())
                os.waitpid(pid, 0)
            print(json.dumps(statuses), flush=True)
        else:
            print("unknown command", cmd, flush=True)


if __name__ == "__main__":
    main()
