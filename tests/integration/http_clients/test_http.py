"""clustermap.http against real backends, a real cm-server and a real cm-sidecar (feedback on).

Backends are threaded ``http.server`` instances on free ports; a refused node is a bound port that
never listens. States are awaited (the map, ejections), never slept.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

import clustermap.http
from clustermap.feedback.budget import budget_for
from tests.integration.http_clients.harness import ProcBackend, Stack, backends, certificate
from tests.support.procs import python_env, wait_for
from tests.support.stack import dead_address


def ports(responses: list[Any]) -> Counter[int]:
    return Counter(r.json()["port"] for r in responses)


def test_requests_session_reaches_every_node_with_the_service_as_host(stack: Stack) -> None:
    with backends("ok", "ok", "ok") as bs:
        stack.publish("api", *(b.address for b in bs))
        s = clustermap.http.Session(stack.map)
        answers = [s.get("http://api/users/42?x=1") for _ in range(30)]
        assert set(ports(answers)) == {b.port for b in bs}
        first = answers[0]
        assert first.status_code == 200
        assert first.json()["host"] == "api"  # virtual hosting keeps working
        assert first.json()["path"] == "/users/42?x=1"
        assert first.json()["attempt"] == 1
        assert first.url == "http://api/users/42?x=1"  # the caller's URL, not the node's
        # A port in the URL stays in the Host header; the node's port is used to connect.
        assert s.get("http://api:8080/").json()["host"] == "api:8080"


def test_httpx_sync_and_async_reach_every_node(stack: Stack) -> None:
    with backends("ok", "ok", "ok") as bs:
        stack.publish("api", *(b.address for b in bs))
        with httpx.Client(transport=clustermap.http.Transport(stack.map)) as c:
            answers = [c.get("http://api/a") for _ in range(30)]
        assert set(ports(answers)) == {b.port for b in bs}
        assert answers[0].json()["host"] == "api"
        assert str(answers[0].url) == "http://api/a"

        async def many() -> list[httpx.Response]:
            transport = clustermap.http.AsyncTransport(stack.map)
            async with httpx.AsyncClient(transport=transport) as c:
                return list(await asyncio.gather(*(c.get("http://api/b") for _ in range(30))))

        answers = asyncio.run(many())
        assert set(ports(answers)) == {b.port for b in bs}
        assert all(r.json()["host"] == "api" for r in answers)


def test_hosts_that_are_not_services_go_out_unchanged(stack: Stack) -> None:
    with backends("ok", "ok") as (svc, plain):
        stack.publish("api", svc.address)
        s = clustermap.http.Session(stack.map)
        for url, host in (
            (f"http://127.0.0.1:{plain.port}/x", f"127.0.0.1:{plain.port}"),
            (f"http://localhost:{plain.port}/x", f"localhost:{plain.port}"),
        ):
            seen = s.get(url).json()
            assert (seen["port"], seen["host"], seen["attempt"]) == (plain.port, host, 0)
            with httpx.Client(transport=clustermap.http.Transport(stack.map)) as c:
                seen = c.get(url).json()
            assert (seen["port"], seen["host"], seen["attempt"]) == (plain.port, host, 0)
        assert svc.count() == 0


def test_redirects_to_the_service_go_through_the_map_and_others_go_out_unchanged(
    stack: Stack,
) -> None:
    with backends("ok", "ok", "ok") as (a, b, plain):
        stack.publish("api", a.address, b.address)
        s = clustermap.http.Session(stack.map)
        with httpx.Client(
            transport=clustermap.http.Transport(stack.map), follow_redirects=True
        ) as c:
            for get in (s.get, c.get):
                for to in ("/landed", "http://api/landed"):
                    r = get(f"http://api/redirect?to={to}")
                    assert r.status_code == 200
                    assert r.json()["path"] == "/landed"
                    assert r.json()["host"] == "api"
                    assert r.json()["port"] in (a.port, b.port)
                    assert str(r.url) == "http://api/landed"
                    assert len(r.history) == 1
                r = get(f"http://api/redirect?to=http://127.0.0.1:{plain.port}/off")
                assert r.json()["port"] == plain.port
                assert r.json()["host"] == f"127.0.0.1:{plain.port}"


def test_a_refused_node_costs_no_request_and_is_ejected_for_every_worker(stack: Stack) -> None:
    with dead_address() as dead, backends("ok", "ok", "ok") as bs:
        stack.publish("api", dead, *(b.address for b in bs))
        s = clustermap.http.Session(stack.map)
        # Every request succeeds: the ones picked onto the dead node go to another node, even a
        # POST (nothing was sent). The dead node's failures reach the sidecar...
        for i in range(40):
            r = s.post("http://api/p", data=b"x") if i % 2 else s.get("http://api/g")
            assert r.status_code == 200
            assert r.json()["port"] != int(dead.rsplit(":", 1)[1])
            if dead in stack.ejected():
                break
        # ... which ejects it for every process on the machine (here: what cmctl reads).
        wait_for(lambda: dead in stack.ejected(), 10, "the refused node to be ejected")
        retried = [q for b in bs for q in b.requests if q["attempt"] == 2]
        assert retried, "some requests were retried on another node"


def test_the_last_error_says_which_nodes_were_tried(stack: Stack) -> None:
    with dead_address() as d1, dead_address() as d2, dead_address() as d3:
        stack.publish("down", d1, d2, d3)
        s = clustermap.http.Session(stack.map)
        with pytest.raises(requests.ConnectionError) as info:
            s.get("http://down/")
        assert isinstance(info.value, clustermap.http.RequestFailed)
        assert sorted(info.value.tried) == sorted([d1, d2, d3])  # 1 try + 2 retries, all distinct
        assert info.value.service == "down"

        with (
            httpx.Client(transport=clustermap.http.Transport(stack.map)) as c,
            pytest.raises(httpx.ConnectError) as hinfo,
        ):
            c.get("http://down/")
        assert isinstance(hinfo.value, clustermap.http.RequestFailed)
        assert len(set(hinfo.value.tried)) == 3


def test_a_5xx_node_is_retried_for_idempotent_methods_only_and_ejected(stack: Stack) -> None:
    with backends("503", "ok", "ok") as (bad, *good):
        stack.publish("api", bad.address, *(b.address for b in good))
        s = clustermap.http.Session(stack.map)
        posts = [s.post("http://api/p", data=b"x") for _ in range(6)]
        # A POST that reached the 503 node is not sent again: the caller gets the 503.
        assert any(r.status_code == 503 for r in posts)
        assert all(q["attempt"] == 1 for b in good for q in b.requests if q["method"] == "POST")
        # A GET is retried elsewhere: every GET succeeds.
        for _ in range(30):
            assert s.get("http://api/g").status_code == 200
            if bad.address in stack.ejected():
                break
        wait_for(lambda: bad.address in stack.ejected(), 10, "the 503 node to be ejected")


def test_the_retry_budget_is_shared_by_the_machine(stack: Stack) -> None:
    """Another process holding 3 retries (Envoy's min_retry_concurrency) leaves none for us;
    when it dies, its retries stop counting."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, clustermap\n"
            "from clustermap.feedback.budget import BudgetRule, budget_for\n"
            "b = budget_for(clustermap.open(sys.argv[1]))\n"
            "print(sum(b.try_retry(BudgetRule()) for _ in range(5)), flush=True)\n"
            "sys.stdin.read()\n",
            str(stack.region),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "3"  # the 4th and 5th were refused
        budget = budget_for(stack.map)
        assert budget.active() == (0, 3)
        with dead_address() as dead, backends("ok") as (ok,):
            stack.publish("api", dead, ok.address)
            s = clustermap.http.Session(stack.map)
            errors = []
            for _ in range(4):  # round-robin: at least one request is picked onto the dead node
                try:
                    s.get("http://api/")
                except requests.ConnectionError as exc:
                    errors.append(exc)
            assert errors
            assert all(e.tried == (dead,) for e in errors)  # type: ignore[attr-defined]
            assert not any(q["attempt"] == 2 for q in ok.requests)
            holder.kill()
            holder.wait()
            wait_for(lambda: budget.active() == (0, 0), 10, "the dead holder to stop counting")
            stack.publish("api2", dead, ok.address)
            for _ in range(4):
                assert s.get("http://api2/").status_code == 200
    finally:
        holder.kill()
        holder.wait()
        for f in (holder.stdin, holder.stdout):
            if f is not None:
                f.close()


def test_the_budget_caps_retries_in_a_total_outage(stack: Stack) -> None:
    """20 concurrent GETs, every node failing: without a budget 20 retries would pile up at
    once (40 in all); the budget allows max(3, 20 % of 20) = 4 at a time."""
    with backends("slow-retries", "slow-retries", "slow-retries", hold=1.5) as bs:
        stack.publish("api", *(b.address for b in bs))

        async def storm() -> list[httpx.Response]:
            transport = clustermap.http.AsyncTransport(stack.map)
            async with httpx.AsyncClient(transport=transport, timeout=30) as c:
                return list(await asyncio.gather(*(c.get("http://api/") for _ in range(20))))

        answers = asyncio.run(storm())
        assert all(r.status_code == 503 for r in answers)
        retries = sum(1 for b in bs for q in b.requests if q["attempt"] >= 2)
        firsts = sum(1 for b in bs for q in b.requests if q["attempt"] == 1)
        assert firsts == 20
        assert max(b.retries_max for b in bs) <= 4
        # Sum over the three nodes, at once: at most 4 retries ever overlapped anywhere.
        assert 1 <= retries <= 8, retries
        assert budget_for(stack.map).active() == (0, 0)


def test_after_fork_the_child_uses_its_own_connections(stack: Stack) -> None:
    with backends("ok", "ok") as bs:
        stack.publish("api", *(b.address for b in bs))
        s = clustermap.http.Session(stack.map)
        t = clustermap.http.Transport(stack.map)
        c = httpx.Client(transport=t)
        assert s.get("http://api/").status_code == 200
        assert c.get("http://api/").status_code == 200
        parent_pool = s.adapters["http://"].poolmanager  # type: ignore[attr-defined]
        parent_inner = t.inner
        budget = budget_for(stack.map)
        budget.begin()  # a request of the parent's in flight across the fork
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report and leave without running the parent's teardown
            code = 1
            try:
                ok = s.get("http://api/").status_code == 200 and c.get("http://api/").is_success
                fresh = s.adapters["http://"].poolmanager is not parent_pool  # type: ignore[attr-defined]
                fresh_t = t.inner is not parent_inner
                # The parent's request counts machine-wide (its row), not as the child's own.
                counts = budget.active() == (1, 0) and budget.requests == 0
                os.write(w, f"{ok} {fresh} {fresh_t} {counts}".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r) as f:
            answer = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        budget.end()
        assert answer == "True True True True"
        assert budget.active() == (0, 0)
        # The parent's pools are untouched and still work.
        assert s.adapters["http://"].poolmanager is parent_pool  # type: ignore[attr-defined]
        assert s.get("http://api/").status_code == 200
        c.close()


def test_https_verifies_the_service_name_not_the_node_address(stack: Stack, tmp_path: Path) -> None:
    cert, key = certificate(tmp_path, "secure-svc")
    with backends("ok", "ok", tls=(cert, key)) as bs:
        stack.publish("secure-svc", *(b.address for b in bs))
        s = clustermap.http.Session(stack.map)
        answers = [s.get("https://secure-svc/x", verify=cert) for _ in range(6)]
        assert set(ports(answers)) == {b.port for b in bs}
        assert answers[0].json()["host"] == "secure-svc"
        # The node's address is not in the certificate: without the map, verification fails.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://{bs[0].address}/x", verify=cert, timeout=10)
        # A certificate that names something else than the expected name fails as usual.
        other = clustermap.http.Session(stack.map, tls_server_name="another-name")
        with pytest.raises(requests.exceptions.SSLError):
            other.get("https://secure-svc/x", verify=cert)

        ctx = ssl.create_default_context(cafile=cert)
        with httpx.Client(transport=clustermap.http.Transport(stack.map, verify=ctx)) as c:
            answers = [c.get("https://secure-svc/y") for _ in range(6)]
        assert set(ports(answers)) == {b.port for b in bs}
        assert answers[0].json()["host"] == "secure-svc"


def test_a_backend_sigkilled_while_registered_costs_no_request(stack: Stack) -> None:
    procs = [ProcBackend() for _ in range(3)]
    try:
        stack.publish("api", *(p.address for p in procs))
        s = clustermap.http.Session(stack.map)
        with httpx.Client(transport=clustermap.http.Transport(stack.map)) as c:
            for get in (s.get, c.get):
                assert {get("http://api/").json()["port"] for _ in range(9)} == {
                    p.port for p in procs
                }
            procs[0].kill()  # still registered: the map keeps offering it
            for i in range(60):
                r = (s.get if i % 2 else c.get)("http://api/")
                assert r.status_code == 200
                assert r.json()["port"] != procs[0].port
                if procs[0].address in stack.ejected():
                    break
            wait_for(lambda: procs[0].address in stack.ejected(), 10, "the dead node's ejection")
    finally:
        for p in procs:
            p.close()
