"""The etcd v3 :class:`~clustermap.server.store.NodeStore`: one map shared by many replicas.

Storage only: node records as keys under the prefix (format: :mod:`.etcd_codec`), leases as etcd
leases, the connection in :mod:`.etcd_client`, the prober's election in :mod:`.election`. The
registry over it builds the map and keeps the change log, exactly as over the in-memory store.

* :meth:`EtcdStore.start` loads the prefix with one ``Range`` and follows it with one ``Watch``
  from the next revision, handing each watch response to the registry as one
  :meth:`~clustermap.server.store.Listener.changed` call (its revision: the newest event's, so
  every replica passes through the same revisions). A watch cancelled by compaction reloads;
* ``epoch`` = ``etcd-<cluster id>-<hash of the prefix>``: the same on every replica of one etcd
  cluster and prefix, so a subscriber keeps its revision when it switches replicas;
* :meth:`EtcdStore.commit` is one ``Txn`` with a ``MOD`` compare per guarded key and, with a
  term, a ``CREATE`` compare on the leader key (the fence); a transaction deleting node keys
  also writes ``P dereg``, so the watch tells a request's delete from a lease's expiry;
* :meth:`EtcdStore.history` reads the prefix at an older revision (a subscriber older than the
  registry's change log); compacted → None (a full map);
* :meth:`EtcdStore.barrier` writes ``P sync``: its revision is at least as new as every committed
  one, and once the watch delivered it the registry holds everything before it. (Watch progress
  notifications would avoid the write, but etcd before 3.4.24/3.5.8 may send them ahead of
  events: etcd#15220.)

Threading: one watch thread (``cm-etcd-watch``) calls the listener; every other method is
called by the registry without its lock and blocks on etcd (with retries, see
:class:`~clustermap.server.etcd_client.Client`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import grpc

from clustermap._pb.etcd.etcdserverpb import rpc_pb2
from clustermap._pb.etcd.mvccpb import kv_pb2
from clustermap.server.election import EtcdElection
from clustermap.server.etcd_auth import EtcdAuthError, EtcdCredentials
from clustermap.server.etcd_client import Client, EtcdError, parse_etcd_url
from clustermap.server.etcd_codec import DEFAULT_PREFIX, Keys, decode_record, encode_record
from clustermap.server.etcd_codec import prefix_end as _prefix_end
from clustermap.server.store import (
    Delete,
    Deposed,
    LeaseGone,
    LeaseState,
    Listener,
    NodeEntry,
    NodeEvent,
    NodeKey,
    Op,
    Put,
    Term,
)

__all__ = ["EtcdError", "EtcdStore"]

log = logging.getLogger("clustermap.server.etcd")

_STOP: Final = object()
_MAX_TXN_OPS: Final = 128  # etcd's default --max-txn-ops


class EtcdStore:
    """:class:`~clustermap.server.store.NodeStore` on etcd v3 (see the module docstring)."""

    max_ops = _MAX_TXN_OPS - 1  # one op left for the P dereg marker

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout: float = 5.0,
        credentials: EtcdCredentials | None = None,
    ) -> None:
        self.keys = Keys(prefix)
        self.prefix = self.keys.prefix
        try:
            self._client = Client(endpoints, timeout, credentials)
        except EtcdAuthError as exc:
            raise EtcdError(str(exc)) from None
        self._lock = threading.Lock()
        self._listener: Listener | None = None
        self._epoch = ""
        self._revision = 0  # the newest revision handed to the listener
        self._barrier_lock = threading.Lock()
        self._barrier = 0
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

    @property
    def epoch(self) -> str:
        return self._epoch

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, listener: Listener) -> None:
        self._listener = listener
        try:
            self._load()
        except EtcdError as exc:
            self._client.close()
            why = exc.code.name if exc.code else str(exc)
            if exc.code and exc.details:
                why = f"{why}: {exc.details}"
            raise EtcdError(f"cannot read from etcd at {self._client.where} ({why})") from None
        self._thread = threading.Thread(target=self._watch_loop, name="cm-etcd-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            requests, call = self._requests, self._call
        if requests is not None:
            requests.put(_STOP)
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(5)
        self._client.close()

    # -- writes ---------------------------------------------------------------------------

    def commit(self, ops: Sequence[Op], term: Term | None = None) -> tuple[int | None, int]:
        compares: list[rpc_pb2.Compare] = []
        success: list[rpc_pb2.RequestOp] = []
        failure: list[rpc_pb2.RequestOp] = []
        for op in ops:
            key = self.keys.node(op.key)
            if op.expect is not None:
                compares.append(
                    rpc_pb2.Compare(
                        key=key,
                        target=rpc_pb2.Compare.MOD,
                        result=rpc_pb2.Compare.EQUAL,
                        mod_revision=op.expect,
                    )
                )
            if isinstance(op, Put):
                success.append(_put(key, encode_record(op.record), op.lease))
            else:
                success.append(
                    rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))
                )
        if any(isinstance(op, Delete) for op in ops):
            success.append(_put(self.keys.dereg, b""))
        if term is not None:  # the fence: the leader key still exists, created by our campaign
            compares.append(
                rpc_pb2.Compare(
                    key=term.key,
                    target=rpc_pb2.Compare.CREATE,
                    result=rpc_pb2.Compare.EQUAL,
                    create_revision=term.revision,
                )
            )
            failure.append(rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=term.key)))
        try:
            resp = self._client.call(
                self._client.kv.Txn,
                rpc_pb2.TxnRequest(compare=compares, success=success, failure=failure),
            )
        except EtcdError as exc:
            if "lease not found" in exc.details:
                raise LeaseGone("lease not found") from None
            raise
        revision = int(resp.header.revision)
        if resp.succeeded:
            return revision, revision
        if term is not None:
            kvs = resp.responses[0].response_range.kvs
            if not kvs or kvs[0].create_revision != term.revision:
                raise Deposed("another replica leads now: this write is refused")
        return None, revision

    # -- leases ---------------------------------------------------------------------------

    def grant(self, ttl: float) -> tuple[int, float]:
        """A new etcd lease for at least ``ttl`` seconds (etcd counts whole seconds)."""
        resp = self._client.call(
            self._client.lease.LeaseGrant, rpc_pb2.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))
        )
        if resp.error:
            raise EtcdError(f"etcd refused a lease: {resp.error}")
        return int(resp.ID), float(resp.TTL)

    def keepalive(self, lease: int) -> float:
        if not 0 < lease < 1 << 63:  # not an etcd lease id
            return 0.0
        return float(self._client.keepalive(lease))

    def revoke(self, lease: int) -> None:
        try:
            self._client.call(self._client.lease.LeaseRevoke, rpc_pb2.LeaseRevokeRequest(ID=lease))
        except EtcdError as exc:
            if "lease not found" not in exc.details:
                raise

    def leases(self) -> list[LeaseState] | None:
        return None  # etcd expires its leases itself

    def expire(self, leases: Iterable[int]) -> list[int]:
        return []

    # -- keeping up -----------------------------------------------------------------------

    def barrier(self, revision: int) -> int:
        with self._barrier_lock:  # concurrent callers share one barrier write
            if self._barrier < revision:
                resp = self._client.call(
                    self._client.kv.Put,
                    rpc_pb2.PutRequest(key=self.keys.sync, value=b"%d" % time.time_ns()),
                )
                self._barrier = int(resp.header.revision)
            return min(revision, self._barrier)

    def history(self, revision: int) -> Mapping[NodeKey, NodeEntry] | None:
        try:
            resp = self._client.call(
                self._client.kv.Range,
                rpc_pb2.RangeRequest(
                    key=self.keys.nodes, range_end=_prefix_end(self.keys.nodes), revision=revision
                ),
                attempt_timeout=self._client.timeout,
            )
        except EtcdError as exc:
            if exc.code == grpc.StatusCode.OUT_OF_RANGE:  # compacted, or in the future
                return None
            raise
        return self._decode_all(resp.kvs)

    def stale_for(self) -> float:
        return 0.0 if self._watching else time.monotonic() - self._lost_at

    def election(self, ttl: float, name: str) -> EtcdElection:
        return EtcdElection(self._client, self.keys.leader, ttl, name)

    def compact(self, revision: int | None = None) -> int:
        """Compact etcd's history up to ``revision`` (default: the current); for tests/ops."""
        if revision is None:
            resp = self._client.call(
                self._client.kv.Range, rpc_pb2.RangeRequest(key=self.keys.root, count_only=True)
            )
            revision = int(resp.header.revision)
        self._client.call(self._client.kv.Compact, rpc_pb2.CompactionRequest(revision=revision))
        return revision

    # -- internals ------------------------------------------------------------------------

    def _decode_all(self, kvs: Iterable[kv_pb2.KeyValue]) -> dict[NodeKey, NodeEntry]:
        entries = {}
        for kv in kvs:
            decoded = self._decode(kv)
            if decoded is not None and decoded.entry is not None:
                entries[decoded.key] = decoded.entry
        return entries

    def _decode(self, kv: kv_pb2.KeyValue) -> NodeEvent | None:
        """A node key's put as an event; None for other keys and malformed ones (logged)."""
        try:
            key = self.keys.parse_node(kv.key)
            if key is None:
                return None
            entry = NodeEntry(decode_record(kv.value), kv.mod_revision, kv.lease)
            return NodeEvent(key, entry, revision=kv.mod_revision)
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("ignoring malformed key %r: %s", kv.key, exc)
            return None

    def _load(self) -> None:
        resp = self._client.call(
            self._client.kv.Range,
            rpc_pb2.RangeRequest(key=self.keys.nodes, range_end=_prefix_end(self.keys.nodes)),
            attempt_timeout=self._client.timeout,
        )
        digest = hashlib.blake2b(self.keys.root, digest_size=4).hexdigest()
        self._epoch = f"etcd-{resp.header.cluster_id:016x}-{digest}"
        self._revision = int(resp.header.revision)
        assert self._listener is not None
        self._listener.loaded(self._epoch, self._revision, self._decode_all(resp.kvs))

    def _deliver(self, resp: rpc_pb2.WatchResponse) -> None:
        """One watch response → one ``changed`` call (the watch thread only)."""
        events: list[NodeEvent] = []
        revision = self._revision
        assert self._listener is not None
        held = self._listener.revision  # writes of its own it already holds need no decoding
        # revisions whose deletes a request made (a response may span several revisions)
        requested = {ev.kv.mod_revision for ev in resp.events if ev.kv.key == self.keys.dereg}
        for ev in resp.events:
            if ev.kv.mod_revision <= self._revision:
                continue  # already delivered (a reconnect's overlap)
            revision = max(revision, ev.kv.mod_revision)
            if ev.kv.mod_revision <= held:
                continue
            if ev.type == kv_pb2.Event.DELETE:
                try:
                    key = self.keys.parse_node(ev.kv.key)
                except (ValueError, UnicodeDecodeError):
                    continue
                if key is not None:
                    expired = ev.kv.mod_revision not in requested
                    events.append(
                        NodeEvent(key, None, expired=expired, revision=ev.kv.mod_revision)
                    )
            elif (event := self._decode(ev.kv)) is not None:
                events.append(event)
        if revision > self._revision:
            self._revision = revision
            if revision > held:
                self._listener.changed(revision, events)

    def _watch_loop(self) -> None:
        delay = 0.05
        while True:
            with self._lock:
                if self._closed:
                    return
                requests: queue.Queue[object] = queue.Queue()
                self._requests = requests
            requests.put(
                rpc_pb2.WatchRequest(
                    create_request=rpc_pb2.WatchCreateRequest(
                        key=self.keys.root,
                        range_end=_prefix_end(self.keys.root),
                        start_revision=self._revision + 1,
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
                with self._lock:
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
                        self._watching = True
                        continue
                    delay = 0.05
                    if resp.events:  # progress notifications are not trusted (see barrier)
                        self._deliver(resp)
                call.cancel()
            except grpc.RpcError as exc:
                if self._closed:
                    return
                log.warning(
                    "etcd watch broken (%s): reconnecting",
                    exc.code(),
                    extra={"event": "etcd_watch"},
                )
            finally:
                requests.put(_STOP)
                if self._watching:
                    self._watching = False
                    self._lost_at = time.monotonic()
            if self._closed:
                return
            time.sleep(delay)  # backoff before reconnecting
            delay = min(delay * 2, 1.0)
            if reload:
                try:
                    self._load()
                    self.reloads += 1
                except EtcdError as exc:
                    log.warning("etcd reload failed (%s)", exc)


def _put(key: bytes, value: bytes, lease: int = 0) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))


def _requests(q: queue.Queue[object]) -> Iterator[rpc_pb2.WatchRequest]:
    while True:
        item = q.get()
        if item is _STOP or not isinstance(item, rpc_pb2.WatchRequest):
            return
        yield item
