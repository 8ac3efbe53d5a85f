"""A WSGI app for the least_request test: each request calls one backend of ``backend`` through
``clustermap.call`` and answers with the node it used (gunicorn loads it from this directory)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import clustermap


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    strategy = parse_qs(environ.get("QUERY_STRING", "")).get("strategy", ["round_robin"])[0]
    with (
        clustermap.call("backend", strategy=strategy) as node,
        urllib.request.urlopen(f"http://{node.address}/", timeout=5) as resp,
    ):
        resp.read()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"node": node.address}).encode()]
