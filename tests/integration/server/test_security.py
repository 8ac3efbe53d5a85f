"""Bearer tokens, TLS and mutual TLS on a real cm-server.

Throwaway certificates come from the ``openssl`` CLI (the ``cryptography`` package is not in the
virtualenv); the tests are skipped where neither is available.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from clustermap._pb.clustermap.v1 import (
    inspection_pb2,
    registry_pb2,
    subscription_pb2,
)
from tests.support.certs import make_certs

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _creds(d: Path, client: str | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(d / "ca.pem").read_bytes(),
        private_key=(d / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(d / f"{client}.pem").read_bytes() if client else None,
    )


def _code(call) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return None


# no expiry: a node that outlives the test however slow the machine
REG = registry_pb2.RegisterRequest(service="a", host="h", port=1, ttl_seconds=0)


def test_tokens_guard_registry_and_subscription(server, tmp_path):
    admin, sub = tmp_path / "admin.token", tmp_path / "sub.token"
    admin.write_text("admin-secret\n")
    sub.write_text("sub-secret\n")
    srv = server("--token-file", str(admin), "--subscribe-token-file", str(sub))
    poll = subscription_pb2.PollRequest()
    before = srv.subscription(token="sub-secret").Poll(poll).revision
    assert before == 0 or srv.store != "memory"  # etcd: the revision etcd had at our start

    assert _code(lambda: srv.registry().Register(REG)) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        _code(lambda: srv.registry(token="wrong").Register(REG)) == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        _code(lambda: srv.registry(token="sub-secret").Register(REG))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert _code(lambda: srv.subscription().Poll(poll)) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        _code(lambda: srv.subscription(token="wrong").Poll(poll)) == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        _code(lambda: srv.inspection().ListServices(inspection_pb2.ListServicesRequest()))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    # nothing changed by the refused calls
    ans = srv.subscription(token="sub-secret").Poll(poll)
    assert ans.revision == before
    assert list(ans.services) == []
    assert "request refused" in srv.log()
    assert "PERMISSION_DENIED" in srv.log()

    srv.registry(token="admin-secret").Register(REG)
    assert len(srv.subscription(token="sub-secret").Poll(poll).services) == 1
    assert len(srv.subscription(token="admin-secret").Poll(poll).services) == 1
    stream = srv.subscription().Watch(poll, timeout=5)
    assert _code(lambda: next(stream)) == grpc.StatusCode.UNAUTHENTICATED
    # health checking stays open for load balancers
    assert srv.health("") == health_pb2.HealthCheckResponse.SERVING


def test_tls_listener(server, certs):
    srv = server(
        "--tls-cert",
        str(certs / "server.pem"),
        "--tls-key",
        str(certs / "server.key"),
        credentials=_creds(certs),
    )
    srv.registry().Register(REG)
    plain = grpc.insecure_channel(srv.address)
    try:
        assert (
            _code(lambda: subscription_stub(plain).Poll(subscription_pb2.PollRequest(), timeout=3))
            == grpc.StatusCode.UNAVAILABLE
        )
    finally:
        plain.close()


def subscription_stub(channel: grpc.Channel):
    from clustermap._pb.clustermap.v1 import subscription_pb2_grpc

    return subscription_pb2_grpc.SubscriptionStub(channel)


def test_mutual_tls_requires_a_client_cert_from_the_ca(server, certs):
    srv = server(
        "--tls-cert",
        str(certs / "server.pem"),
        "--tls-key",
        str(certs / "server.key"),
        "--tls-client-ca",
        str(certs / "ca.pem"),
        credentials=_creds(certs, "client"),
    )
    srv.registry().Register(REG)
    for creds in (_creds(certs), _creds(certs, "rogue")):
        ch = grpc.secure_channel(srv.address, creds)
        try:
            assert (
                _code(
                    lambda ch=ch: subscription_stub(ch).Poll(
                        subscription_pb2.PollRequest(), timeout=3
                    )
                )
                == grpc.StatusCode.UNAVAILABLE
            )
        finally:
            ch.close()
    assert len(srv.subscription().Poll(subscription_pb2.PollRequest()).services) == 1


def test_token_over_tls_with_call_credentials_and_cmctl(server, certs, tmp_path):
    token = tmp_path / "admin.token"
    token.write_text("tok")
    srv = server(
        "--tls-cert",
        str(certs / "server.pem"),
        "--tls-key",
        str(certs / "server.key"),
        "--token-file",
        str(token),
        credentials=_creds(certs),
    )
    assert _code(lambda: srv.registry().Register(REG)) == grpc.StatusCode.UNAUTHENTICATED
    srv.registry(token="tok").Register(REG)

    from tests.integration.server.test_cmctl_admin import cmctl

    r = cmctl(
        srv.address, "services", "--tls-ca", str(certs / "ca.pem"), "--token-file", str(token)
    )
    assert r.returncode == 0, r.stderr
    assert "a" in r.stdout
    r = cmctl(
        srv.address, "services", "--tls-ca", str(certs / "ca.pem"), env={"CLUSTERMAP_TOKEN": ""}
    )
    assert r.returncode == 1
    assert "UNAUTHENTICATED" in r.stderr
