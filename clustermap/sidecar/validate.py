"""Validation of what the server sends, at the sidecar's edge.

``clustermap.wire`` already refuses malformed messages (unknown enums, ports and weights out of
range, duplicate nodes). This adds the registry's own limits — the ones cm-server enforces on
registration (``clustermap.server.validation``) — so that a buggy or hostile server cannot push
names, hosts or metadata into the region that no legitimate registration could have produced.

Service-level fields and metadata go through pydantic models. Host names are checked in bulk
with one compiled pattern over all of them: a full map has a million nodes, and a per-node
pydantic model costs ~2.5 µs each (2.5 s per full map); the bulk check costs ~50 ms.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from clustermap.model import Service
from clustermap.server.validation import MAX_META_ENTRIES, MAX_META_KEY, MAX_META_VALUE

__all__ = ["InvalidAnswer", "check_services", "invalid_services", "shown_name"]

_META = Annotated[
    dict[
        Annotated[
            str,
            StringConstraints(max_length=MAX_META_KEY, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"),
        ],
        Annotated[str, StringConstraints(max_length=MAX_META_VALUE)],
    ],
    Field(max_length=MAX_META_ENTRIES),
]


class _ServiceIn(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True, extra="ignore")
    name: Annotated[
        str,
        StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"),
    ]
    strategy: Literal["round_robin", "random", "weighted", "consistent_hash"]
    panic_threshold: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    meta: _META


_SERVICES: Final = TypeAdapter(list[_ServiceIn])
_NODE_META: Final = TypeAdapter(_META)
# An IP literal or a DNS name (the registry's rules, loosened to one character class).
_HOST: Final = r"[A-Za-z0-9:][A-Za-z0-9:.%-]{0,252}"
_HOSTS: Final = re.compile(rf"(?:{_HOST}\n)*")
_ONE_HOST: Final = re.compile(_HOST)


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
    hosts = "".join(n.host + "\n" for s in services for n in s.nodes)
    if not _HOSTS.fullmatch(hosts):
        _find_bad_host(services)
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


_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def shown_name(name: str) -> str:
    """``name`` as it may be printed to an operator: itself when valid, else quoted and escaped
    (a hostile name must not rewrite a terminal)."""
    return name if _NAME.fullmatch(name) else ascii(name[:80])


def _find_bad_host(services: Sequence[Service]) -> None:
    for s in services:
        for n in s.nodes:
            if not _ONE_HOST.fullmatch(n.host):
                raise InvalidAnswer(f"service {s.name!r}: node host {n.host[:80]!r} is not valid")


def _check_meta(service: str, node: str, meta: Mapping[str, str]) -> None:
    try:
        _NODE_META.validate_python(dict(meta))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidAnswer(
            f"service {service!r} node {node[:80]}: meta {_where(err['loc'])}: {err['msg']}"
        ) from None


def _where(loc: Sequence[object]) -> str:
    return ".".join(str(p) for p in loc) or "value"
