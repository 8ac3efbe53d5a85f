"""uWSGI (from PyPI) with ``client/uwsgi.ini``: several processes, with and without
``lazy-apps``, and the sidecar run by uWSGI itself through the ini's ``attach-daemon2``.

uWSGI forks from C without Python's at-fork handlers; these tests prove the client still gives
every worker a correct, current view, and that uWSGI starts, respawns and stops the sidecar.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from clustermap.errors import ClusterMapError
from clustermap.region.reader import RegionReader
from tests.integration.e2e.web import USER_SVC, Uwsgi, assert_round_robin, children, first_seen
from tests.support.procs import wait_for
from tests.support.stack import ServerProc

NEW = "127.0.0.1:18004"
NEWER = "127.0.0.1:18005"


def writer_pid(region: Path) -> int:
    try:
        return RegionReader(region).writer_pid
    except ClusterMapError:  # not published yet
        return 0


@pytest.mark.parametrize("lazy", [False, True], ids=["preforked-app", "lazy-apps"])
def test_uwsgi_workers_and_attached_sidecar(
    server: ServerProc, region_path: Path, lazy: bool
) -> None:
    env = {
        "CLUSTERMAP_SERVER": server.address,
        "CLUSTERMAP_INTERVAL": "0.1",
        "CLUSTERMAP_BACKOFF_BASE": "0.1",
        "CLUSTERMAP_BACKOFF_MAX": "0.5",
    }
    assert not region_path.exists()  # only the sidecar uWSGI starts can publish it
    web = Uwsgi(region_path, *(["--lazy-apps"] if lazy else []), workers=3, env=env)
    try:
        web.wait_ready()
        sidecar = writer_pid(region_path)
        assert sidecar in children(web.child.pid), "the region's writer is not uWSGI's daemon"
        web.daemons.add(sidecar)

        answers = web.reach_all(n=6)
        workers = {a.pid for a in answers}
        assert len(workers) == 3
        loaded_by = {a.body["loaded_by"] for a in answers}  # the master, unless lazy-apps
        assert loaded_by == (workers if lazy else {web.child.pid}), loaded_by
        assert_round_robin(answers, set(USER_SVC))

        server.register("user-svc", "127.0.0.1", 18004)
        first_seen(web, time.monotonic(), lambda a: NEW in a.nodes, n=8)

        # The sidecar dies: uWSGI respawns it, and changes flow to the workers again.
        os.kill(sidecar, signal.SIGKILL)

        def respawned() -> int:
            web.alive()
            pid = writer_pid(region_path)
            return pid if pid != sidecar and pid in children(web.child.pid) else 0

        new_sidecar = wait_for(respawned, 30, "uWSGI to respawn the sidecar")
        web.daemons.add(new_sidecar)
        server.register("user-svc", "127.0.0.1", 18005)
        first_seen(web, time.monotonic(), lambda a: NEWER in a.nodes, n=8)
        assert_round_robin(web.reach_all(n=10), {*USER_SVC, NEW, NEWER})

        # Stopping uWSGI stops its sidecar, which leaves the region readable.
        assert web.stop() == 0
        wait_for(lambda: not _alive(new_sidecar), 30, "the sidecar to exit with uWSGI")
        assert {n.address for n in RegionReader(region_path).service("user-svc").nodes} == {
            *USER_SVC,
            NEW,
            NEWER,
        }
    finally:
        web.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
