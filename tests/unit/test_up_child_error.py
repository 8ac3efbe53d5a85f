"""``cmctl up`` reports a child's own one-line error, not whatever the child logged after it."""

from __future__ import annotations

import sys

import pytest

from clustermap.cli.up import _Child
from clustermap.errors import ClusterMapError

# A child that fails with its one-line error, then (as gRPC's C core may while the process
# exits) logs another line.
_SCRIPT = (
    "import sys\n"
    "print('cm-sidecar: /dev/shm/x.region: busy: another writer (pid 1)', file=sys.stderr)\n"
    "print('E1130 19:46:59.153635 1 ev_epoll1_linux.cc:373] epoll_wait error', file=sys.stderr)\n"
    "sys.exit(2)\n"
)


def test_the_childs_own_error_line_wins_over_later_noise() -> None:
    child = _Child("cm-sidecar", [sys.executable, "-c", _SCRIPT])
    child.proc.wait(30)
    try:
        with pytest.raises(ClusterMapError) as err:
            child.check_alive()
    finally:
        child.stop()
    assert str(err.value) == (
        "cm-sidecar did not start: /dev/shm/x.region: busy: another writer (pid 1)"
    )


def test_without_an_error_line_the_last_line_is_shown() -> None:
    script = "import sys\nprint('Segmentation fault', file=sys.stderr)\nsys.exit(139)\n"
    child = _Child("cm-sidecar", [sys.executable, "-c", script])
    child.proc.wait(30)
    try:
        with pytest.raises(ClusterMapError) as err:
            child.check_alive()
    finally:
        child.stop()
    assert str(err.value) == "cm-sidecar did not start: Segmentation fault"
