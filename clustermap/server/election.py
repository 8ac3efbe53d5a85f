"""Leader election on etcd: which replica probes the static clusters and writes verdicts.

etcd's own recipe (``clientv3/concurrency`` ``Election.Campaign``, what etcd's v3election API
runs), over our etcd client:

1. grant a lease of ``ttl`` seconds and keep it alive (every ``ttl``/3);
2. create ``P leader/<lease id>`` attached to it, in a ``Txn`` that only puts when the key's
   ``create_revision`` is 0 (absent), otherwise reads it back; its create revision is the
   candidate's place in line;
3. lead once no key under ``P leader/`` has a smaller create revision (etcd's ``waitDeletes``:
   the last-created key with ``max_create_revision`` = ours - 1, polled every ``ttl``/10 at
   most, where etcd's recipe watches it for deletion).

A leader that dies stops renewing: etcd expires its lease within ``ttl`` and deletes its key,
and the next in line leads. The :class:`~clustermap.server.store.Term` (leader key and its
create revision) fences every verdict write (a ``CREATE`` compare on that key, see
:meth:`~clustermap.server.etcd_store.EtcdStore.commit`), so a deposed leader (paused, cut off,
its lease expired) cannot write even if it still believes it leads. Locally, a leader stops
acting once etcd says its lease is gone, or when renewals have failed for a whole ``ttl`` since
the last one that succeeded was sent (a renewal merely late on a loaded machine does not end
the term: the fence keeps that safe).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time

from clustermap._pb.etcd.etcdserverpb import rpc_pb2
from clustermap.server.etcd_client import Client, EtcdError
from clustermap.server.etcd_codec import prefix_end
from clustermap.server.store import Term

__all__ = ["EtcdElection"]

log = logging.getLogger("clustermap.server.election")


class EtcdElection:
    """One replica's candidacy (see the module docstring)."""

    def __init__(self, client: Client, root: bytes, ttl: float, name: str) -> None:
        self._client = client
        self._root = root
        self._ttl = max(1, math.ceil(ttl))
        self._name = name.encode()
        self._lock = threading.Lock()
        self._term: Term | None = None
        self._renewed = 0.0
        self._stop = threading.Event()

    @property
    def ttl(self) -> int:
        return self._ttl

    def campaign(self, stop: threading.Event) -> Term | None:
        poll = min(0.2, self._ttl / 10)
        while not stop.is_set():
            try:
                term = self._candidate()
                while not stop.is_set() and self.leading(term):
                    ahead = self._client.call(  # (a Range's count ignores these filters)
                        self._client.kv.Range,
                        rpc_pb2.RangeRequest(
                            key=self._root,
                            range_end=prefix_end(self._root),
                            max_create_revision=term.revision - 1,
                            sort_target=rpc_pb2.RangeRequest.CREATE,
                            sort_order=rpc_pb2.RangeRequest.DESCEND,
                            limit=1,
                            keys_only=True,
                        ),
                    )
                    if not ahead.kvs:
                        log.info(
                            "elected: this replica probes",
                            extra={"event": "elected", "term": term.revision},
                        )
                        return term
                    stop.wait(poll)
            except EtcdError as exc:
                log.warning("election: %s", exc, extra={"event": "election_error"})
                stop.wait(min(1.0, self._ttl / 3))
        return None

    def leading(self, term: Term) -> bool:
        with self._lock:
            return self._term == term

    def resign(self) -> None:
        """Give up (stop renewing and revoke the lease: the next in line leads at once)."""
        with self._lock:
            term, self._term = self._term, None
            self._stop.set()
        if term is not None:
            with contextlib.suppress(EtcdError):  # else it expires on its own
                self._client.call(
                    self._client.lease.LeaseRevoke, rpc_pb2.LeaseRevokeRequest(ID=term.lease)
                )

    def _candidate(self) -> Term:
        """This replica's live candidacy: the current one, or a new lease and key."""
        with self._lock:
            term = self._term
        if term is not None and self.leading(term):
            return term
        granted = self._client.call(
            self._client.lease.LeaseGrant, rpc_pb2.LeaseGrantRequest(TTL=self._ttl)
        )
        lease = int(granted.ID)
        sent = time.monotonic()
        key = self._root + b"%x" % lease
        resp = self._client.call(
            self._client.kv.Txn,
            rpc_pb2.TxnRequest(
                compare=[
                    rpc_pb2.Compare(
                        key=key,
                        target=rpc_pb2.Compare.CREATE,
                        result=rpc_pb2.Compare.EQUAL,
                        create_revision=0,
                    )
                ],
                success=[
                    rpc_pb2.RequestOp(
                        request_put=rpc_pb2.PutRequest(key=key, value=self._name, lease=lease)
                    )
                ],
                failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))],
            ),
        )
        if resp.succeeded:
            revision = int(resp.header.revision)
        else:  # a retried Txn that had landed: the key is ours already
            revision = int(resp.responses[0].response_range.kvs[0].create_revision)
        term = Term(key, revision, lease)
        with self._lock:
            self._stop.set()  # the previous candidacy's renewer, if any
            self._stop = stop = threading.Event()
            self._term, self._renewed = term, sent
        threading.Thread(
            target=self._renew, args=(term, stop), name="cm-election", daemon=True
        ).start()
        return term

    def _renew(self, term: Term, stop: threading.Event) -> None:
        """Keep the candidacy's lease alive every ttl/3 until it is gone or replaced."""
        while not stop.wait(self._ttl / 3):
            sent = time.monotonic()
            try:
                ttl = self._client.keepalive(term.lease)
            except EtcdError as exc:
                log.warning("election lease not renewed: %s", exc)
                with self._lock:
                    if self._term == term and time.monotonic() - self._renewed >= self._ttl:
                        self._term = None  # unrenewed for a TTL: etcd has expired it
                        log.warning("election lease lost: no longer probing")
                        return
                continue
            with self._lock:
                if self._term != term:
                    return
                if ttl <= 0:  # expired in etcd: our key is gone, the term is over
                    self._term = None
                    log.warning("election lease expired: no longer probing")
                    return
                self._renewed = sent
