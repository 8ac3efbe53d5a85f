"""Validation of what the server sends, at the sidecar's edge.

``clustermap.wire`` already refuses malformed messages (unknown enums, ports and weights out of
range, duplicate nodes). This adds the registry's own limits — the ones cm-server enforces on
registration (:mod:`clustermap.rules`, their one home) — so that a buggy or hostile server cannot
push names, hosts or metadata into the region that no legitimate registration could have produced.

Service-level fields go through pydantic models, metadata through
:func:`~clustermap.rules.check_meta` (once per distinct meta set). Host names are checked in bulk by
:func:`~clustermap.rules.first_bad_host` (one compiled pattern over all of them, then a closer
look at IPv6 literals): a full map has a million nodes, and a per-node pydantic model costs
~2.5 µs each (2.5 s per full map). A host is accepted exactly when the server would have
registered it unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from clustermap import rules
from clustermap.model import Service

__all__ = ["InvalidAnswer", "check_services", "invalid_services", "shown_name"]

_META = Annotated[dict[str, str], AfterValidator(rules.check_meta)]


class _ServiceIn(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True, extra="ignore")
    name: Annotated[
        str,
        StringConstraints(
            min_length=1,
            max_length=rules.MAX_SERVICE_NAME,
            pattern=rf"^{rules.SERVICE_NAME_PATTERN}$",
        ),
    ]
    strategy: Literal["round_robin", "random", "weighted", "consistent_hash"]
    panic_threshold: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    meta: Annotated[dict[str, str], AfterValidator(rules.check_service_meta)]

    @field_validator("meta")
    @classmethod
    def _slow_start(cls, value: dict[str, str]) -> dict[str, str]:
        rules.check_slow_start(value)  # the server's rule (docs/slow-start.md)
        return value


_SERVICES: Final = TypeAdapter(list[_ServiceIn])


class InvalidAnswer(ValueError):
    """The server sent a service the registry could never have accepted."""


def check_services(services: Sequence[Service]) -> None:
    """Raise :class:`InvalidAnswer` (one line, naming the first bad field) if any is invalid."""
    try:
        _SERVICES.validate_python(services, from_attributes=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        index = err["loc"][0]
        name = services[index].name if isinstance(index, int) else "?"
        raise InvalidAnswer(
            f"service {name[:80]!r}: {_where(err['loc'][1:])}: {err['msg']}"
        ) from None
    bad = rules.first_bad_host(n.host for s in services for n in s.nodes)
    if bad is not None:
        _find_bad_host(services, *bad)
    seen: set[tuple[tuple[str, str], ...]] = set()  # nodes share a few meta sets (zones, ...)
    for s in services:
        for n in s.nodes:
            if n.meta:
                items = tuple(n.meta.items())
                if items not in seen:
                    _check_meta(s.name, n.address, n.meta)
                    seen.add(items)


def invalid_services(services: Sequence[Service]) -> dict[str, str]:
    """Every service that :func:`check_services` would refuse, with its reason (one line).

    The whole answer is checked at once first; only when that fails is each service checked on
    its own, so the common case costs no more than before."""
    try:
        check_services(services)
    except InvalidAnswer:
        pass
    else:
        return {}
    bad: dict[str, str] = {}
    for s in services:
        try:
            check_services((s,))
        except InvalidAnswer as exc:
            bad[s.name] = str(exc)
    return bad


_NAME: Final = re.compile(rules.SERVICE_NAME_PATTERN)


def shown_name(name: str) -> str:
    """``name`` as it may be printed to an operator: itself when valid, else quoted and escaped
    (a hostile name must not rewrite a terminal)."""
    ok = len(name) <= rules.MAX_SERVICE_NAME and _NAME.fullmatch(name)
    return name if ok else ascii(name[:80])


def _find_bad_host(services: Sequence[Service], host: str, why: str) -> None:
    for s in services:
        if any(n.host == host for n in s.nodes):
            raise InvalidAnswer(f"service {s.name!r}: node {why}")


def _check_meta(service: str, node: str, meta: Mapping[str, str]) -> None:
    try:
        rules.check_meta(meta)
    except ValueError as exc:
        raise InvalidAnswer(f"service {service!r} node {node[:80]}: {exc}") from None


def _where(loc: Sequence[object]) -> str:
    return ".".join(str(p) for p in loc) or "value"
