"""Validation at the edge: every untrusted input becomes one of these pydantic models or an error.

The gRPC handlers build a model from the request before touching the registry, so an invalid
request changes nothing. :func:`reason` turns a :class:`pydantic.ValidationError` into the one-line
reason sent back with INVALID_ARGUMENT.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Final

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from clustermap.model import STATUSES, STRATEGIES
from clustermap.wire import MAX_WEIGHT

__all__ = [
    "MAX_META_BYTES",
    "MAX_META_ENTRIES",
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

MAX_SERVICE_NAME: Final = 128
MAX_HOST: Final = 253
MAX_META_ENTRIES: Final = 32
MAX_META_KEY: Final = 64
MAX_META_VALUE: Final = 512
MAX_META_BYTES: Final = 4096
MIN_TTL: Final = 0.1
MAX_TTL: Final = 3600.0

_SERVICE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LABEL_RE: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_META_KEY_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


def _service_name(value: str) -> str:
    if not value:
        raise ValueError("service name is empty")
    if len(value) > MAX_SERVICE_NAME:
        raise ValueError(f"service name longer than {MAX_SERVICE_NAME} characters")
    if not _SERVICE_RE.fullmatch(value):
        raise ValueError(
            f"service name {value!r} must be letters, digits, '.', '_' or '-' "
            "and start with a letter or digit"
        )
    return value


def _host(value: str) -> str:
    if not value:
        raise ValueError("host is empty")
    if len(value) > MAX_HOST:
        raise ValueError(f"host longer than {MAX_HOST} characters")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if not all(_LABEL_RE.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError(f"host {value!r} is neither an IP address nor a valid DNS name")
    return value.rstrip(".").lower()


def _meta(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_META_ENTRIES:
        raise ValueError(f"more than {MAX_META_ENTRIES} meta entries")
    total = 0
    for key, val in value.items():
        if not _META_KEY_RE.fullmatch(key) or len(key) > MAX_META_KEY:
            raise ValueError(
                f"meta key {key[:80]!r} must be 1-{MAX_META_KEY} letters, digits or '._/-'"
            )
        if len(val) > MAX_META_VALUE:
            raise ValueError(f"meta value of {key!r} longer than {MAX_META_VALUE} characters")
        total += len(key.encode()) + len(val.encode())
    if total > MAX_META_BYTES:
        raise ValueError(f"meta larger than {MAX_META_BYTES} bytes")
    return dict(sorted(value.items()))


def _ttl(value: float | None) -> float | None:
    if value is None or value == 0:
        return value
    if not math.isfinite(value) or not MIN_TTL <= value <= MAX_TTL:
        raise ValueError(f"ttl {value} outside {MIN_TTL}-{MAX_TTL} seconds (0: no expiry)")
    return value


ServiceName = Annotated[str, AfterValidator(_service_name)]
Host = Annotated[str, AfterValidator(_host)]
Port = Annotated[int, Field(ge=1, le=65535)]
Weight = Annotated[int, Field(ge=0, le=MAX_WEIGHT)]
Meta = Annotated[dict[str, str], AfterValidator(_meta)]

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
    ttl: Annotated[float | None, AfterValidator(_ttl)] = None


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
    meta: Meta = Field(default_factory=dict)

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"strategy {value!r} is not one of {', '.join(STRATEGIES)}")
        return value


def reason(exc: ValidationError) -> str:
    """One line naming each bad field and why (pydantic's wording, without its URL noise)."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "request"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)
