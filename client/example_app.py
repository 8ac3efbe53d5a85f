"""A WSGI app that answers each request with the backend ``clustermap.pick`` chose.

Copy the pattern, not the app: ``import clustermap`` at module level (with ``preload_app`` the
master imports it once before forking; the client is fork-safe, so no hook is needed) and one
``clustermap.pick(...)`` per outgoing call, inside the request. Nothing is cached by the app:
the client already caches the decoded map per process and notices every change by itself.

``GET /?service=user-svc&key=u:42&strategy=weighted&n=4`` answers JSON::

    {"pid": 1234, "service": "user-svc", "node": "127.0.0.1:8001",
     "picks": ["127.0.0.1:8001", ...], "nodes": ["127.0.0.1:8001", ...], "loaded_by": 1200}

``picks`` are ``n`` consecutive picks (default 1) of this worker; ``nodes`` the healthy nodes
as this worker sees them. The region is ``$CLUSTERMAP_REGION``; the default service is
``$CLUSTERMAP_EXAMPLE_SERVICE`` or ``user-svc``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import clustermap

DEFAULT_SERVICE = os.environ.get("CLUSTERMAP_EXAMPLE_SERVICE", "user-svc")
MAX_PICKS = 100
#: The process that imported this module: with gunicorn's preload_app (or uWSGI without
#: lazy-apps) the master, else each worker. Answered as ``loaded_by`` to show which applies.
LOADED_BY = os.getpid()

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    service = query.get("service", DEFAULT_SERVICE)
    try:
        n = min(max(int(query.get("n", "1")), 1), MAX_PICKS)
        picks = [
            clustermap.pick(service, query.get("key"), query.get("strategy")).address
            for _ in range(n)
        ]
        nodes = [node.address for node in clustermap.nodes(service)]
    except (ValueError, TypeError) as exc:  # a bad ?n=, an unknown ?strategy=, a hash without key
        return _answer(start_response, "400 Bad Request", {"error": str(exc)})
    except clustermap.UnknownService as exc:
        return _answer(start_response, "404 Not Found", {"error": str(exc)})
    except clustermap.ClusterMapError as exc:  # no node, or no region yet: the sidecar is not up
        return _answer(start_response, "503 Service Unavailable", {"error": str(exc)})
    body = {"pid": os.getpid(), "service": service, "node": picks[0], "picks": picks}
    body.update(nodes=nodes, loaded_by=LOADED_BY)
    return _answer(start_response, "200 OK", body)


def _answer(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    start_response(status, headers)
    return [data]


# uWSGI's default callable name; gunicorn is pointed at ``example_app:app``.
application = app
