"""Hostile clients against a real cm-server (issue 17): nothing a network peer does may wedge it.

Each test drives a real server over loopback with a bounded attack, then checks what matters:
a Register is answered and a Poll returns (awaited with generous deadlines: the machine is
shared), and SIGTERM still stops the process. The 100 ms answer target is measured by
``bench/bench_hostile.py``, not asserted here.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clustermap._pb.clustermap.v1 import registry_pb2, subscription_pb2
from tests.integration.server.conftest import CM_SERVER, Server

CYCLES = 2_000  # the wedge of issue 17 took about 2 000 health Watch open/cancel cycles


def _healthy_after(srv: Server) -> None:
    """The server still registers and answers polls, and SIGTERM stops it."""
    reg = srv.registry()
    resp = reg.Register(
        registry_pb2.RegisterRequest(service="after", host="10.9.9.9", port=80), timeout=30
    )
    assert resp.revision > 0
    poll = srv.subscription().Poll(subscription_pb2.PollRequest(), timeout=30)
    assert poll.kind == subscription_pb2.POLL_KIND_FULL
    assert srv.terminate(timeout=30) == 0


def _churn(open_call: Callable[[], grpc.Call], cycles: int = CYCLES) -> None:
    """Open a stream and cancel it, ``cycles`` times; every other one reads a message first
    (RESOURCE_EXHAUSTED, a capped stream kind refusing, is fine)."""
    for i in range(cycles):
        call = open_call()
        if i % 2:
            try:
                next(call)  # type: ignore[call-overload]
            except StopIteration:
                pass
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise AssertionError(f"the server wedged after {i} cycles") from None
        call.cancel()


def test_health_watch_churn_does_not_wedge_the_server(server: Callable[..., Server]) -> None:
    srv = server()
    stub = health_pb2_grpc.HealthStub(srv.channel())
    _churn(lambda: stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30))
    _healthy_after(srv)


def test_health_watchers_see_shutdown_and_do_not_hold_it(server: Callable[..., Server]) -> None:
    srv = server("--grace", "600")
    stub = health_pb2_grpc.HealthStub(srv.channel())
    calls = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60) for _ in range(20)]
    for call in calls:
        assert next(call).status == health_pb2.HealthCheckResponse.SERVING
    srv.proc.terminate()
    for call in calls:
        statuses = [r.status for r in call]  # ends: the server closes the stream
        assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
    # the streams ended themselves: the stop does not sit out the 600 s grace for them
    assert srv.proc.wait(120) == 0


def test_concurrent_health_churn_from_threads(server: Callable[..., Server]) -> None:
    srv = server()
    stub = health_pb2_grpc.HealthStub(srv.channel())
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _churn(lambda: stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30), 300)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    _healthy_after(srv)


# -- authentication can never be silently off or half on -------------------------------------


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
@pytest.mark.parametrize("flag", ["--token-file", "--subscribe-token-file"])
def test_an_empty_token_file_is_an_error(tmp_path: Path, flag: str, content: str) -> None:
    token = tmp_path / "token"
    token.write_text(content)
    r = subprocess.run(
        [CM_SERVER, "--listen", "127.0.0.1:0", flag, str(token)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert "is empty" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_subscribe_token_alone_closes_writes(
    server: Callable[..., Server], tmp_path: Path
) -> None:
    sub = tmp_path / "sub.token"
    sub.write_text("sub-secret\n")
    srv = server("--subscribe-token-file", str(sub))
    req = registry_pb2.RegisterRequest(service="a", host="10.0.0.1", port=1)
    for token, code in (
        (None, grpc.StatusCode.PERMISSION_DENIED),
        ("sub-secret", grpc.StatusCode.PERMISSION_DENIED),
        ("guess", grpc.StatusCode.PERMISSION_DENIED),
    ):
        reg = srv.registry(token=token)
        with pytest.raises(grpc.RpcError) as exc:
            reg.Register(req, timeout=30)
        assert exc.value.code() == code
        with pytest.raises(grpc.RpcError) as exc:
            reg.Deregister(
                registry_pb2.DeregisterRequest(service="a", host="10.0.0.1", port=1), timeout=30
            )
        assert exc.value.code() == code
        with pytest.raises(grpc.RpcError) as exc:
            reg.UpdateNode(
                registry_pb2.UpdateNodeRequest(service="a", host="10.0.0.1", port=1, weight=0),
                timeout=30,
            )
        assert exc.value.code() == code
    poll = srv.subscription(token="sub-secret").Poll(subscription_pb2.PollRequest(), timeout=30)
    assert list(poll.services) == []


# -- reflection streams are capped -------------------------------------------------------------


def test_held_reflection_streams_do_not_starve_the_server(server: Callable[..., Server]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    srv = server()
    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel())
    release = threading.Event()

    def requests() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        release.wait(120)  # hold the stream open, as an idle grpcurl or an attacker would

    calls = [stub.ServerReflectionInfo(requests(), timeout=60) for _ in range(10)]
    outcomes: list[str] = []
    try:
        for call in calls:
            try:
                next(call)
                outcomes.append("held")
            except grpc.RpcError as exc:
                outcomes.append(f"{exc.code().name}: {exc.details()}")
        assert outcomes.count("held") == 2  # the default cap
        refused = [o for o in outcomes if o != "held"]
        assert all(o.startswith("RESOURCE_EXHAUSTED") for o in refused), refused
        assert all("--max-reflection-streams" in o for o in refused)
        _healthy_after(srv)
    finally:
        release.set()
        for call in calls:
            call.cancel()


def test_reflection_can_be_turned_off(server: Callable[..., Server]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    srv = server("--max-reflection-streams", "0")
    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel())
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
    )
    with pytest.raises(grpc.RpcError) as exc:
        next(call)
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- bounds on the registry ------------------------------------------------------------------------


def _refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code(), str(exc.value.details())


def test_registry_caps_answer_resource_exhausted_naming_the_limit(
    server: Callable[..., Server],
) -> None:
    srv = server("--max-services", "2", "--max-nodes-per-service", "2", "--max-meta-bytes", "100")
    reg = srv.registry()

    def register(service: str, port: int, **kw: object) -> object:
        req = registry_pb2.RegisterRequest(service=service, host="10.0.0.1", port=port, **kw)
        return reg.Register(req, timeout=30)

    register("a", 1)
    register("a", 2)
    register("b", 1)
    code, details = _refusal(lambda: register("a", 3))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-nodes-per-service" in details
    assert "2 nodes" in details
    code, details = _refusal(lambda: register("c", 1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-services" in details
    assert "2 services" in details
    code, details = _refusal(lambda: register("a", 1, meta={"k": "v" * 200}))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-meta-bytes" in details
    register("a", 1, meta={"k": "v" * 50})  # within the bounds: still fine
    poll = srv.subscription().Poll(subscription_pb2.PollRequest(), timeout=30)
    assert sorted(s.name for s in poll.services) == ["a", "b"]


# -- malformed, oversized and hostile requests ---------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _raw(srv: Server, method: str, body: bytes, stream: bool = False) -> tuple[str, str]:
    """Send ``body`` as is; return (status code name, details)."""
    ch = srv.channel()
    try:
        if stream:
            for _ in ch.unary_stream(method)(body, timeout=30):
                pass
        else:
            ch.unary_unary(method)(body, timeout=30)
    except grpc.RpcError as exc:
        return exc.code().name, str(exc.details())
    return "OK", ""


REGISTER = "/clustermap.v1.Registry/Register"
BAD_UTF8 = _field(1, b"\xff\xfesvc") + _field(2, b"10.0.0.1") + b"\x18\x50"  # port 80
HUGE_PORT = _field(1, b"svc") + _field(2, b"10.0.0.1") + b"\x18" + _varint((1 << 32) + 80)
MALFORMED: list[tuple[str, bytes, bool]] = [
    (REGISTER, BAD_UTF8, False),
    (REGISTER, HUGE_PORT, False),
    (REGISTER, b"\x0a\x10abc", False),  # truncated
    ("/clustermap.v1.Subscription/Poll", _field(3, b"\xc3\x28"), False),
    ("/clustermap.v1.Subscription/Watch", b"\xff\xff\xff", True),
    ("/clustermap.v1.Inspection/GetService", _field(1, b"\xed\xa0\x80"), False),
    ("/grpc.health.v1.Health/Check", _field(1, b"\xff"), False),
    ("/grpc.health.v1.Health/Watch", _field(1, b"\xff"), True),
]


def test_malformed_requests_are_invalid_argument(server: Callable[..., Server]) -> None:
    srv = server()
    for method, body, stream in MALFORMED:
        code, details = _raw(srv, method, body, stream)
        assert code == "INVALID_ARGUMENT", (method, body, details)
    poll = srv.subscription().Poll(subscription_pb2.PollRequest(), timeout=30)
    assert list(poll.services) == []  # nothing registered, not even a truncated port


def _register(srv: Server, **kw: object) -> tuple[str, str]:
    fields = {"service": "svc", "host": "10.0.0.1", "port": 80, **kw}
    try:
        srv.registry().Register(registry_pb2.RegisterRequest(**fields), timeout=30)  # type: ignore[arg-type]
    except grpc.RpcError as exc:
        return exc.code().name, str(exc.details())
    return "OK", ""


HOSTILE_FIELDS: list[dict[str, object]] = [
    {"ttl_seconds": -0.0},
    {"ttl_seconds": float("nan")},
    {"ttl_seconds": float("inf")},
    {"meta": {"zone": "a\x1b]0;pwned\x07"}},
    {"meta": {"note": "line\nbreak"}},
    {"meta": {"note": "nul\x00"}},
    {"meta": {"note": "\u202eevil"}},
    {"meta": {"note": "\u2066evil"}},
    {"host": "fe80::1%x\x1by"},
    {"host": "fe80::1%x y"},
    {"host": "fe80::1%" + "a" * 16},
    {"port": 70_000},
]


def test_hostile_registrations_are_refused(server: Callable[..., Server]) -> None:
    srv = server()
    for fields in HOSTILE_FIELDS:
        code, details = _register(srv, **fields)
        assert code == "INVALID_ARGUMENT", (fields, details)
        assert "\x1b" not in details
    poll = srv.subscription().Poll(subscription_pb2.PollRequest(), timeout=30)
    assert list(poll.services) == []


def test_zone_ids_the_rule_allows_are_registered(server: Callable[..., Server]) -> None:
    srv = server()
    assert _register(srv, host="fe80::1%x_y") == ("OK", "")
    assert _register(srv, host="FE80::2%eth0.100") == ("OK", "")
    poll = srv.subscription().Poll(subscription_pb2.PollRequest(), timeout=30)
    assert sorted(n.host for n in poll.services[0].nodes) == ["fe80::1%x_y", "fe80::2%eth0.100"]


def test_get_service_does_not_echo_a_huge_name(server: Callable[..., Server]) -> None:
    from clustermap._pb.clustermap.v1 import inspection_pb2

    srv = server()
    for name in ("x" * 500_000, "unknown-" + "y" * 100):
        with pytest.raises(grpc.RpcError) as exc:
            srv.inspection().GetService(inspection_pb2.GetServiceRequest(name=name), timeout=30)
        assert exc.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert len(str(exc.value.details())) < 200


def test_oversized_requests_are_refused(server: Callable[..., Server]) -> None:
    srv = server()
    code, _ = _raw(srv, REGISTER, _field(1, b"s" * (2 << 20)))
    assert code == "RESOURCE_EXHAUSTED"
    _healthy_after(srv)


# -- the standing hostile client ---------------------------------------------------------------


def test_standing_hostile_client(server: Callable[..., Server]) -> None:
    """Open/cancel every streaming RPC in a loop, interleaved with malformed and oversized
    requests; afterwards the server still registers, answers polls and stops on SIGTERM."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    srv = server()
    ch = srv.channel()
    health = health_pb2_grpc.HealthStub(ch)
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    sub = srv.subscription()
    openers: list[Callable[[], grpc.Call]] = [
        lambda: health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30),
        lambda: refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
        ),
        lambda: sub.Watch(subscription_pb2.PollRequest(), timeout=30),
    ]
    for round_ in range(5):
        for opener in openers:
            _churn(opener, 100)
        for method, body, stream in MALFORMED:
            assert _raw(srv, method, body, stream)[0] == "INVALID_ARGUMENT"
        assert _raw(srv, REGISTER, _field(1, b"s" * (2 << 20)))[0] == "RESOURCE_EXHAUSTED"
        assert _register(srv, port=1000 + round_) == ("OK", "")
    _healthy_after(srv)
