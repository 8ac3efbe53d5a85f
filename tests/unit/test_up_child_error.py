"""``cmctl up`` reports a child's own one-line error, not whatever the child logged after it."""

from __future__ import annotations

import sys

import pytest

from clustermap.cli.up import _Child
from clustermap.errors import ClusterMapError

_ERROR = "print('cm-sidecar: /dev/shm/x.region: busy: another writer (pid 1)', file=sys.stderr)\n"
# what gRPC's C core may log while the process exits
_NOISE = "print('E1130 19:46:59.153635 1 ev_epoll1_linux.cc:373] epoll_wait', file=sys.stderr)\n"


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        (_ERROR + _NOISE, "/dev/shm/x.region: busy: another writer (pid 1)"),
        ("print('Segmentation fault', file=sys.stderr)\n", "Segmentation fault"),  # no own line
    ],
)
def test_a_failed_start_is_reported_by_the_childs_own_error_line(stderr: str, reason: str) -> None:
    child = _Child("cm-sidecar", [sys.executable, "-c", "import sys\n" + stderr + "sys.exit(2)"])
    child.proc.wait(30)
    try:
        with pytest.raises(ClusterMapError) as err:
            child.check_alive()
    finally:
        child.stop()
    assert str(err.value) == f"cm-sidecar did not start: {reason}"
