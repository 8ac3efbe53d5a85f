"""What a valid registration is: the one home of the rules for names, hosts, metadata and TTLs.

cm-server enforces these rules on every registration (``clustermap.server.validation``), every
sidecar re-checks what the server sends with the same functions (``clustermap.sidecar.validate``)
and cmctl applies them before it sends anything. Because the three share this module, the server
never accepts a record that sidecars refuse: a record that sidecars refuse would freeze that
service's map on every machine.

Pure functions and constants only (no grpc, protobuf or pydantic), cheap enough for a worker-side
import. Each ``check_*`` returns the canonical value or raises :class:`ValueError` with a
one-line reason that never echoes more than :data:`ECHO` characters of the input.

Hosts are an IP address (canonical text: IPv4 dotted quad, IPv6 compressed lower case) or a DNS
name (LDH labels, lower case, no trailing dot, not all digits in the last label). An IPv6 zone
id (``fe80::1%eth0``) is 1-15 letters, digits, ``_``, ``.`` or ``-`` (Linux interface names are at
most 15 bytes; Windows zone ids are numbers): no control characters, spaces, ``%`` or ``/``.

Text in metadata may be any Unicode except characters that rewrite a terminal or reorder what an
operator reads: C0/C1 controls (NUL, ESC, newline, DEL...), the bidirectional overrides and
isolates (U+202A-U+202E, U+2066-U+2069, U+200E/F, U+061C), line/paragraph separators and lone
surrogates.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from typing import Final, NamedTuple

__all__ = [
    "ECHO",
    "LOOSE_HOST_PATTERN",
    "MAX_HOST",
    "MAX_META_BYTES",
    "MAX_META_ENTRIES",
    "MAX_META_KEY",
    "MAX_META_VALUE",
    "MAX_PORT",
    "MAX_SERVICE_NAME",
    "MAX_SLOW_START_S",
    "MAX_TTL",
    "MAX_WEIGHT",
    "MAX_ZONE_ID",
    "MAX_ZONE_NAME",
    "META_KEY_PATTERN",
    "MIN_TTL",
    "SERVICE_NAME_PATTERN",
    "SLOW_START_AGGRESSION",
    "SLOW_START_MIN_WEIGHT_PERCENT",
    "SUBSET_FALLBACKS",
    "ZONE_ID_PATTERN",
    "ZONE_META",
    "ZONE_MIN_CLUSTER_SIZE",
    "ZONE_MIN_HEALTHY",
    "Routing",
    "SlowStartConfig",
    "check_host",
    "check_meta",
    "check_routing",
    "check_service_meta",
    "check_service_name",
    "check_slow_start",
    "check_ttl",
    "check_zone",
    "clip",
    "first_bad_host",
    "meta_bytes",
    "printable",
    "unsafe_char",
]

MAX_SERVICE_NAME: Final = 128
MAX_HOST: Final = 253
MAX_ZONE_ID: Final = 15
#: A machine's zone (``cm-sidecar --zone``): a name as a meta key is spelled.
MAX_ZONE_NAME: Final = 64
MAX_META_ENTRIES: Final = 32
MAX_META_KEY: Final = 64
MAX_META_VALUE: Final = 512
#: Keys plus values of one node's (or service's) metadata, UTF-8 encoded.
MAX_META_BYTES: Final = 4096
MIN_TTL: Final = 0.1
#: Ports are 1-MAX_PORT (0, "any free port", only where we listen).
MAX_PORT: Final = 65535
#: Largest node weight the protocol allows (the server rejects more; decoders reject more).
MAX_WEIGHT: Final = 65535
MAX_TTL: Final = 3600.0
#: At most this many characters of a rejected input appear in an error message.
ECHO: Final = 80

SERVICE_NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._-]*"
META_KEY_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._/-]*"
ZONE_ID_PATTERN: Final = rf"[A-Za-z0-9_.-]{{1,{MAX_ZONE_ID}}}"

_SERVICE_RE: Final = re.compile(SERVICE_NAME_PATTERN)
_META_KEY_RE: Final = re.compile(META_KEY_PATTERN)
_ZONE_RE: Final = re.compile(ZONE_ID_PATTERN)
_LABEL_RE: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_UNSAFE_RE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)
#: What sidecars check every host against, in bulk: the shape of a canonical host (lower-case
#: DNS name or IPv4, lower-case IPv6 with an optional zone id) with exactly the characters the
#: rules allow. Every host the server registers matches it; a host with a character the rules
#: forbid (controls, spaces, upper case, '%' outside a zone id...) never does. The structure of
#: labels and addresses is left to check_host: exact per-host checks cost ~2 µs per node, 2 s
#: for a million-node map, against ~0.5 s for this one pass.
LOOSE_HOST_PATTERN: Final = (
    rf"[a-z0-9][a-z0-9.-]{{0,{MAX_HOST - 1}}}"
    rf"|(?=[0-9a-f.]{{0,44}}:)[0-9a-f:][0-9a-f:.]{{1,44}}(?:%{ZONE_ID_PATTERN})?"
)
_LOOSE_HOSTS: Final = re.compile(rf"(?:(?:{LOOSE_HOST_PATTERN})\n)*")
_LOOSE_ONE: Final = re.compile(LOOSE_HOST_PATTERN)


def clip(text: str) -> str:
    """``text`` as a quoted repr of at most :data:`ECHO` characters, for error messages."""
    return repr(text[:ECHO]) + ("..." if len(text) > ECHO else "")


def unsafe_char(text: str) -> str | None:
    """The first control, bidi or separator character in ``text`` (``U+XXXX``), or None."""
    m = _UNSAFE_RE.search(text)
    return None if m is None else f"U+{ord(m.group()):04X}"


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: every non-printable, control or bidi character is
    shown as a ``\\x..``/``\\u....`` escape (what cmctl prints from a region it did not write)."""
    if text.isprintable() and _UNSAFE_RE.search(text) is None:
        return text
    return "".join(
        c if c.isprintable() and not _UNSAFE_RE.match(c) else c.encode("unicode_escape").decode()
        for c in text
    )


def check_service_name(value: str) -> str:
    if not value:
        raise ValueError("service name is empty")
    if len(value) > MAX_SERVICE_NAME:
        raise ValueError(f"service name longer than {MAX_SERVICE_NAME} characters")
    if not _SERVICE_RE.fullmatch(value):
        raise ValueError(
            f"service name {clip(value)} must be letters, digits, '.', '_' or '-' "
            "and start with a letter or digit"
        )
    return value


def check_host(value: str) -> str:
    """An IP address or DNS name (see the module docstring) → its canonical text."""
    if not value:
        raise ValueError("host is empty")
    if len(value) > MAX_HOST:
        raise ValueError(f"host longer than {MAX_HOST} characters")
    addr, pct, zone = value.partition("%")
    if pct:
        if not _ZONE_RE.fullmatch(zone):
            raise ValueError(
                f"host {clip(value)}: an IPv6 zone id is 1-{MAX_ZONE_ID} letters, digits, "
                "'_', '.' or '-'"
            )
        try:
            ip = ipaddress.IPv6Address(addr)
        except ValueError:
            raise ValueError(f"host {clip(value)}: a zone id needs an IPv6 address") from None
        return f"{ip}%{zone}"
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if not all(_LABEL_RE.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError(f"host {clip(value)} is neither an IP address nor a valid DNS name")
    return value.rstrip(".").lower()


def first_bad_host(hosts: Iterable[str]) -> tuple[str, str] | None:
    """The first host that does not match :data:`LOOSE_HOST_PATTERN`, with the reason (from
    :func:`check_host` where it has one); None if all do. One regex pass over all of them."""
    hosts = list(hosts)
    joined = "".join(h + "\n" for h in hosts)
    if (
        joined.count("\n") == len(hosts)  # (a host with a newline in it would pass as two)
        and max(map(len, hosts), default=0) <= MAX_HOST
        and _LOOSE_HOSTS.fullmatch(joined)
    ):
        return None
    for host in hosts:
        if len(host) <= MAX_HOST and _LOOSE_ONE.fullmatch(host):
            continue
        try:
            canonical = check_host(host)
        except ValueError as exc:
            return host, str(exc)
        return host, f"host {clip(host)} is not in canonical form ({canonical!r})"
    return None  # pragma: no cover - the bulk pass and this loop agree


def meta_bytes(meta: Mapping[str, str]) -> int:
    """The size that :data:`MAX_META_BYTES` bounds: keys plus values, UTF-8 encoded."""
    return sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in meta.items())


def check_meta(value: Mapping[str, str], max_bytes: int = MAX_META_BYTES) -> dict[str, str]:
    """Metadata → a dict in key order; ValueError naming the first bad entry."""
    if len(value) > MAX_META_ENTRIES:
        raise ValueError(f"more than {MAX_META_ENTRIES} meta entries")
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise ValueError("meta keys and values must be strings")
        if len(key) > MAX_META_KEY or not _META_KEY_RE.fullmatch(key):
            raise ValueError(
                f"meta key {clip(key)} must be 1-{MAX_META_KEY} letters, digits or '._/-'"
            )
        if len(val) > MAX_META_VALUE:
            raise ValueError(f"meta value of {key!r} longer than {MAX_META_VALUE} characters")
        bad = unsafe_char(val)
        if bad is not None:
            raise ValueError(f"meta value of {key!r} contains the control character {bad}")
    if meta_bytes(value) > max_bytes:
        raise ValueError(f"meta larger than {max_bytes} bytes")
    return dict(sorted(value.items()))


# -- slow start (docs/slow-start.md) ---------------------------------------------------------------

#: Longest slow-start window, seconds.
MAX_SLOW_START_S: Final = 3600.0
#: Envoy's defaults: a linear ramp that starts at 10 % of the node's weight.
SLOW_START_AGGRESSION: Final = 1.0
SLOW_START_MIN_WEIGHT_PERCENT: Final = 10.0
_DURATION_RE: Final = re.compile(r"([0-9]+(?:\.[0-9]*)?)(ms|s|m)?")
_DURATION_UNIT: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


class SlowStartConfig(NamedTuple):
    """A service's slow start, from its meta: ``slow_start=30s`` (also ``500ms``, ``2m`` or plain
    seconds; ``0`` turns it off; absent: ``window_s`` None, the sidecar's default window),
    ``slow_start_aggression=1.0``, ``slow_start_min_weight=10`` (percent of the node's weight).
    """

    window_s: float | None
    aggression: float = SLOW_START_AGGRESSION
    min_weight_percent: float = SLOW_START_MIN_WEIGHT_PERCENT


def check_slow_start(meta: Mapping[str, str]) -> SlowStartConfig:
    """The slow-start options in a service's ``meta``; ValueError naming the bad one (the server
    refuses the service, the sidecar quarantines it)."""
    raw = meta.get("slow_start")
    window = None
    if raw is not None:
        m = _DURATION_RE.fullmatch(raw.strip())
        window = float(m.group(1)) * _DURATION_UNIT[m.group(2)] if m else math.nan
        if not 0.0 <= window <= MAX_SLOW_START_S:
            raise ValueError(
                f"meta slow_start={clip(raw)} is not a window of 0-{MAX_SLOW_START_S:.0f} s "
                "(e.g. 30s, 500ms, 2m)"
            )
    aggression = _number(meta, "slow_start_aggression", SLOW_START_AGGRESSION, 0.01, 100.0)
    percent = _number(meta, "slow_start_min_weight", SLOW_START_MIN_WEIGHT_PERCENT, 0.0, 100.0)
    return SlowStartConfig(window, aggression, percent)


def _number(meta: Mapping[str, str], key: str, default: float, low: float, high: float) -> float:
    raw = meta.get(key)
    if raw is None:
        return default
    try:
        value = float(raw.strip().removesuffix("%"))
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise ValueError(f"meta {key}={clip(raw)} is not a number from {low:g} to {high:g}")
    return value


def check_ttl(value: float | None) -> float | None:
    """A lease TTL in seconds: None (the server's default), 0 (no expiry) or MIN_TTL-MAX_TTL.

    ``-0.0``, NaN and infinities are refused: they are never what a client meant."""
    if value is None:
        return None
    if value == 0 and math.copysign(1.0, value) > 0:
        return 0.0
    if not math.isfinite(value) or not MIN_TTL <= value <= MAX_TTL:
        raise ValueError(f"ttl {value} outside {MIN_TTL}-{MAX_TTL} seconds (0: no expiry)")
    return value


def check_zone(value: str) -> str:
    """A machine's zone name (``cm-sidecar --zone``): 1-:data:`MAX_ZONE_NAME` letters, digits or
    ``._/-``, starting with a letter or digit (the rules of a meta key; cloud zone names such
    as ``eu-west-1a`` fit). Nodes name their zone in their meta ``zone``."""
    if not isinstance(value, str) or not value:
        raise ValueError("zone name is empty")
    if len(value) > MAX_ZONE_NAME or not _META_KEY_RE.fullmatch(value):
        raise ValueError(
            f"zone name {clip(value)} must be 1-{MAX_ZONE_NAME} letters, digits or '._/-', "
            "starting with a letter or digit"
        )
    return value


# -- routing options in a service's meta (docs/routing.md) ----------------------------------------

#: The node meta key naming the node's zone.
ZONE_META: Final = "zone"
#: ``subset_fallback`` values: what a pick with a subset does when no node of the subset may
#: receive traffic (Envoy's NO_FALLBACK, ANY_ENDPOINT, DEFAULT_SUBSET).
SUBSET_FALLBACKS: Final = ("none", "any", "default")
#: Picks stay in the local zone while this fraction of its nodes is healthy: Envoy's
#: overprovisioning factor 1.4, under which a locality keeps all its traffic down to 1/1.4.
ZONE_MIN_HEALTHY: Final = 1 / 1.4
#: Zone routing applies to services (or subsets) of at least this many nodes (Envoy's
#: ``min_cluster_size``).
ZONE_MIN_CLUSTER_SIZE: Final = 6


class Routing(NamedTuple):
    """A service's routing options, from its meta (each key optional)::

    subset_fallback=none|any|default   subset_default=k=v,k2=v2
    zone_min_healthy=0.714              zone_min_cluster_size=6
    subset_keys=version;version,tier    (Envoy's subset_selectors: keys of the subsets picked
                                        by key, whose Maglev tables the sidecar publishes)
    """

    fallback: str = "none"
    default_subset: tuple[tuple[str, str], ...] = ()
    zone_min_healthy: float = ZONE_MIN_HEALTHY
    zone_min_cluster_size: int = ZONE_MIN_CLUSTER_SIZE
    #: Declared subset selectors: each a sorted tuple of meta keys, in the order declared.
    selectors: tuple[tuple[str, ...], ...] = ()


def check_routing(meta: Mapping[str, str]) -> Routing:
    """The routing options in a service's ``meta``; ValueError naming the bad one. The server
    refuses such a service and the sidecar quarantines it; a worker that meets one anyway uses
    the defaults (``Routing()``)."""
    fallback = meta.get("subset_fallback", "none")
    if fallback not in SUBSET_FALLBACKS:
        raise ValueError(
            f"meta subset_fallback={clip(fallback)} is not one of {', '.join(SUBSET_FALLBACKS)}"
        )
    pairs: dict[str, str] = {}
    text = meta.get("subset_default", "")
    for item in filter(None, (p.strip() for p in text.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not _META_KEY_RE.fullmatch(k) or len(k) > MAX_META_KEY or not v:
            raise ValueError(f"meta subset_default: {clip(item)} is not KEY=VALUE")
        pairs[k] = v
    if fallback == "default" and not pairs:
        raise ValueError("meta subset_fallback=default needs subset_default=KEY=VALUE[,...]")
    raw = meta.get("zone_min_healthy")
    healthy = ZONE_MIN_HEALTHY if raw is None else _fraction(raw)
    raw = meta.get("zone_min_cluster_size")
    size = ZONE_MIN_CLUSTER_SIZE
    if raw is not None:
        if not raw.isdigit() or len(raw) > 6:
            raise ValueError(f"meta zone_min_cluster_size={clip(raw)} is not a whole number")
        size = int(raw)
    selectors: list[tuple[str, ...]] = []
    for item in filter(None, (p.strip() for p in meta.get("subset_keys", "").split(";"))):
        keys = tuple(sorted({k.strip() for k in item.split(",")}))
        if any(not _META_KEY_RE.fullmatch(k) or len(k) > MAX_META_KEY for k in keys):
            raise ValueError(
                f"meta subset_keys: {clip(item)} is not KEY[,KEY...] (selectors split by ';')"
            )
        if keys not in selectors:
            selectors.append(keys)
    return Routing(fallback, tuple(sorted(pairs.items())), healthy, size, tuple(selectors))


def check_service_meta(value: Mapping[str, str]) -> dict[str, str]:
    """A service's metadata: :func:`check_meta`, then its routing options
    (:func:`check_routing`)."""
    meta = check_meta(value)
    check_routing(meta)
    return meta


def _fraction(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"meta zone_min_healthy={clip(raw)} is not a number from 0 to 1")
    return value
