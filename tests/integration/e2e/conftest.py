"""Fixtures of the end-to-end tests: a real cm-server with two services, a real cm-sidecar."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.e2e.web import PAYMENT_SVC, USER_SVC, hostport
from tests.support.stack import ServerProc, SidecarProc


@pytest.fixture
def server() -> Iterator[ServerProc]:
    """A real cm-server holding ``user-svc`` (3 equal nodes) and ``payment-svc`` (weights 3:1)."""
    s = ServerProc()
    try:
        for address in USER_SVC:
            s.register("user-svc", *hostport(address))
        for address, weight in PAYMENT_SVC.items():
            s.register("payment-svc", *hostport(address), weight=weight)
        yield s
    finally:
        s.close()


@pytest.fixture
def sidecar(server: ServerProc, region_path: Path) -> Iterator[SidecarProc]:
    """A real cm-sidecar publishing the server's map into ``region_path`` every 0.1 s."""
    sc = SidecarProc(region_path, [server.address], interval=0.1)
    try:
        sc.wait_synced()
        yield sc
    finally:
        sc.close()
