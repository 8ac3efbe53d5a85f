"""clustermap.grpc against real grpc servers, a real cm-server and cm-sidecar (feedback on)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import clustermap.grpc
from tests.integration.http_clients.harness import Stack
from tests.support.procs import python_env, wait_for
from tests.support.stack import dead_address

ECHO = "/cm.test.Echo/Call"


class Backend:
    """A real grpc server: the health service and ``ECHO``, which answers the server's port or
    aborts with ``code``."""

    def __init__(self, code: grpc.StatusCode | None = None) -> None:
        self.code = code
        self.calls = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self.server)
        handler = grpc.unary_unary_rpc_method_handler(self._echo)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("cm.test.Echo", {"Call": handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def _echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        if self.code is not None:
            context.abort(self.code, "told to fail")
        return str(self.port).encode()

    def stop(self) -> None:
        self.server.stop(0).wait()


@contextmanager
def backends(*codes: grpc.StatusCode | None) -> Iterator[list[Backend]]:
    made = [Backend(c) for c in codes]
    try:
        yield made
    finally:
        for b in made:
            b.stop()


def test_a_generated_stub_and_raw_calls_reach_every_node(stack: Stack) -> None:
    with backends(None, None, None) as bs:
        stack.publish("rpc", *(b.address for b in bs))
        with clustermap.grpc.Channel("rpc", stack.map) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(6):
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            echo = channel.unary_unary(ECHO)
            seen = Counter(int(echo(b"", timeout=5)) for _ in range(30))
            assert set(seen) == {b.port for b in bs}
            # One channel per node, reused call after call.
            node = stack.map.service("rpc").nodes[0]
            assert channel.channel_for(node) is channel.channel_for(node)


def test_a_killed_backend_costs_no_call_and_is_ejected(stack: Stack) -> None:
    with backends(None, None, None) as bs:
        stack.publish("rpc", *(b.address for b in bs))
        channel = clustermap.grpc.Channel("rpc", stack.map)
        echo = channel.unary_unary(ECHO)
        assert {int(echo(b"", timeout=5)) for _ in range(9)} == {b.port for b in bs}
        bs[0].stop()  # still registered: its calls now fail to connect
        for _ in range(40):
            assert int(echo(b"", timeout=5)) != bs[0].port
            if bs[0].address in stack.ejected():
                break
        wait_for(lambda: bs[0].address in stack.ejected(), 10, "the killed node to be ejected")
        channel.close()


def test_status_codes_are_feedback_and_the_last_error_says_what_was_tried(stack: Stack) -> None:
    with backends(grpc.StatusCode.INTERNAL, None, None) as (bad, *_):
        stack.publish("rpc", *(b.address for b in [bad, *_]))
        echo = clustermap.grpc.Channel("rpc", stack.map).unary_unary(ECHO)
        errors: list[grpc.RpcError] = []
        for _ in range(40):
            try:
                echo(b"", timeout=5)
            except grpc.RpcError as exc:
                errors.append(exc)
            if bad.address in stack.ejected():
                break
        # INTERNAL is a failure of the node but not retried (the call reached it).
        assert len(errors) >= 5
        assert all(e.code() == grpc.StatusCode.INTERNAL for e in errors)
        assert all(isinstance(e, clustermap.grpc.RequestFailed) for e in errors)
        assert all(e.tried == (bad.address,) for e in errors)  # type: ignore[attr-defined]
        wait_for(lambda: bad.address in stack.ejected(), 10, "the INTERNAL node to be ejected")

    with dead_address() as d1, dead_address() as d2, dead_address() as d3:
        stack.publish("down", d1, d2, d3)
        echo = clustermap.grpc.Channel("down", stack.map).unary_unary(ECHO)
        with pytest.raises(grpc.RpcError) as info:
            echo(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert isinstance(info.value, clustermap.grpc.RequestFailed)
        assert sorted(info.value.tried) == sorted([d1, d2, d3])


def test_aio_channel_picks_per_call_and_retries(stack: Stack) -> None:
    with dead_address() as dead, backends(None, None) as bs:
        stack.publish("rpc", dead, *(b.address for b in bs))

        async def calls() -> list[int]:
            async with clustermap.grpc.AioChannel("rpc", stack.map) as channel:
                echo = channel.unary_unary(ECHO)
                return [int(await echo(b"", timeout=5)) for _ in range(12)]

        assert set(asyncio.run(calls())) == {b.port for b in bs}


FORKED = """
import os, sys, clustermap, clustermap.grpc
channel = clustermap.grpc.Channel("rpc", clustermap.open(sys.argv[1]))
echo = channel.unary_unary("/cm.test.Echo/Call")
node = channel._o.map.service("rpc").nodes[0]
echo(b"", timeout=5)
parent = channel.channel_for(node)
pid = os.fork()
if pid == 0:
    ok = all(echo(b"", timeout=5) for _ in range(4))
    print("child", ok, channel.channel_for(node) is not parent, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", bool(echo(b"", timeout=5)), channel.channel_for(node) is parent, flush=True)
"""


def test_after_fork_the_child_makes_its_own_channels(stack: Stack) -> None:
    with backends(None, None) as bs:
        stack.publish("rpc", *(b.address for b in bs))
        out = subprocess.run(
            [sys.executable, "-c", FORKED, str(stack.region)],
            capture_output=True,
            text=True,
            timeout=120,
            env=python_env(),
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:2] == ["child True True", "parent True True"], out
