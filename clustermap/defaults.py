"""The one home of ClusterMap's default addresses and paths.

cm-server, cm-sidecar, cmctl and the worker-side client all import their defaults from here, so
they agree without any part importing another to borrow a constant. Pure constants: cheap
enough for the worker-side import. ``tests/unit/test_one_home.py`` fails when one of these
literals reappears elsewhere in the package.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_REGION", "DEFAULT_SERVER"]

#: cm-server's ``--listen`` and the address cm-sidecar and cmctl dial (``$CLUSTERMAP_SERVER``).
DEFAULT_SERVER: Final = "127.0.0.1:7700"
#: The region the sidecar publishes and workers read (``$CLUSTERMAP_REGION``).
DEFAULT_REGION: Final = "/dev/shm/clustermap/default.region"
