"""Many Watch streams on one real cm-server: no thread per stream, every change reaches all.

200 raw gRPC Watch streams (grpc.aio clients in this process, over 20 connections) hold one
server process; its thread count (``/proc/PID/status``) stays small while they are open, a change
reaches every one of them, and one stream more than ``--max-watchers`` is refused
RESOURCE_EXHAUSTED with a message naming the flag, and a stream whose client stops reading is
collapsed to the latest state instead of queued. The 5 000-stream figures are in
bench/bench_streams.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from clustermap._pb.clustermap.v1 import registry_pb2, subscription_pb2
from clustermap.model import DELTA, FULL
from clustermap.wire import poll_answer_from_pb
from tests.integration.server.conftest import Server

STREAMS = 200
CONNECTIONS = 20
DEADLINE = 120.0  # generous: the machine is shared

WATCH = "/clustermap.v1.Subscription/Watch"


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def _register(srv: Server, port: int) -> int:
    resp = srv.registry().Register(
        registry_pb2.RegisterRequest(service="svc", host="10.0.0.1", port=port), timeout=60
    )
    return int(resp.revision)


def _channels(srv: Server) -> list[grpc.aio.Channel]:
    # a local subchannel pool per channel: each is its own TCP connection, as sidecars are
    return [
        grpc.aio.insecure_channel(srv.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CONNECTIONS)
    ]


def _watch(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamCall:
    return channel.unary_stream(
        WATCH,
        request_serializer=subscription_pb2.PollRequest.SerializeToString,
        response_deserializer=subscription_pb2.PollResponse.FromString,
    )(subscription_pb2.PollRequest(), timeout=600)


@pytest.mark.memory_only("threads per stream do not depend on the store; etcd: the replica test")
def test_200_streams_hold_few_threads_and_all_see_a_change(
    server: Callable[..., Server],
) -> None:
    srv = server("--max-workers", "4", "--watch-keepalive", "300")
    _register(srv, 1)
    before = _threads(srv.proc.pid)

    async def run() -> tuple[int, int]:
        channels = _channels(srv)
        try:
            calls = [_watch(channels[i % CONNECTIONS]) for i in range(STREAMS)]
            firsts = await asyncio.wait_for(
                asyncio.gather(*(call.read() for call in calls)), DEADLINE
            )
            assert {poll_answer_from_pb(m).kind for m in firsts} == {FULL}
            held = _threads(srv.proc.pid)
            revision = await asyncio.to_thread(_register, srv, 2)
            nexts = await asyncio.wait_for(
                asyncio.gather(*(call.read() for call in calls)), DEADLINE
            )
            for msg in nexts:
                ans = poll_answer_from_pb(msg)
                assert (ans.kind, ans.revision) == (DELTA, revision)
                assert sorted(n.port for n in ans.services[0].nodes) == [1, 2]
            for call in calls:
                call.cancel()
            return held, _threads(srv.proc.pid)
        finally:
            for channel in channels:
                await channel.close()

    held, after = asyncio.run(run())
    # a thread per stream would add 200; the blocking pool (4) and gRPC's own few may start
    assert held - before <= 12, (before, held)
    assert after - before <= 12, (before, after)


def test_streams_beyond_the_cap_are_refused_with_the_flag_named(
    server: Callable[..., Server],
) -> None:
    srv = server("--max-watchers", "3")

    async def run() -> list[str]:
        channels = _channels(srv)
        try:
            calls = [_watch(channels[i % 2]) for i in range(5)]
            outcomes = []
            for call in calls:
                try:
                    await asyncio.wait_for(call.read(), DEADLINE)
                    outcomes.append("held")
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(f"{exc.code().name}: {exc.details()}")
            for call in calls:
                call.cancel()
            # cancelled streams free their slots (the server learns of it a little later)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE
            while True:
                again = _watch(channels[0])
                try:
                    await asyncio.wait_for(again.read(), DEADLINE)
                    break
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                if code != grpc.StatusCode.RESOURCE_EXHAUSTED or loop.time() > deadline:
                    raise AssertionError(f"no slot freed by the cancelled streams: {code}")
                await asyncio.sleep(0.1)
            again.cancel()
            return outcomes
        finally:
            for channel in channels:
                await channel.close()

    outcomes = asyncio.run(run())
    assert outcomes.count("held") == 3  # which ones depends on arrival order
    refused = [o for o in outcomes if o != "held"]
    assert all(o.startswith("RESOURCE_EXHAUSTED") and "--max-watchers" in o for o in refused)


@pytest.mark.memory_only("flow control is the transport's; the store plays no part")
def test_a_stream_that_does_not_read_is_collapsed_to_the_latest_state(
    server: Callable[..., Server],
) -> None:
    srv = server("--watch-keepalive", "300")
    for port in range(1, 301):  # one big service: each delta of it is ~12 kB
        _register(srv, port)
    # a small receive window and no BDP probing: the server's writes block once a few
    # deltas are in flight, as with a sidecar that stopped reading
    channel = grpc.insecure_channel(
        srv.address,
        options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)],
    )
    try:
        stream = channel.unary_stream(
            WATCH,
            request_serializer=subscription_pb2.PollRequest.SerializeToString,
            response_deserializer=subscription_pb2.PollResponse.FromString,
        )(subscription_pb2.PollRequest(), timeout=DEADLINE)
        assert poll_answer_from_pb(next(stream)).kind == FULL
        reg = srv.registry()
        changes = 100
        last = 0
        for i in range(changes):
            last = reg.UpdateNode(
                registry_pb2.UpdateNodeRequest(
                    service="svc", host="10.0.0.1", port=1 + i % 300, weight=2 + i
                ),
                timeout=60,
            ).revision
        received = []
        for msg in stream:
            ans = poll_answer_from_pb(msg)
            received.append(ans)
            if ans.revision == last:
                break
        stream.cancel()
    finally:
        channel.close()
    # not one message per revision: what could not be sent was collapsed into the next delta
    assert len(received) < changes // 2, len(received)
    assert all(a.kind == DELTA for a in received)
    final = received[-1].services[0]
    weights = {n.port: n.weight for n in final.nodes}
    assert all(weights[1 + i % 300] == 2 + i for i in range(changes))
