"""``cmctl up --demo``: the README's local stack, as a user runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.procs import Child, python_env
from tests.support.stack import CMCTL, free_port


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
