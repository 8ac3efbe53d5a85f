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

``GET /call?service=user-svc&path=/users/42`` calls the service through
``clustermap.http.Session`` (one per process, made at import: it is fork-safe) and answers
``{"pid", "service", "status", "body"}`` with the backend's status and text; a request that
failed on every node it was allowed to try answers 502 with ``"tried"``. (Needs ``requests``:
``pip install 'clustermap[http]'``; without it ``/call`` answers 501.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import clustermap

try:
    import requests

    import clustermap.http

    #: Module level on purpose: made once (in gunicorn's master with preload_app), its pools are
    #: renewed in each worker after the fork, and it is safe to share between threads/greenlets.
    SESSION: clustermap.http.Session | None = clustermap.http.Session()
    NO_SESSION = ""
except ImportError as exc:  # the http extra is not installed: only /call is unavailable
    SESSION = None
    NO_SESSION = str(exc)

DEFAULT_SERVICE = os.environ.get("CLUSTERMAP_EXAMPLE_SERVICE", "user-svc")
MAX_PICKS = 100
#: The process that imported this module: with gunicorn's preload_app (or uWSGI without
#: lazy-apps) the master, else each worker. Answered as ``loaded_by`` to show which applies.
LOADED_BY = os.getpid()

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    service = query.get("service", DEFAULT_SERVICE)
    if environ.get("PATH_INFO") == "/call":
        return _call(start_response, service, query.get("path", "/"))
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


def _call(start_response: StartResponse, service: str, path: str) -> list[bytes]:
    """One call to ``service`` through the map: a picked node, retried elsewhere if need be."""
    if SESSION is None:
        return _answer(start_response, "501 Not Implemented", {"error": NO_SESSION})
    if not path.startswith("/"):
        return _answer(start_response, "400 Bad Request", {"error": "path must start with /"})
    try:
        r = SESSION.get(f"http://{service}{path}", timeout=5)
    except requests.RequestException as exc:
        tried = list(getattr(exc, "tried", ()))
        return _answer(start_response, "502 Bad Gateway", {"error": str(exc), "tried": tried})
    except clustermap.ClusterMapError as exc:  # e.g. every node of the service is down
        return _answer(start_response, "503 Service Unavailable", {"error": str(exc)})
    body = {"pid": os.getpid(), "service": service, "status": r.status_code, "body": r.text}
    return _answer(start_response, "200 OK", body)


def _answer(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    start_response(status, headers)
    return [data]


# uWSGI's default callable name; gunicorn is pointed at ``example_app:app``.
application = app
