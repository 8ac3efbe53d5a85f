"""Static clusters: the ``--clusters FILE.toml`` format, parsed and validated.

::

    [clusters.user-svc]                # one table per service
    strategy = "weighted"              # optional service options
    panic_threshold = 0.5
    meta = { team = "identity" }
    nodes = [
      { host = "10.0.0.1", port = 8080, weight = 2, meta = { zone = "a" } },
      "10.0.0.2:8080",                 # shorthand: weight 1, no meta
    ]
    [clusters.user-svc.probe]          # optional; defaults shown
    type = "tcp"                       # "tcp" (connect) or "http" (GET path, 2xx/3xx is up)
    path = "/"                         # http only
    interval = 2.0                     # seconds between probes of one node
    timeout = 1.0
    rise = 2                           # consecutive successes to go down → up
    fall = 3                           # consecutive failures to go up → down

A service listed here without nodes only sets options for nodes that register into it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from clustermap.model import parse_address
from clustermap.server.registry import StaticNode
from clustermap.server.validation import (
    Host,
    Meta,
    Port,
    ServiceName,
    ServiceOptions,
    Weight,
    reason,
)

__all__ = ["Cluster", "ClustersError", "ProbeSpec", "load_clusters"]


class ClustersError(Exception):
    """The clusters file is unreadable or invalid; the message says where."""


class ProbeSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["tcp", "http"] = "tcp"
    path: str = "/"
    interval: Annotated[float, Field(ge=0.05, le=3600, allow_inf_nan=False)] = 2.0
    timeout: Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)] = 1.0
    rise: Annotated[int, Field(ge=1, le=100)] = 2
    fall: Annotated[int, Field(ge=1, le=100)] = 3

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError("path must start with '/' and contain no whitespace")
        return value


class _Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: Host
    port: Port
    weight: Weight = 1
    meta: Meta = Field(default_factory=dict)


class _Cluster(ServiceOptions):
    nodes: list[_Node | str] = Field(default_factory=list)
    probe: ProbeSpec = Field(default_factory=ProbeSpec)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clusters: dict[ServiceName, _Cluster] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Cluster:
    """One validated static cluster."""

    name: str
    options: ServiceOptions
    nodes: tuple[StaticNode, ...]
    probe: ProbeSpec


def _parse_node(item: _Node | str) -> _Node:
    if isinstance(item, _Node):
        return item
    try:
        host, port = parse_address(item, check_port=False)  # _Node checks the port's range
    except ValueError:
        raise ValueError(f"node {item!r} is not HOST:PORT") from None
    return _Node(host=host, port=port)


def load_clusters(path: str | Path) -> list[Cluster]:
    """Read and validate a clusters file; :class:`ClustersError` with the reason otherwise."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ClustersError(f"{path}: {exc}") from None
    try:
        parsed = _File.model_validate(raw)
        result = []
        for name, c in parsed.clusters.items():
            nodes = [_parse_node(n) for n in c.nodes]
            keys = [(n.host, n.port) for n in nodes]
            if len(set(keys)) != len(keys):
                raise ClustersError(f"{path}: cluster {name!r} lists a node twice")
            result.append(
                Cluster(
                    name=name,
                    options=ServiceOptions(
                        strategy=c.strategy, panic_threshold=c.panic_threshold, meta=c.meta
                    ),
                    nodes=tuple(StaticNode(n.host, n.port, n.weight, n.meta) for n in nodes),
                    probe=c.probe,
                )
            )
        return result
    except ValidationError as exc:
        raise ClustersError(f"{path}: {reason(exc)}") from None
    except ValueError as exc:
        raise ClustersError(f"{path}: {exc}") from None
