"""The console scripts: run a command, or say in one line which extra it needs.

``pip install clustermap`` is the worker side only (msgpack, xxhash). ``cm-server`` needs
``clustermap[server]``, ``cm-sidecar`` and cmctl's admin commands need ``clustermap[sidecar]``;
run without them, the import of grpc, protobuf, pydantic... fails, and instead of a traceback the
command prints what to install and exits with status 2. Stdlib only: this module is imported
before anything heavy.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Final

__all__ = ["cm_server", "cm_sidecar", "cmctl", "missing_extra"]

#: Top-level modules that come with an extra, and the distribution that provides each.
PROVIDED_BY: Final = {
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "google": "protobuf",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic",
    "pydantic_settings": "pydantic-settings",
    "prometheus_client": "prometheus-client",
}


def missing_extra(exc: ModuleNotFoundError, command: str, extra: str) -> str | None:
    """The line to print when ``exc`` is a module of ``extra`` missing; None otherwise."""
    top = (exc.name or "").partition(".")[0]
    dist = PROVIDED_BY.get(top)
    if dist is None:
        return None
    return (
        f"{command}: {dist} is not installed; this command needs the {extra!r} extra: "
        f"pip install 'clustermap[{extra}]'"
    )


def _run(command: str, extra: str, load: Callable[[], Callable[[], int]]) -> int:
    try:
        main = load()
        return main()
    except ModuleNotFoundError as exc:
        line = missing_extra(exc, command, extra)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2


def _main_of(module: str) -> Callable[[], Callable[[], int]]:
    def load() -> Callable[[], int]:
        main: Callable[[], int] = importlib.import_module(module).main
        return main

    return load


def cm_server() -> int:
    return _run("cm-server", "server", _main_of("clustermap.server.main"))


def cm_sidecar() -> int:
    return _run("cm-sidecar", "sidecar", _main_of("clustermap.sidecar.main"))


def cmctl() -> int:
    """Region commands (dump, status, pick) need nothing more; admin commands need grpc."""
    return _run("cmctl", "sidecar", _main_of("clustermap.cli.main"))
