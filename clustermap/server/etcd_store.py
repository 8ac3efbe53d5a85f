"""The etcd v3 :class:`~clustermap.server.store.MapStore`: the registry shared by many replicas.

Client: etcd's own gRPC API, from its protos vendored into ``proto/etcd/`` and generated with our
grpcio/protobuf (``clustermap._pb.etcd``); see docs/server.md, "etcd store", for why.

Keys under the prefix ``P`` (default ``/clustermap/``)::

    P n/<service>/<host>/<port>   one node: JSON {"w": weight, "s": status, "m": meta,
                                  "aw": weight override, "as": status override, "o": origin};
                                  a TTL registration is attached to an etcd lease
    P o/<service>                 non-default service options: {"strategy", "panic", "meta"}

A service exists iff it has a node key. Every replica keeps a cache of the prefix, loaded with
one ``Range`` and kept current by one ``Watch`` from the next revision, so the map at etcd
revision R is the same on every replica:

* ``revision`` = the etcd revision the cache reflects: the last event's revision, or a progress
  notification's header revision (never a revision whose events may still be on the way);
* ``Service.revision`` = the highest ``mod_revision`` among the service's keys (deterministic:
  a replica that loaded later computes the same value);
* ``epoch`` = ``etcd-<cluster id>-<hash of the prefix>``: the same on every replica of one etcd
  cluster and prefix, so a subscriber keeps its revision when it switches replicas;
* ``changes_since(R)``: from the local change log (revisions this replica watched), else from
  etcd's history, prepared outside the registry lock by :meth:`EtcdStore.prepare_history` (a
  ``Range`` at revision R compared with the cache); compacted history → None (a full map);
* a subscriber ahead of this replica (it came from a replica that saw more) is served after
  :meth:`EtcdStore.catch_up` (a watch progress request, bounded wait).

Writes are ``Txn``\\ s guarded by each key's ``mod_revision`` (optimistic concurrency between
replicas); a write returns once the watch has brought the cache to the write's revision
(read-your-writes on this replica).

Threading: the cache is guarded by one condition's lock: by default the store's own; the
registry passes its own condition to :meth:`EtcdStore.start` so polls see a consistent cache under
the registry's lock and watchers wake on every new revision. The cached reads (``revision``,
``checksum``, ``get``, ``items``, ``changes_since``) expect that lock held by the caller (as
:class:`~clustermap.server.store.MemoryStore` expects its owner to serialise calls); the I/O
methods (``apply``, ``put_node``, ``delete_node``, leases...) must be called *without* it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import grpc

from clustermap._pb.etcd.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from clustermap._pb.etcd.mvccpb import kv_pb2
from clustermap.checksum import service_digest, update_checksum
from clustermap.model import UP, Node, Service, format_address, parse_address
from clustermap.retry import Retry
from clustermap.server.etcd_auth import EtcdAuthError, EtcdCredentials, open_channel
from clustermap.server.store import StoredService

__all__ = ["EtcdError", "EtcdStore", "NodeEntry", "parse_etcd_url"]

log = logging.getLogger("clustermap.server.etcd")

T = TypeVar("T")

DEFAULT_PREFIX: Final = "/clustermap/"
_RETRYABLE: Final = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
#: Attempts of one call: 50 ms doubling to 0.5 s between them, until the call's deadline.
_RETRY: Final = Retry(delay=0.05, backoff=2.0, max_delay=0.5)
_STOP: Final = object()


class EtcdError(Exception):
    """etcd cannot be reached or refused a request (after retries)."""


def _retryable(exc: Exception) -> bool:
    """UNAVAILABLE (member down, leader election) or a slow attempt: another try may succeed."""
    return isinstance(exc, grpc.RpcError) and exc.code() in _RETRYABLE


def parse_etcd_url(url: str) -> tuple[list[str], str]:
    """``etcd://HOST:PORT[,HOST:PORT...][/prefix]`` → (endpoints, key prefix ending in ``/``)."""
    parts = urlsplit(url)
    if parts.scheme != "etcd" or not parts.netloc:
        raise ValueError(f"{url!r} is not etcd://HOST:PORT[,HOST:PORT...][/prefix]")
    endpoints = []
    for ep in parts.netloc.split(","):
        try:
            host, port = parse_address(ep)
        except ValueError:
            raise ValueError(f"{ep!r} in {url!r} is not HOST:PORT") from None
        endpoints.append(f"{host}:{port}")  # unbracketed: _Client splits at the last colon
    path = parts.path.strip("/")
    prefix = f"/{path}/" if path else DEFAULT_PREFIX
    return endpoints, prefix


def _prefix_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    end[-1] += 1  # prefixes end in "/" (0x2f): never 0xff
    return bytes(end)


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """One cached node key: its stored record, the node as published, and etcd metadata."""

    record: Mapping[str, Any]
    node: Node
    mod: int
    lease: int

    @property
    def origin(self) -> str:
        return str(self.record.get("o", "registered"))


def node_from_record(host: str, port: int, record: Mapping[str, Any]) -> Node:
    aw, as_ = record.get("aw"), record.get("as")
    return Node(
        host=host,
        port=port,
        weight=int(record.get("w", 1) if aw is None else aw),
        status=str(as_ or record.get("s", UP)),
        meta=MappingProxyType({str(k): str(v) for k, v in dict(record.get("m") or {}).items()}),
    )


def _encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class _Client:
    """The gRPC channel to the etcd cluster (every member; gRPC balances and fails over)."""

    def __init__(
        self, endpoints: Sequence[str], timeout: float, credentials: EtcdCredentials | None = None
    ) -> None:
        v4: list[str] = []
        v6: list[str] = []
        for ep in endpoints:
            host, port = parse_address(ep)
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise EtcdError(f"cannot resolve etcd endpoint {ep}: {exc}") from None
            for family, *_, sockaddr in infos[:1]:
                (v6 if family == socket.AF_INET6 else v4).append(
                    format_address(str(sockaddr[0]), port)
                )
        # one static address list per channel: gRPC's ipv4:/ipv6: targets take one family
        self.target = "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)
        self.timeout = timeout
        self.channel = open_channel(
            self.target,
            [
                ("grpc.lb_policy_name", "round_robin"),
                ("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
            ],
            credentials,
            timeout,
            server_name=parse_address(endpoints[0])[0],
        )
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)

    def call(self, fn: Callable[..., T], request: Any, attempt_timeout: float = 1.0) -> T:
        """A unary call, retried with backoff on UNAVAILABLE (member down, leader election) and
        on a slow attempt (a follower whose leader just died holds requests until etcd's own
        request timeout; another member answers at once). Every request we send is safe to
        repeat: writes are guarded by ``mod_revision`` compares, a repeated lease grant only
        leaves an unused lease to expire."""
        return _RETRY.within(max(self.timeout, attempt_timeout))(
            lambda remaining: fn(
                request, timeout=max(0.05, min(attempt_timeout, remaining)), wait_for_ready=True
            ),
            _retryable,
        )

    def close(self) -> None:
        self.channel.close()


class EtcdStore:
    """:class:`~clustermap.server.store.MapStore` on etcd v3 (see the module docstring)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        *,
        log_size: int = 10_000,
        timeout: float = 5.0,
        credentials: EtcdCredentials | None = None,
    ) -> None:
        if log_size < 1:
            raise ValueError("log_size must be positive")
        if not prefix.endswith("/"):
            prefix += "/"
        self.prefix = prefix
        self._root = prefix.encode()
        self._nodes_root = self._root + b"n/"
        self._opts_root = self._root + b"o/"
        self._sync_key = self._root + b"sync"
        self._barrier_lock = threading.Lock()
        self._barrier = 0
        try:
            self._client = _Client(endpoints, timeout, credentials)
        except EtcdAuthError as exc:
            raise EtcdError(str(exc)) from None
        self._cond = threading.Condition()
        self._epoch = ""
        self._revision = 0
        self._floor = 0
        self._checksum = 0
        self._nodes: dict[str, dict[tuple[str, int], NodeEntry]] = {}
        self._opts: dict[str, tuple[Mapping[str, Any], int]] = {}
        self._services: dict[str, StoredService] = {}
        self._log: deque[tuple[int, str]] = deque()
        self._log_size = log_size
        self._history: dict[int, tuple[int, frozenset[str]] | None] = {}
        self._requests: queue.Queue[object] | None = None
        self._call: Any = None
        self._closed = False
        self._watching = False
        self._lost_at = time.monotonic()
        self._thread: threading.Thread | None = None
        self.reloads = 0

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> EtcdStore:
        endpoints, prefix = parse_etcd_url(url)
        return cls(endpoints, prefix, **kw)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, cond: threading.Condition | None = None) -> None:
        """Load the prefix and start watching it. ``cond``: share the owner's lock."""
        if cond is not None:
            self._cond = cond
        try:
            self._load()
        except grpc.RpcError as exc:
            self._client.close()
            where = self._client.target.partition(":")[2]
            why = f"{exc.code().name}: {exc.details()}" if exc.details() else exc.code().name
            raise EtcdError(f"cannot read from etcd at {where} ({why})") from None
        self._thread = threading.Thread(target=self._watch_loop, name="cm-etcd-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            requests, call = self._requests, self._call
            self._cond.notify_all()
        if requests is not None:
            requests.put(_STOP)
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(5)
        self._client.close()

    # -- MapStore (cached reads: call with the lock held) --------------------------------

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def checksum(self) -> int:
        return self._checksum

    @property
    def floor(self) -> int:
        """The oldest revision the local change log can answer from."""
        return self._floor

    def get(self, name: str) -> StoredService | None:
        return self._services.get(name)

    def items(self) -> Iterable[tuple[str, StoredService]]:
        return sorted(self._services.items())

    def snapshot(self) -> list[StoredService]:
        return list(self._services.values())

    def __len__(self) -> int:
        return len(self._services)

    def changes_since(self, revision: int) -> frozenset[str] | None:
        if revision > self._revision:
            return None
        base: frozenset[str] = frozenset()
        if revision < self._floor:
            prepared = self._history.get(revision)
            if prepared is None:
                return None
            revision, base = prepared
            if revision < self._floor:
                return None
        names = set(base)
        for rev, name in reversed(self._log):
            if rev <= revision:
                break
            names.add(name)
        return frozenset(names)

    def lost_for(self) -> float:
        """Seconds since the watch stream was lost (0 while it is up): how stale we may be."""
        return 0.0 if self._watching else time.monotonic() - self._lost_at

    # -- node-level reads (lock held) ------------------------------------------------------

    def node_entry(self, service: str, host: str, port: int) -> NodeEntry | None:
        return self._nodes.get(service, {}).get((host, port))

    def node_entries(self, service: str) -> Mapping[tuple[str, int], NodeEntry]:
        return self._nodes.get(service, {})

    def lease_count(self) -> int:
        return len({e.lease for nodes in self._nodes.values() for e in nodes.values() if e.lease})

    # -- writes (call without the lock) ---------------------------------------------------

    def apply(self, writes: Mapping[str, Service | None]) -> int:
        """Put/delete whole services in one ``Txn`` (keys without leases); return the revision."""
        for _ in range(10):
            with self._cond:
                compares, ops = self._plan(writes)
                if not ops:
                    return self._revision
            revision = self._txn(compares, ops)
            if revision is not None:
                return revision
        raise EtcdError("too many concurrent changes to the same services; try again")

    def _plan(
        self, writes: Mapping[str, Service | None]
    ) -> tuple[list[rpc_pb2.Compare], list[rpc_pb2.RequestOp]]:
        compares: list[rpc_pb2.Compare] = []
        ops: list[rpc_pb2.RequestOp] = []
        for name, value in writes.items():
            if value is not None and value.name != name:
                raise ValueError(f"service {value.name!r} written under the name {name!r}")
            old = self._services.get(name)
            if value is None and old is None:
                continue
            if (
                value is not None
                and old is not None
                and old.digest == service_digest(value)
                and _same(old.service, value)
            ):
                continue
            current = self._nodes.get(name, {})
            wanted = {(n.host, n.port): n for n in (value.nodes if value else ())}
            for key, gone in current.items():
                if key not in wanted:
                    compares.append(self._guard(self._node_key(name, *key), gone.mod))
                    ops.append(self._delete_op(self._node_key(name, *key)))
            for key, node in wanted.items():
                record = {"w": node.weight, "s": node.status, "m": dict(node.meta)}
                entry = current.get(key)
                if entry is not None and dict(entry.record) == record and not entry.lease:
                    continue
                k = self._node_key(name, *key)
                compares.append(self._guard(k, entry.mod if entry else 0))
                ops.append(self._put_op(k, _encode(record)))
            opts_key = self._opts_root + name.encode()
            old_opts, opts_mod = self._opts.get(name, ({}, 0))
            new_opts: dict[str, Any] = {}
            if value is not None and (value.strategy, value.panic_threshold, dict(value.meta)) != (
                "round_robin",
                0.0,
                {},
            ):
                new_opts = {
                    "strategy": value.strategy,
                    "panic": value.panic_threshold,
                    "meta": dict(value.meta),
                }
            if new_opts != dict(old_opts):
                compares.append(self._guard(opts_key, opts_mod))
                ops.append(
                    self._put_op(opts_key, _encode(new_opts))
                    if new_opts
                    else self._delete_op(opts_key)
                )
        return compares, ops

    def put_node(
        self,
        service: str,
        host: str,
        port: int,
        record: Mapping[str, Any],
        *,
        lease: int = 0,
        expect_mod: int = 0,
    ) -> int | None:
        """Write one node key if it still has ``expect_mod`` (0: absent); None on a conflict.

        Raises :class:`LookupError` if ``lease`` no longer exists."""
        key = self._node_key(service, host, port)
        try:
            return self._txn(
                [self._guard(key, expect_mod)], [self._put_op(key, _encode(record), lease)]
            )
        except grpc.RpcError as exc:
            if "lease not found" in (exc.details() or ""):
                raise LookupError("lease not found") from None
            raise

    def delete_node(self, service: str, host: str, port: int, *, expect_mod: int) -> int | None:
        key = self._node_key(service, host, port)
        return self._txn([self._guard(key, expect_mod)], [self._delete_op(key)])

    def grant(self, ttl: float) -> tuple[int, int]:
        """A new etcd lease for at least ``ttl`` seconds: (id, granted TTL in whole seconds)."""
        resp = self._client.call(
            self._client.lease.LeaseGrant, rpc_pb2.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))
        )
        if resp.error:
            raise EtcdError(f"etcd refused a lease: {resp.error}")
        return resp.ID, resp.TTL

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its TTL, or 0 if it no longer exists."""

        def attempt(remaining: float) -> int:
            call = self._client.lease.LeaseKeepAlive(
                iter([rpc_pb2.LeaseKeepAliveRequest(ID=lease)]),
                timeout=max(0.05, min(1.0, remaining)),
                wait_for_ready=True,
            )
            for resp in call:
                call.cancel()
                return max(0, int(resp.TTL))
            return 0

        return _RETRY.within(self._client.timeout)(attempt, _retryable)

    def revoke(self, lease: int) -> None:
        """Revoke ``lease`` (its keys go with it); an unknown lease is not an error."""
        try:
            self._client.call(self._client.lease.LeaseRevoke, rpc_pb2.LeaseRevokeRequest(ID=lease))
        except grpc.RpcError as exc:
            if "lease not found" not in (exc.details() or ""):
                raise

    def compact(self, revision: int | None = None) -> int:
        """Compact etcd's history up to ``revision`` (default: this store's); for tests/ops."""
        rev = revision or self._current_revision()
        self._client.call(self._client.kv.Compact, rpc_pb2.CompactionRequest(revision=rev))
        return rev

    # -- keeping up (call without the lock) -----------------------------------------------

    def catch_up(self, revision: int, timeout: float = 1.0) -> bool:
        """Wait until the cache reaches ``revision``; False if it does not in ``timeout``.

        If the cache is behind, a *barrier* write (``P sync``) gets a revision at least as new
        as every committed one; the watch delivers events in order, so once it has delivered the
        barrier the cache holds everything before it. (Watch progress notifications would avoid
        the write, but etcd before 3.4.24/3.5.8 may send them ahead of events: etcd#15220.)"""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._revision >= revision:
                return True
        with self._barrier_lock:  # concurrent callers share one barrier write
            target = self._barrier
            if target < revision:
                try:
                    resp = self._client.call(
                        self._client.kv.Put,
                        rpc_pb2.PutRequest(key=self._sync_key, value=b"%d" % time.time_ns()),
                    )
                except grpc.RpcError:
                    return False
                target = self._barrier = int(resp.header.revision)
        target = min(revision, target)
        with self._cond:
            reached = self._cond.wait_for(
                lambda: self._revision >= target or self._closed,
                max(0.0, deadline - time.monotonic()),
            )
            return reached and not self._closed and self._revision >= revision

    def prepare_history(self, revision: int) -> None:
        """Compute what changed between etcd's ``revision`` and the cache, for changes_since."""
        with self._cond:
            if revision >= self._floor or revision in self._history:
                return
        try:
            resp = self._client.call(
                self._client.kv.Range,
                rpc_pb2.RangeRequest(
                    key=self._root, range_end=_prefix_end(self._root), revision=revision
                ),
                attempt_timeout=self._client.timeout,
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.OUT_OF_RANGE:  # compacted / future: a full map
                log.warning("history read failed: %s", exc.details())
                return
            with self._cond:
                self._history[revision] = None
            return
        nodes: dict[str, dict[tuple[str, int], NodeEntry]] = {}
        opts: dict[str, tuple[Mapping[str, Any], int]] = {}
        for kv in resp.kvs:
            self._decode_into(kv, nodes, opts)
        old = {n: s.digest for n, s in self._build_all(nodes, opts).items()}
        with self._cond:
            now = {n: s.digest for n, s in self._services.items()}
            names = frozenset(n for n in old.keys() | now.keys() if old.get(n) != now.get(n))
            self._history[revision] = (self._revision, names)
            while len(self._history) > 64:
                self._history.pop(next(iter(self._history)))

    # -- internals ------------------------------------------------------------------------

    def _node_key(self, service: str, host: str, port: int) -> bytes:
        return self._nodes_root + f"{service}/{host}/{port}".encode()

    @staticmethod
    def _guard(key: bytes, mod: int) -> rpc_pb2.Compare:
        return rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=mod
        )

    @staticmethod
    def _put_op(key: bytes, value: bytes, lease: int = 0) -> rpc_pb2.RequestOp:
        return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))

    @staticmethod
    def _delete_op(key: bytes) -> rpc_pb2.RequestOp:
        return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))

    def _txn(self, compares: list[rpc_pb2.Compare], ops: list[rpc_pb2.RequestOp]) -> int | None:
        resp = self._client.call(
            self._client.kv.Txn, rpc_pb2.TxnRequest(compare=compares, success=ops)
        )
        revision = int(resp.header.revision)
        if not resp.succeeded:  # another replica changed a key first: catch up, then retry
            self.catch_up(revision, self._client.timeout)
            return None
        with self._cond:  # our own events are on the way: wait for them, no barrier needed
            if not self._cond.wait_for(
                lambda: self._revision >= revision or self._closed, self._client.timeout
            ):
                raise EtcdError(f"the watch did not reach revision {revision} in time")
        return revision

    def _current_revision(self) -> int:
        resp = self._client.call(
            self._client.kv.Range, rpc_pb2.RangeRequest(key=self._root, count_only=True)
        )
        return int(resp.header.revision)

    def _load(self) -> None:
        resp = self._client.call(
            self._client.kv.Range,
            rpc_pb2.RangeRequest(key=self._root, range_end=_prefix_end(self._root)),
            attempt_timeout=self._client.timeout,
        )
        nodes: dict[str, dict[tuple[str, int], NodeEntry]] = {}
        opts: dict[str, tuple[Mapping[str, Any], int]] = {}
        for kv in resp.kvs:
            self._decode_into(kv, nodes, opts)
        services = self._build_all(nodes, opts)
        digest = hashlib.blake2b(self._root, digest_size=4).hexdigest()
        with self._cond:
            self._epoch = f"etcd-{resp.header.cluster_id:016x}-{digest}"
            self._nodes, self._opts, self._services = nodes, opts, services
            checksum = 0
            for s in services.values():
                checksum = update_checksum(checksum, None, s.digest)
            self._checksum = checksum
            # a (re)load starts a new local log: older subscribers get etcd's history or a full
            self._revision = self._floor = resp.header.revision
            self._log.clear()
            self._history.clear()
            self._cond.notify_all()

    def _decode_into(
        self,
        kv: kv_pb2.KeyValue,
        nodes: dict[str, dict[tuple[str, int], NodeEntry]],
        opts: dict[str, tuple[Mapping[str, Any], int]],
    ) -> str | None:
        key = kv.key
        try:
            if key.startswith(self._nodes_root):
                service, host, port = key[len(self._nodes_root) :].decode().rsplit("/", 2)
                record = json.loads(kv.value)
                node = node_from_record(host, int(port), record)
                nodes.setdefault(service, {})[(host, int(port))] = NodeEntry(
                    MappingProxyType(record), node, kv.mod_revision, kv.lease
                )
                return service
            if key.startswith(self._opts_root):
                service = key[len(self._opts_root) :].decode()
                opts[service] = (MappingProxyType(json.loads(kv.value)), kv.mod_revision)
                return service
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring malformed key %r: %s", key, exc)
        return None

    def _delete_from(
        self,
        key: bytes,
        nodes: dict[str, dict[tuple[str, int], NodeEntry]],
        opts: dict[str, tuple[Mapping[str, Any], int]],
    ) -> str | None:
        try:
            if key.startswith(self._nodes_root):
                service, host, port = key[len(self._nodes_root) :].decode().rsplit("/", 2)
                entries = nodes.get(service, {})
                entries.pop((host, int(port)), None)
                if not entries:
                    nodes.pop(service, None)
                return service
            if key.startswith(self._opts_root):
                service = key[len(self._opts_root) :].decode()
                opts.pop(service, None)
                return service
        except ValueError:
            pass
        return None

    def _build_all(
        self,
        nodes: Mapping[str, Mapping[tuple[str, int], NodeEntry]],
        opts: Mapping[str, tuple[Mapping[str, Any], int]],
    ) -> dict[str, StoredService]:
        out = {}
        for name in nodes:
            stored = self._build(name, nodes, opts)
            if stored is not None:
                out[name] = stored
        return out

    @staticmethod
    def _build(
        name: str,
        nodes: Mapping[str, Mapping[tuple[str, int], NodeEntry]],
        opts: Mapping[str, tuple[Mapping[str, Any], int]],
    ) -> StoredService | None:
        entries = nodes.get(name)
        if not entries:
            return None
        options, opts_mod = opts.get(name, ({}, 0))
        revision = max(opts_mod, *(e.mod for e in entries.values()))
        service = Service(
            name=name,
            nodes=tuple(e.node for _, e in sorted(entries.items())),
            strategy=str(options.get("strategy", "round_robin")),
            panic_threshold=float(options.get("panic", 0.0)),
            meta=MappingProxyType(
                {str(k): str(v) for k, v in dict(options.get("meta") or {}).items()}
            ),
            revision=revision,
        )
        return StoredService(service, service_digest(service))

    def _apply_events(self, resp: rpc_pb2.WatchResponse) -> None:
        """Apply one watch response (lock held)."""
        if not resp.events:
            return  # progress notifications are not trusted (see catch_up)
        touched: set[str] = set()
        last = self._revision
        for ev in resp.events:
            if ev.kv.mod_revision <= self._revision:
                continue  # already in the cache (a reconnect's overlap)
            if ev.type == kv_pb2.Event.DELETE:
                name = self._delete_from(ev.kv.key, self._nodes, self._opts)
            else:
                name = self._decode_into(ev.kv, self._nodes, self._opts)
            if name is not None:
                touched.add(name)
            last = max(last, ev.kv.mod_revision)
        for name in sorted(touched):
            old = self._services.get(name)
            new = self._build(name, self._nodes, self._opts)
            if old is not None and new is not None and old.service == new.service:
                continue
            if new is None:
                self._services.pop(name, None)
            else:
                self._services[name] = new
            self._checksum = update_checksum(
                self._checksum, old.digest if old else None, new.digest if new else None
            )
            self._log.append((last, name))
        self._trim_log()
        self._revision = max(self._revision, last)
        self._cond.notify_all()

    def _trim_log(self) -> None:
        while len(self._log) > self._log_size:
            self._floor = self._log.popleft()[0]

    def _watch_loop(self) -> None:
        delay = 0.05
        while True:
            with self._cond:
                if self._closed:
                    return
                start = self._revision + 1
                requests: queue.Queue[object] = queue.Queue()
                self._requests = requests
            requests.put(
                rpc_pb2.WatchRequest(
                    create_request=rpc_pb2.WatchCreateRequest(
                        key=self._root,
                        range_end=_prefix_end(self._root),
                        start_revision=start,
                    )
                )
            )
            reload = False
            try:
                call = self._client.watch.Watch(
                    _requests(requests),
                    wait_for_ready=True,
                    # etcd's WithRequireLeader: a member cut off from the leader ends the
                    # stream instead of keeping it silently stale; we reconnect elsewhere
                    metadata=(("hasleader", "true"),),
                )
                with self._cond:
                    self._call = call
                    if self._closed:
                        call.cancel()
                for resp in call:
                    if resp.compact_revision:  # we fell behind etcd's compaction
                        log.warning(
                            "etcd history compacted to %d past our watch: reloading",
                            resp.compact_revision,
                            extra={"event": "etcd_reload"},
                        )
                        reload = True
                        break
                    if resp.canceled:  # e.g. the member lost its leader: watch elsewhere
                        log.warning(
                            "etcd watch cancelled (%s): reconnecting",
                            resp.cancel_reason,
                            extra={"event": "etcd_watch"},
                        )
                        break
                    if resp.created:
                        with self._cond:
                            self._watching = True
                        continue
                    delay = 0.05
                    with self._cond:
                        self._apply_events(resp)
                call.cancel()
            except grpc.RpcError as exc:
                with self._cond:
                    if self._closed:
                        return
                log.warning(
                    "etcd watch broken (%s): reconnecting",
                    exc.code(),
                    extra={"event": "etcd_watch"},
                )
            finally:
                requests.put(_STOP)
                with self._cond:
                    if self._watching:
                        self._watching = False
                        self._lost_at = time.monotonic()
            with self._cond:
                if self._closed:
                    return
                self._cond.wait(delay)  # backoff before reconnecting (woken by close)
            delay = min(delay * 2, 1.0)
            if reload:
                try:
                    self._load()
                    self.reloads += 1
                except grpc.RpcError as exc:
                    log.warning("etcd reload failed (%s)", exc.code())


def _requests(q: queue.Queue[object]) -> Iterator[rpc_pb2.WatchRequest]:
    while True:
        item = q.get()
        if item is _STOP or not isinstance(item, rpc_pb2.WatchRequest):
            return
        yield item


def _same(a: Service, b: Service) -> bool:
    return (a.nodes, a.strategy, a.panic_threshold, dict(a.meta)) == (
        b.nodes,
        b.strategy,
        b.panic_threshold,
        dict(b.meta),
    )
