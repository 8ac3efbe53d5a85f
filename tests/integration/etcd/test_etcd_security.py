"""cm-server on a real etcd that requires TLS, client certificates and username/password auth.

The certificates are made in the test (``openssl``); etcd runs with ``--cert-file --key-file
--trusted-ca-file --client-cert-auth``, and auth is enabled with ``etcdctl user add root`` and
``etcdctl auth enable``. Every misconfiguration is one line on stderr and exit status 2.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from clustermap import wire
from clustermap._pb.clustermap.v1 import subscription_pb2_grpc
from clustermap._pb.etcd.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from tests.integration.etcd.harness import free_ports, require_etcd
from tests.support.certs import make_certs
from tests.support.procs import Child, python_env, wait_for
from tests.support.stack import CM_SERVER, ServerProc

PASSWORD = "s3cret-pw"
TOKEN_TTL = 2  # etcd's --auth-token-ttl, seconds: short, so a test sees a token expire


@dataclass
class SecureEtcd:
    certs: Path
    endpoint: str
    child: Child

    def url(self, prefix: str) -> str:
        return f"etcd://{self.endpoint}/{prefix}"

    def tls_flags(self, client: str = "client", ca: str = "ca") -> list[str]:
        return [
            "--etcd-ca",
            str(self.certs / f"{ca}.pem"),
            "--etcd-cert",
            str(self.certs / f"{client}.pem"),
            "--etcd-key",
            str(self.certs / f"{client}.key"),
        ]

    def channel(self) -> grpc.Channel:
        return grpc.secure_channel(
            f"ipv4:{self.endpoint}",
            grpc.ssl_channel_credentials(
                (self.certs / "ca.pem").read_bytes(),
                (self.certs / "client.key").read_bytes(),
                (self.certs / "client.pem").read_bytes(),
            ),
        )


@pytest.fixture(scope="module")
def etcd_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureEtcd]:
    binary = require_etcd()
    etcdctl = shutil.which("etcdctl")
    if shutil.which("openssl") is None or etcdctl is None:
        pytest.skip("needs openssl and etcdctl (apt-get install etcd-client)")
    root = tmp_path_factory.mktemp("etcd-tls")
    certs = make_certs(root)
    client_port, peer_port = free_ports(2)
    endpoint = f"127.0.0.1:{client_port}"
    argv = [
        binary,
        "--name", "s0",
        "--data-dir", str(root / "data"),
        "--listen-client-urls", f"https://{endpoint}",
        "--advertise-client-urls", f"https://{endpoint}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-cluster", f"s0=http://127.0.0.1:{peer_port}",
        "--cert-file", str(certs / "server.pem"),
        "--key-file", str(certs / "server.key"),
        "--trusted-ca-file", str(certs / "ca.pem"),
        "--client-cert-auth",
        "--auth-token", "simple",
        "--auth-token-ttl", str(TOKEN_TTL),
        "--logger", "zap",
        "--log-level", "warn",
    ]  # fmt: skip
    child = Child(argv)
    etcd = SecureEtcd(certs, endpoint, child)
    try:
        with etcd.channel() as ch:
            status = rpc_pb2_grpc.MaintenanceStub(ch).Status

            def ready() -> bool:
                if child.proc.poll() is not None:
                    raise AssertionError(f"etcd exited: {child.stderr()}")
                try:
                    return bool(status(rpc_pb2.StatusRequest(), timeout=1).leader)
                except grpc.RpcError:
                    return False

            wait_for(ready, 60, "etcd with TLS to serve")
        ctl = [
            etcdctl,
            f"--endpoints=https://{endpoint}",
            f"--cacert={certs / 'ca.pem'}",
            f"--cert={certs / 'client.pem'}",
            f"--key={certs / 'client.key'}",
        ]
        env = {"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}
        for cmd in (["user", "add", f"root:{PASSWORD}"], ["auth", "enable"]):
            r = subprocess.run([*ctl, *cmd], capture_output=True, text=True, env=env, timeout=60)
            assert r.returncode == 0, r.stderr
        yield etcd
    finally:
        child.close()


def _poll(srv: ServerProc) -> set[str]:
    stub = subscription_pb2_grpc.SubscriptionStub(srv._channel)
    ans = wire.poll_answer_from_pb(stub.Poll(wire.poll_request("", 0), timeout=5))
    return {f"{s.name}/{n.address}" for s in ans.services for n in s.nodes}


def test_cm_server_uses_tls_client_certificates_and_a_password(
    etcd_tls: SecureEtcd, tmp_path: Path
) -> None:
    password = tmp_path / "etcd-password"
    password.write_text(PASSWORD + "\n")
    url = etcd_tls.url("secure-a")
    flags = [*etcd_tls.tls_flags(), "--etcd-user", "root", "--etcd-password-file", str(password)]
    srv = ServerProc("--store", url, *flags, ttl=5.0, warmup=0)
    try:
        srv.register("user-svc", "10.0.0.1", 8001)
        wait_for(lambda: "user-svc/10.0.0.1:8001" in _poll(srv), 30, "the node in the map")
        # etcd's own timer drops the idle auth token (--auth-token-ttl; a lower bound: later only
        # finds it more surely gone); the next write renews it instead of failing
        time.sleep(TOKEN_TTL + 2)
        srv.register("user-svc", "10.0.0.2", 8001)
        wait_for(lambda: "user-svc/10.0.0.2:8001" in _poll(srv), 30, "the second node")
    finally:
        srv.close()
    # the map lives in etcd: a second server (password from the environment) sees it
    env = python_env(CLUSTERMAP_ETCD_PASSWORD=PASSWORD, CLUSTERMAP_ETCD_USER="root")
    r = subprocess.run(
        [CM_SERVER, "--store", url, *etcd_tls.tls_flags(), "--print-config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout
    srv = ServerProc("--store", url, *flags, ttl=5.0, warmup=0)
    try:
        assert "user-svc/10.0.0.1:8001" in _poll(srv)
    finally:
        srv.close()


def _one_line_error(args: list[str], **env: str) -> str:
    r = subprocess.run(
        [CM_SERVER, "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        env=python_env(**env),
        timeout=120,
    )
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("cm-server:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_misconfigurations_are_one_clear_line(etcd_tls: SecureEtcd, tmp_path: Path) -> None:
    url = etcd_tls.url("secure-b")
    user = ["--etcd-user", "root"]
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (
            [*etcd_tls.tls_flags(), *user],
            {"CLUSTERMAP_ETCD_PASSWORD": "wrong"},
            "refused user 'root': wrong user name or password",
        ),
        (
            ["--etcd-ca", str(tmp_path / "missing.pem"), *user],
            {"CLUSTERMAP_ETCD_PASSWORD": PASSWORD},
            f"cannot read --etcd-ca {tmp_path / 'missing.pem'}: No such file or directory",
        ),
        ([], {}, "does it serve TLS? give --etcd-ca"),
        (
            ["--etcd-ca", str(etcd_tls.certs / "ca.pem")],
            {},
            "refused the client certificate",
        ),
        (etcd_tls.tls_flags(client="rogue"), {}, "refused the client certificate"),
        (etcd_tls.tls_flags(ca="rogue-ca"), {}, "has a certificate that --etcd-ca does not verify"),
        (etcd_tls.tls_flags(), {}, "(PERMISSION_DENIED: etcdserver: permission denied)"),
    ]
    for args, env, expected in cases:
        line = _one_line_error(["--store", url, *args], **env)
        assert expected in line, (args, line)
