"""The traps a newcomer fell into following the docs (issue 16), each as it was met: real
``cmctl``, ``cm-sidecar`` and ``cm-server`` processes, real regions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import clustermap
from clustermap.model import Node, Service
from clustermap.region.layout import Meta
from clustermap.region.writer import RegionWriter
from tests.support.procs import ROOT, Child, python_env, wait_for
from tests.support.stack import (
    CM_SERVER,
    CM_SIDECAR,
    CMCTL,
    ServerProc,
    SidecarProc,
    dead_address,
    free_port,
)


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=60, env=env or python_env()
    )


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture
def region(region_path: Path) -> Path:
    with RegionWriter(region_path) as w:
        w.publish(
            [Service("user-svc", (Node("10.0.0.1", 80),))],
            meta=Meta(revision=7, epoch="e", server="127.0.0.1:7700"),
            sync_ns=1,
        )
    return region_path


# -- 6. global options on both sides of the command ----------------------------------------------


def test_region_and_server_work_before_and_after_the_command(region: Path) -> None:
    before = run(CMCTL, "--region", str(region), "status", "--json")
    after = run(CMCTL, "status", "--json", "--region", str(region))
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert json.loads(after.stdout)["region"] == str(region)
    # after the command wins over before it (and over the environment)
    r = run(CMCTL, "--region", "/nonexistent/r", "pick", "user-svc", "--region", str(region))
    assert r.stdout.strip() == "10.0.0.1:80", r.stderr

    server = ServerProc()
    try:
        r = run(CMCTL, "register", "a", "10.0.0.9:80", "--server", server.address)
        assert r.returncode == 0, r.stderr
        r = run(CMCTL, "services", "--json", "--server", server.address)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["services"]["a"]["nodes"] == 1
    finally:
        server.close()


# -- 7. one HOST:PORT rule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [CMCTL, "--server", "127.0.0.1", "services"],
        [CMCTL, "services", "--server", "127.0.0.1"],
        [CMCTL, "up", "--listen", "127.0.0.1"],
        [CM_SIDECAR, "--server", "127.0.0.1", "--print-config"],
        [CM_SERVER, "--listen", "127.0.0.1"],
    ],
    ids=["cmctl-before", "cmctl-after", "cmctl-up", "cm-sidecar", "cm-server"],
)
def test_an_address_without_a_port_is_refused_everywhere(argv: list[str]) -> None:
    r = run(*argv)
    assert r.returncode == 2, r
    assert "is not HOST:PORT" in r.stderr
    assert "Traceback" not in r.stderr
    assert ":443" not in r.stderr + r.stdout  # never gRPC's https default


def test_an_address_without_a_port_in_the_environment_is_refused() -> None:
    r = run(CMCTL, "services", env=python_env(CLUSTERMAP_SERVER="127.0.0.1"))
    assert r.returncode == 2
    assert "'127.0.0.1' is not HOST:PORT" in r.stderr


# -- 3. a named config file that cannot be read --------------------------------------------------


def test_a_named_config_file_that_cannot_be_read_is_an_error(tmp_path: Path) -> None:
    missing, directory = tmp_path / "sidecra.toml", tmp_path
    for argv, env in (
        ([CM_SIDECAR, "--config", str(missing), "--print-config"], python_env()),
        ([CM_SIDECAR, "--config", str(directory), "--print-config"], python_env()),
        ([CM_SIDECAR, "--print-config"], python_env(CLUSTERMAP_CONFIG=str(missing))),
    ):
        r = run(*argv, env=env)
        assert r.returncode == 2, r
        line = one_line(r)
        assert line.startswith("cm-sidecar: cannot read config file "), line
        assert r.stdout == ""


# -- 8. --print-config masks the token -----------------------------------------------------------


def test_print_config_never_shows_the_token(tmp_path: Path) -> None:
    config = tmp_path / "s.toml"
    config.write_text('token = "file-s3cret"\n')
    for argv, env in (
        ([CM_SIDECAR, "--print-config"], python_env(CLUSTERMAP_TOKEN="env-s3cret")),
        ([CM_SIDECAR, "--config", str(config), "--print-config"], python_env()),
    ):
        r = run(*argv, env=env)
        assert r.returncode == 0, r.stderr
        assert "s3cret" not in r.stdout
        assert json.loads(r.stdout)["token"] == "***"


# -- 4. cm-server on a port in use ---------------------------------------------------------------


def test_cm_server_on_a_port_in_use_says_so_in_one_plain_line() -> None:
    server = ServerProc()
    try:
        r = run(CM_SERVER, "--listen", server.address)
    finally:
        server.close()
    assert r.returncode == 2
    assert one_line(r) == f"cm-server: cannot listen on {server.address}: address already in use"


# -- 5. a region that never synced ---------------------------------------------------------------

APP = """
import json, sys
sys.path.insert(0, sys.argv[1])
from example_app import app
status = []
body = app({"QUERY_STRING": "service=user-svc"}, lambda s, h: status.append(s))
print(json.dumps({"status": status[0], "body": json.loads(b"".join(body))}))
"""


def _app_answer(region: Path) -> dict[str, object]:
    r = run(
        sys.executable,
        "-c",
        APP,
        str(ROOT / "client"),
        env=python_env(CLUSTERMAP_REGION=str(region)),
    )
    assert r.returncode == 0, r.stderr
    answer: dict[str, object] = json.loads(r.stdout)
    return answer


def test_a_region_that_never_synced_is_unavailable_and_says_why(region_path: Path) -> None:
    with dead_address() as dead:  # a wrong server address
        sidecar = SidecarProc(region_path, [dead])
        try:
            wait_for(
                lambda: (m := sidecar.meta()) is not None and "no server answered" in m.reason,
                what="the sidecar to report its failed polls",
            )
            with pytest.raises(clustermap.RegionUnavailable, match="not synced yet") as err:
                clustermap.open(region_path).pick("user-svc")
            assert "no server answered" in str(err.value)
            assert dead in str(err.value)
            r = run(CMCTL, "--region", str(region_path), "pick", "user-svc")
            assert r.returncode == 1
            assert "the sidecar has not synced yet (no server answered" in one_line(r)
            answer = _app_answer(region_path)
            assert answer["status"] == "503 Service Unavailable", answer
            assert "not synced yet" in str(answer["body"])
        finally:
            sidecar.close()
    # with the sidecar gone too, the reason says so, as cmctl status does
    with pytest.raises(clustermap.RegionUnavailable, match="no sidecar is running"):
        clustermap.open(region_path).pick("user-svc")


def test_a_region_whose_server_is_warming_up_is_unavailable_and_says_so(region_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    server = Child([CM_SERVER, "--listen", address, "--warmup", "600"])
    sidecar = SidecarProc(region_path, [address])
    try:
        wait_for(
            lambda: (m := sidecar.meta()) is not None and "warming up" in m.reason,
            what="the sidecar to report the warm-up",
        )
        with pytest.raises(clustermap.RegionUnavailable, match="is warming up; no map from it"):
            clustermap.open(region_path).pick("user-svc")
        status = run(CMCTL, "--region", str(region_path), "status")
        assert "warming up" in status.stdout
    finally:
        sidecar.close()
        server.close()


def test_a_synced_region_still_calls_a_missing_service_unknown(region: Path) -> None:
    with pytest.raises(clustermap.UnknownService):
        clustermap.open(region).pick("nope")
    assert _app_answer(region)["status"] == "200 OK"
