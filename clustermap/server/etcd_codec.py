"""The etcd record format: keys and values under the prefix, encoded and decoded (pure, no I/O).

Keys under the prefix ``P`` (default ``/clustermap/``)::

    P n/<service>/<host>/<port>   one node: JSON {"w": weight, "s": status, "m": meta,
                                  "o": origin, "aw": weight override, "as": status override,
                                  "p": false while a static node awaits its first probe};
                                  a TTL registration is attached to an etcd lease
    P leader/<lease id, hex>      a candidate for the prober's job (etcd's election recipe);
                                  value: the replica's name
    P sync                        barrier writes (a replica catching up: see etcd_store)
    P dereg                       written in every transaction that deletes node keys, so a
                                  watcher can tell a request's delete from a lease's expiry

Absent keys in a record take their defaults ("w" 1, "s" up, "o" registered, "p" true); keys
written by older versions (``P o/<service>``, ``"aw": null``) decode as before. A node key's
service is everything before the last two ``/`` (service names have no ``/``; hosts may be
IPv6 literals, which have none either).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from clustermap.model import STATUSES, UP
from clustermap.server.store import REGISTERED, STATIC, NodeKey, NodeRecord

__all__ = ["DEFAULT_PREFIX", "Keys", "decode_record", "encode_record", "prefix_end"]

DEFAULT_PREFIX: Final = "/clustermap/"
_ORIGINS: Final = (REGISTERED, STATIC)


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    end[-1] += 1  # our prefixes end in "/" (0x2f): never 0xff
    return bytes(end)


class Keys:
    """The key layout under one prefix (see the module docstring)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.endswith("/"):
            prefix += "/"
        self.prefix = prefix
        self.root = prefix.encode()
        self.nodes = self.root + b"n/"
        self.leader = self.root + b"leader/"
        self.sync = self.root + b"sync"
        self.dereg = self.root + b"dereg"

    def node(self, key: NodeKey) -> bytes:
        service, host, port = key
        return self.nodes + f"{service}/{host}/{port}".encode()

    def parse_node(self, raw: bytes) -> NodeKey | None:
        """The node a key names; None for keys that are not node keys.

        Raises :class:`ValueError` for a malformed node key."""
        if not raw.startswith(self.nodes):
            return None
        service, host, port = raw[len(self.nodes) :].decode().rsplit("/", 2)
        if not service or not host:
            raise ValueError(f"malformed node key {raw!r}")
        return service, host, int(port)


def encode_record(record: NodeRecord) -> bytes:
    doc: dict[str, Any] = {"w": record.weight, "s": record.status, "m": dict(record.meta)}
    doc["o"] = record.origin
    if record.admin_weight is not None:
        doc["aw"] = record.admin_weight
    if record.admin_status is not None:
        doc["as"] = record.admin_status
    if not record.probed:
        doc["p"] = False
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode_record(raw: bytes) -> NodeRecord:
    """A stored node record; :class:`ValueError` if it is not one."""
    doc = json.loads(raw)
    if not isinstance(doc, Mapping):
        raise ValueError("a node record is a JSON object")
    meta = doc.get("m", {})
    meta = {} if meta is None else meta
    if not isinstance(meta, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise ValueError("meta must map strings to strings")
    aw, as_ = doc.get("aw"), doc.get("as")
    return NodeRecord(
        weight=_int(doc.get("w", 1), "w"),
        status=_choice(doc.get("s", UP), STATUSES, "s"),
        meta=dict(meta),
        origin=_choice(doc.get("o", REGISTERED), _ORIGINS, "o"),
        probed=doc.get("p", True) is not False,
        admin_weight=None if aw is None else _int(aw, "aw"),
        admin_status=None if as_ is None else _choice(as_, STATUSES, "as"),
    )


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name!r} must be a non-negative integer")
    return value


def _choice(value: object, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name!r} must be one of {', '.join(allowed)}")
    return str(value)
