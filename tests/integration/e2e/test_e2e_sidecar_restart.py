"""The sidecar restarted (SIGTERM, then SIGKILL) under a steady stream of requests to gunicorn:
workers read the region without the sidecar, so no request may fail because of it."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from tests.integration.e2e.web import USER_SVC, Answer, Gunicorn, first_seen, get
from tests.support.procs import wait_for
from tests.support.stack import ServerProc, SidecarProc


class Stream:
    """Client threads each sending a request every few milliseconds until stopped (a steady
    load that leaves the 2-core CI machine room to start sidecars); every answer is kept."""

    def __init__(self, port: int, clients: int = 2, pause: float = 0.005) -> None:
        self.pause = pause
        self.port = port
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.pause):
            self.answers.append(get(self.port, n=3))

    def stop(self) -> list[Answer]:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        return self.answers

    def count(self) -> int:
        return len(self.answers)


def test_sidecar_restarts_fail_no_request(server: ServerProc, region_path: Path) -> None:
    sidecar = SidecarProc(region_path, [server.address])
    web = Gunicorn(region_path, "sync", workers=2, preload=True)
    stream: Stream | None = None
    try:
        sidecar.wait_synced()
        web.wait_ready()
        stream = Stream(web.port)
        for sig, backend in ((signal.SIGTERM, 18004), (signal.SIGKILL, 18005)):
            served = stream.count()
            rc = sidecar.child.kill(sig)
            assert rc == (0 if sig == signal.SIGTERM else -signal.SIGKILL), sidecar.child.stderr()
            # While no sidecar runs: the server changes, workers keep serving the last map.
            revision = server.register("user-svc", "127.0.0.1", backend).revision
            sidecar = SidecarProc(region_path, [server.address])
            sidecar.wait_synced(revision)
            first_seen(web, time.monotonic(), lambda a, b=backend: f"127.0.0.1:{b}" in a.nodes)
            wait_for(lambda s=served: stream.count() > s, what="the stream to go on")
        wait_for(lambda: stream.count() >= 20, what="20 answers in the stream")
        answers = stream.stop()
        stream = None
        failed = [a for a in answers if not a.ok]
        assert not failed, failed[:5]
        assert len(answers) >= 20, len(answers)
        valid = {*USER_SVC, "127.0.0.1:18004", "127.0.0.1:18005"}
        assert all(set(a.body["picks"]) <= valid and a.nodes <= valid for a in answers)
    finally:
        if stream is not None:
            stream.stop()
        web.close()
        sidecar.close()
