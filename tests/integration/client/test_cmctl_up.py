"""``cmctl up --demo``: the README's local stack, as a user runs it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clustermap.region.reader import RegionReader
from tests.support.procs import Child, python_env, wait_for
from tests.support.stack import CMCTL, ServerProc, SidecarProc, free_port


def test_up_serves_a_usable_map_and_stops_cleanly_on_ctrl_c(region_path: Path) -> None:
    env = python_env(CLUSTERMAP_REGION=str(region_path))
    port = free_port()
    with Child([CMCTL, "up", "--demo", "--listen", f"127.0.0.1:{port}"], env=env) as up:
        ready = up.expect("cmctl up:", timeout=60)
        assert str(region_path) in ready
        dump = json.loads(
            subprocess.run(
                [CMCTL, "dump", "--json"], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
        assert set(dump["services"]) == {"user-svc", "payment-svc", "session-cache"}
        assert dump["stale"] is False
        pick = subprocess.run(
            [sys.executable, "-c", "import clustermap; print(clustermap.pick('user-svc').address)"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert pick.stdout.strip().startswith("127.0.0.1:800")
        up.proc.send_signal(signal.SIGINT)
        assert up.wait(timeout=20) == 0
    status = json.loads(
        subprocess.run(
            [CMCTL, "status", "--json"], env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    assert status["writer_alive"] is False  # stopped, and the map is still readable
    assert status["services"] == 3


def test_up_refuses_a_port_another_server_holds_before_registering_anything(
    region_path: Path,
) -> None:
    other = ServerProc()
    try:
        env = python_env(CLUSTERMAP_REGION=str(region_path))
        r = subprocess.run(
            [CMCTL, "up", "--demo", "--listen", other.address],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1
        assert r.stdout == ""  # no banner
        assert r.stderr.strip() == (
            f"cmctl: cm-server did not start: cannot listen on {other.address}: address already "
            "in use; stop what listens there, or pass another --listen HOST:PORT"
        )
        services = subprocess.run(
            [CMCTL, "--server", other.address, "services", "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(services.stdout)["services"] == {}  # nothing registered into it
        assert not region_path.exists()
    finally:
        other.close()


def test_up_refuses_a_region_another_sidecar_writes_before_registering_anything(
    region_path: Path,
) -> None:
    other_server = ServerProc()
    other = SidecarProc(region_path, [other_server.address])
    try:
        other.wait_synced(revision=0)
        port = free_port()
        r = subprocess.run(
            [CMCTL, "up", "--demo", "--listen", f"127.0.0.1:{port}"],
            env=python_env(CLUSTERMAP_REGION=str(region_path)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1
        assert r.stdout == ""
        line = r.stderr.strip()
        assert "\n" not in line, line
        assert line.startswith(
            f"cmctl: cm-sidecar did not start: {region_path}: busy: another writer"
        )
        assert line.endswith("stop that sidecar, or pass another --region PATH")
        assert RegionReader(region_path).names() == []  # the demo never reached the region
    finally:
        other.close()
        other_server.close()


def test_the_banner_hints_work_as_printed_in_a_new_shell(region_path: Path) -> None:
    env = python_env(CLUSTERMAP_REGION=str(region_path))
    env.pop("UV", None)  # not started by `uv run`: the hints name this environment's programs
    with Child([CMCTL, "up", "--demo", "--listen", f"127.0.0.1:{free_port()}"], env=env) as up:
        up.expect("cmctl up:", timeout=120)
        up.expect("  try, in another shell")
        hints = [up.readline().strip(), up.readline().strip()]
        for hint in hints:
            # a new login shell: none of this test's environment
            r = subprocess.run(
                ["env", "-i", "PATH=/usr/bin:/bin", "bash", "-c", hint],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, (hint, r.stderr)
        assert r.stdout.startswith("127.0.0.1:800"), r.stdout
        up.proc.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0


def test_the_banner_names_uv_run_when_started_by_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from clustermap.cli.up import _banner

    monkeypatch.setenv("UV", "/opt/uv/bin/uv")
    monkeypatch.setenv("PATH", str(tmp_path))  # no uv on PATH: the hint names the binary
    text = _banner("127.0.0.1:7700", "/dev/shm/clustermap/default.region")
    assert "    /opt/uv/bin/uv run cmctl dump\n" in text
    assert "CLUSTERMAP_REGION" not in text  # the default region needs no variable
    (tmp_path / "uv").write_text("#!/bin/sh\n")
    (tmp_path / "uv").chmod(0o755)
    text = _banner("127.0.0.1:7700", "/dev/shm/r.region")
    assert "    CLUSTERMAP_REGION=/dev/shm/r.region uv run cmctl dump\n" in text


def test_up_killed_outright_takes_its_server_and_sidecar_with_it(region_path: Path) -> None:
    from clustermap.region.election import writer_running

    port = free_port()
    env = python_env(CLUSTERMAP_REGION=str(region_path))
    with Child([CMCTL, "up", "--listen", f"127.0.0.1:{port}"], env=env) as up:
        up.expect("cmctl up:", timeout=120)
        assert writer_running(str(region_path)) is True
        up.proc.kill()  # SIGKILL: no chance to stop its children itself
        up.proc.wait()
    wait_for(lambda: writer_running(str(region_path)) is False, what="the sidecar to exit")

    def port_free() -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # only a listener blocks it
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    wait_for(port_free, what="the server to exit")
