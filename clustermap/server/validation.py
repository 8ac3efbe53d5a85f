"""Validation at the edge: every untrusted input becomes one of these pydantic models or an error.

The gRPC handlers build a model from the request before touching the registry, so an invalid
request changes nothing. :func:`reason` turns a :class:`pydantic.ValidationError` into the one-line
reason sent back with INVALID_ARGUMENT. The rules themselves (names, hosts, metadata, TTLs) live
in :mod:`clustermap.rules`, shared with the sidecar and cmctl; this module wraps them in models.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from clustermap.model import STATUSES, STRATEGIES
from clustermap.rules import (
    MAX_META_BYTES,
    MAX_META_ENTRIES,
    MAX_PORT,
    MAX_SERVICE_NAME,
    MAX_TTL,
    MAX_WEIGHT,
    MIN_TTL,
    check_host,
    check_meta,
    check_service_meta,
    check_service_name,
    check_slow_start,
    check_ttl,
)

__all__ = [
    "MAX_META_BYTES",
    "MAX_META_ENTRIES",
    "MAX_SERVICE_NAME",
    "MAX_TTL",
    "MAX_WEIGHT",
    "MIN_TTL",
    "NodeAddress",
    "NodeUpdate",
    "Registration",
    "ServiceOptions",
    "ValidationError",
    "reason",
]


ServiceName = Annotated[str, AfterValidator(check_service_name)]
Host = Annotated[str, AfterValidator(check_host)]
Port = Annotated[int, Field(ge=1, le=MAX_PORT)]
Weight = Annotated[int, Field(ge=0, le=MAX_WEIGHT)]
Meta = Annotated[dict[str, str], AfterValidator(check_meta)]

_STRICT = ConfigDict(frozen=True, extra="forbid", strict=True)


class NodeAddress(BaseModel):
    """A node's identity: (service, host, port)."""

    model_config = _STRICT

    service: ServiceName
    host: Host
    port: Port


class Registration(NodeAddress):
    """Register: the node's address plus weight, meta and TTL (None: server default)."""

    weight: Weight = 1
    meta: Meta = Field(default_factory=dict)
    ttl: Annotated[float | None, AfterValidator(check_ttl)] = None


class NodeUpdate(NodeAddress):
    """UpdateNode: an operator's weight and/or status override (None: unchanged)."""

    weight: Weight | None = None
    status: str | None = None

    @field_validator("status")
    @classmethod
    def _status(cls, value: str | None) -> str | None:
        if value is not None and value not in STATUSES:
            raise ValueError(f"status {value!r} is not one of {', '.join(STATUSES)}")
        return value


class ServiceOptions(BaseModel):
    """Per-service options (from the clusters file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: str = "round_robin"
    panic_threshold: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    meta: Annotated[dict[str, str], AfterValidator(check_service_meta)] = Field(
        default_factory=dict
    )

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"strategy {value!r} is not one of {', '.join(STRATEGIES)}")
        return value

    @field_validator("meta")
    @classmethod
    def _slow_start(cls, value: dict[str, str]) -> dict[str, str]:
        check_slow_start(value)  # slow_start=WINDOW and its options (docs/slow-start.md)
        return value


def reason(exc: ValidationError) -> str:
    """One line naming each bad field and why (pydantic's wording, without its URL noise)."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "request"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)
