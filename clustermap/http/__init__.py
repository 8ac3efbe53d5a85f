"""HTTP clients that resolve service names through the map (docs/http.md).

::

    import clustermap.http
    s = clustermap.http.Session()                            # a requests.Session
    s.get("http://user-svc/users/42")                        # user-svc: a service in the map
    httpx.Client(transport=clustermap.http.Transport())      # the same for httpx
    httpx.AsyncClient(transport=clustermap.http.AsyncTransport())

``Session`` needs ``requests`` (``pip install 'clustermap[http]'``), the transports need ``httpx``
(``pip install 'clustermap[httpx]'``); each is imported on first use of its name, so importing
this package costs neither. ``import clustermap`` imports none of this.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from clustermap.feedback.budget import BudgetRule
from clustermap.feedback.retries import RequestFailed
from clustermap.http._policy import (
    ATTEMPT_HEADER,
    FAILURE_STATUSES,
    IDEMPOTENT_METHODS,
    RETRY_STATUSES,
    Policy,
)

if TYPE_CHECKING:
    from clustermap.http._httpx import AsyncTransport, Transport
    from clustermap.http._requests import NodeAdapter, Session

__all__ = [
    "ATTEMPT_HEADER",
    "FAILURE_STATUSES",
    "IDEMPOTENT_METHODS",
    "RETRY_STATUSES",
    "AsyncTransport",
    "BudgetRule",
    "NodeAdapter",
    "Policy",
    "RequestFailed",
    "Session",
    "Transport",
]

_INSTALL = {
    "requests": "pip install 'clustermap[http]' (or add requests)",
    "httpx": "pip install 'clustermap[httpx]' (or add httpx)",
}
_WHERE = {
    "Session": ("clustermap.http._requests", "requests"),
    "NodeAdapter": ("clustermap.http._requests", "requests"),
    "Transport": ("clustermap.http._httpx", "httpx"),
    "AsyncTransport": ("clustermap.http._httpx", "httpx"),
}


def _available(lib: str) -> bool:
    try:
        return importlib.util.find_spec(lib) is not None
    except (ImportError, ValueError):  # blocked (sys.modules[lib] = None) or broken
        return False


if not any(_available(lib) for lib in _INSTALL):
    raise ImportError(
        "clustermap.http needs requests or httpx: "
        + "; ".join(f"for {lib}: {how}" for lib, how in _INSTALL.items())
    )


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'clustermap.http' has no attribute {name!r}")
    module, lib = where
    if not _available(lib):
        raise ImportError(f"clustermap.http.{name} needs {lib}: {_INSTALL[lib]}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
