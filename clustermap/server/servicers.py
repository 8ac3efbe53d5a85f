"""The gRPC servicers: validate the request, call the registry, encode the answer.

Handlers are coroutines on the server's event loop (:mod:`clustermap.server.serving`): they
validate on the loop and hand every registry call, and the encoding of answers, to the blocking
pool. They hold no state of their own besides :class:`_EncodeCache` (encoded services and recent
poll answers, shared by the pool's threads: plain dict operations, atomic under the GIL, and
cached messages are never mutated after insertion) and the Watch streams' hub.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, NoReturn, TypeVar

import grpc
from pydantic import ValidationError

from clustermap._pb.clustermap.v1 import (
    inspection_pb2,
    inspection_pb2_grpc,
    map_pb2,
    registry_pb2,
    registry_pb2_grpc,
    subscription_pb2,
)
from clustermap.rules import MAX_META_BYTES, meta_bytes
from clustermap.server import registry as reg
from clustermap.server.registry import (
    Conflict,
    Exhausted,
    NotFound,
    PollResult,
    Registry,
    RegistryError,
    StoredService,
    Unavailable,
)
from clustermap.server.serving import LoopThread
from clustermap.server.validation import (
    MAX_SERVICE_NAME,
    NodeAddress,
    NodeUpdate,
    Registration,
    reason,
)
from clustermap.server.watch import Answer, WatchHub
from clustermap.wire import node_to_pb, service_to_pb, status_from_pb

__all__ = [
    "InspectionServicer",
    "RegistryServicer",
    "SubscriptionServicer",
    "add_subscription_servicer",
]

log = logging.getLogger("clustermap.server.rpc")

T = TypeVar("T")

MAX_FILTER: Final = 10_000
_POLL_ANSWERS: Final = 256  # distinct (epoch, revision) askers whose answers the loop keeps

_KIND_TO_PB: Final = {
    reg.NOT_MODIFIED: subscription_pb2.POLL_KIND_NOT_MODIFIED,
    reg.DELTA: subscription_pb2.POLL_KIND_DELTA,
    reg.FULL: subscription_pb2.POLL_KIND_FULL,
    reg.NOT_READY: subscription_pb2.POLL_KIND_NOT_READY,
}
_ORIGIN_TO_PB: Final = {
    reg.REGISTERED: map_pb2.NODE_ORIGIN_REGISTERED,
    reg.STATIC: map_pb2.NODE_ORIGIN_STATIC,
}


async def _abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


async def _validated(context: Any, build: Callable[[], T]) -> T:
    try:
        return build()
    except ValidationError as exc:
        why = reason(exc)
        log.info(
            "invalid request", extra={"event": "invalid", "reason": why, "peer": context.peer()}
        )
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, why)


async def _refused(context: Any, exc: RegistryError) -> NoReturn:
    code = grpc.StatusCode.NOT_FOUND if isinstance(exc, NotFound) else grpc.StatusCode.UNKNOWN
    if isinstance(exc, Conflict):
        code = grpc.StatusCode.FAILED_PRECONDITION
    elif isinstance(exc, Unavailable):
        code = grpc.StatusCode.UNAVAILABLE
    elif isinstance(exc, Exhausted):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    await _abort(context, code, str(exc))


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    """Registry calls: validated on the loop, carried out in the blocking pool."""

    def __init__(
        self, registry: Registry, loop: LoopThread, *, max_meta_bytes: int = MAX_META_BYTES
    ) -> None:
        self._registry = registry
        self._loop = loop
        self._max_meta_bytes = max_meta_bytes

    async def Register(
        self, request: registry_pb2.RegisterRequest, context: Any
    ) -> registry_pb2.RegisterResponse:
        def build() -> Registration:
            return Registration(
                service=request.service,
                host=request.host,
                port=request.port,
                weight=request.weight if request.HasField("weight") else 1,
                meta=dict(request.meta),
                ttl=request.ttl_seconds if request.HasField("ttl_seconds") else None,
            )

        registration = await _validated(context, build)
        size = meta_bytes(registration.meta)
        if size > self._max_meta_bytes:
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"meta is {size} bytes; this server takes at most {self._max_meta_bytes} "
                "(--max-meta-bytes)",
            )
        try:
            result = await self._loop.run_blocking(self._registry.register, registration)
        except RegistryError as exc:
            await _refused(context, exc)
        return registry_pb2.RegisterResponse(
            lease_id=result.lease_id,
            ttl_seconds=result.ttl,
            revision=result.revision,
            node=node_to_pb(result.node, map_pb2.NODE_ORIGIN_REGISTERED),
        )

    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: Any
    ) -> registry_pb2.HeartbeatResponse:
        if not request.lease_id or len(request.lease_id) > 64:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "lease_id: missing or malformed"
            )
        try:
            ttl = await self._loop.run_blocking(self._registry.heartbeat, request.lease_id)
        except RegistryError as exc:
            await _refused(context, exc)
        return registry_pb2.HeartbeatResponse(ttl_seconds=ttl)

    async def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: Any
    ) -> registry_pb2.DeregisterResponse:
        addr = await _validated(
            context,
            lambda: NodeAddress(service=request.service, host=request.host, port=request.port),
        )
        try:
            revision = await self._loop.run_blocking(self._registry.deregister, addr)
        except RegistryError as exc:
            await _refused(context, exc)
        return registry_pb2.DeregisterResponse(revision=revision)

    async def UpdateNode(
        self, request: registry_pb2.UpdateNodeRequest, context: Any
    ) -> registry_pb2.UpdateNodeResponse:
        def build() -> NodeUpdate:
            status = None
            if request.status != map_pb2.NODE_STATUS_UNSPECIFIED:
                try:
                    status = status_from_pb(request.status)
                except ValueError:
                    status = f"#{request.status}"  # rejected with a clear reason below
            return NodeUpdate(
                service=request.service,
                host=request.host,
                port=request.port,
                weight=request.weight if request.HasField("weight") else None,
                status=status,
            )

        update = await _validated(context, build)
        try:
            revision, node, origin = await self._loop.run_blocking(
                self._registry.update_node, update
            )
        except RegistryError as exc:
            await _refused(context, exc)
        return registry_pb2.UpdateNodeResponse(
            revision=revision, node=node_to_pb(node, _ORIGIN_TO_PB[origin])
        )


_SERVICES_FIELD: Final = subscription_pb2.PollResponse.DESCRIPTOR.fields_by_name["services"].number
_SERVICES_TAG: Final = bytes([(_SERVICES_FIELD << 3) | 2])  # length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _EncodeCache:
    """Serialized services by (name, revision), and whole serialized answers for common cases.

    A poll answer is assembled as bytes: the small header message serialized, followed by each
    service's cached ``services`` field (protobuf allows a message's fields in any order and
    concatenated repeated fields), so a full map is a join of cached byte strings instead of
    copying and re-serializing every service. Many subscribers ask the same questions (the full
    map at the current revision, the delta from the previous one, not-modified), so those whole
    answers are cached too. Cached values are immutable bytes, safe to share across threads.
    """

    def __init__(self, answers: int = 64) -> None:
        self._services: dict[str, tuple[tuple[int, int], bytes]] = {}
        self._answers: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._max_answers = answers
        self._lock = threading.Lock()

    def service_field(self, stored: StoredService) -> bytes:
        # keyed by revision *and* digest: with the etcd store a service's revision is its keys'
        # newest mod_revision, which a node's removal need not change
        name, version = stored.service.name, (stored.service.revision, stored.digest)
        hit = self._services.get(name)
        if hit is not None and hit[0] == version:
            return hit[1]
        payload = service_to_pb(stored.service, stored.digest).SerializeToString()
        field = _SERVICES_TAG + _varint(len(payload)) + payload
        self._services[name] = (version, field)
        return field

    def forget(self, names: tuple[str, ...]) -> None:
        for name in names:
            self._services.pop(name, None)

    def answer(self, key: tuple[object, ...] | None, result: PollResult) -> bytes:
        if key is not None:
            with self._lock:
                hit = self._answers.get(key)
            if hit is not None:
                return hit
        if result.removed:
            self.forget(result.removed)
        head = subscription_pb2.PollResponse(
            kind=_KIND_TO_PB[result.kind],
            epoch=result.epoch,
            revision=result.revision,
            checksum=result.checksum,
            removed=result.removed,
            self_preservation=result.self_preservation,
            retry_after_seconds=result.retry_after,
        ).SerializeToString()
        data = b"".join([head, *(self.service_field(s) for s in result.services)])
        if key is not None:
            with self._lock:
                self._answers[key] = data
                while len(self._answers) > self._max_answers:
                    self._answers.popitem(last=False)
        return data


def _passthrough(data: bytes) -> bytes:
    return data


def add_subscription_servicer(servicer: SubscriptionServicer, server: Any) -> None:
    """Register ``servicer`` like the generated ``add_SubscriptionServicer_to_server``, except
    that its answers are already serialized (see :class:`_EncodeCache`)."""
    handlers = {
        "Poll": grpc.unary_unary_rpc_method_handler(
            servicer.Poll,
            request_deserializer=subscription_pb2.PollRequest.FromString,
            response_serializer=_passthrough,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch,
            request_deserializer=subscription_pb2.PollRequest.FromString,
            response_serializer=_passthrough,
        ),
    }
    name = subscription_pb2.DESCRIPTOR.services_by_name["Subscription"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


class SubscriptionServicer:
    """Poll and Watch. Answers are serialized ``PollResponse`` bytes: register the servicer
    with :func:`add_subscription_servicer`. Registry calls and encoding run in the blocking
    pool; Watch streams are coroutines of the :class:`~clustermap.server.watch.WatchHub`."""

    def __init__(
        self,
        registry: Registry,
        loop: LoopThread,
        *,
        keepalive: float = 15.0,
        max_watchers: int = 10_000,
        on_answer: Callable[[str], None] | None = None,
        on_stream: Callable[[int], None] | None = None,
    ) -> None:
        self._registry = registry
        self._loop = loop
        self._on_answer = on_answer
        self._cache = _EncodeCache()
        # the loop's own: recent whole-map poll answers by the asker's (epoch, revision), good
        # while the registry stays where they were made (a poll answered again costs no trip)
        self._polls: dict[tuple[str, int], Answer] = {}
        self._polls_revision = -1
        self.hub = WatchHub(
            registry,
            loop,
            self.answer,
            keepalive=keepalive,
            max_streams=max_watchers,
            on_answer=on_answer,
            on_stream=on_stream,
        )

    async def _names(
        self, request: subscription_pb2.PollRequest, context: Any
    ) -> frozenset[str] | None:
        if not request.services:
            return None
        if len(request.services) > MAX_FILTER or any(
            not n or len(n) > MAX_SERVICE_NAME for n in request.services
        ):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"services: at most {MAX_FILTER} names of 1-{MAX_SERVICE_NAME} characters",
            )
        return frozenset(request.services)

    def answer(self, epoch: str, revision: int, names: frozenset[str] | None) -> Answer:
        """The answer to a subscriber at (``epoch``, ``revision``): blocking (pool only)."""
        result = self._registry.poll(epoch, revision, names)
        key: tuple[object, ...] | None = None
        if names is None and result.kind == reg.NOT_MODIFIED:
            key = (reg.NOT_MODIFIED, result.epoch, result.revision, result.self_preservation)
        elif names is None and result.kind == reg.FULL:
            key = (reg.FULL, result.epoch, result.revision, result.self_preservation)
        elif names is None and result.kind == reg.DELTA:
            key = (reg.DELTA, result.epoch, revision, result.revision, result.self_preservation)
        return result, self._cache.answer(key, result)

    async def Poll(self, request: subscription_pb2.PollRequest, context: Any) -> bytes:
        names = await self._names(request, context)
        key = (request.epoch, request.revision)
        if names is None:  # the common polls: answered on the loop, no trip to the pool
            cached = self.hub.current(*key) or self._answered(key)
            if cached is not None:
                if self._on_answer is not None:
                    self._on_answer(cached[0].kind)
                return cached[1]
        try:
            result, data = await self._loop.run_blocking(self.answer, *key, names)
        except Unavailable as exc:
            await _refused(context, exc)
        if names is None and result.kind != reg.NOT_READY:
            # answers of one revision only (a full answer at it is one shared bytes object)
            if len(self._polls) >= _POLL_ANSWERS or result.revision != self._polls_revision:
                self._polls.clear()
                self._polls_revision = result.revision
            self._polls[key] = (result, data)
        if self._on_answer is not None:
            self._on_answer(result.kind)
        return data

    def _answered(self, key: tuple[str, int]) -> Answer | None:
        """A whole-map poll's answer made before, if the registry is still where it was then:
        the same epoch, revision and self-preservation, its store followed (lock-free reads;
        on the loop only)."""
        hit = self._polls.get(key)
        if hit is None:
            return None
        result, registry = hit[0], self._registry
        if (
            result.revision != registry.revision
            or result.epoch != registry.epoch
            or result.self_preservation != registry.self_preservation
            or not registry.following()
        ):
            del self._polls[key]
            return None
        return hit

    async def Watch(self, request: subscription_pb2.PollRequest, context: Any) -> None:
        names = await self._names(request, context)
        await self.hub.serve(request.epoch, request.revision, names, context)


class InspectionServicer(inspection_pb2_grpc.InspectionServicer):
    """Read-only views of the registry, built in the blocking pool."""

    def __init__(self, registry: Registry, loop: LoopThread) -> None:
        self._registry = registry
        self._loop = loop

    async def ListServices(
        self, request: inspection_pb2.ListServicesRequest, context: Any
    ) -> inspection_pb2.ListServicesResponse:
        return await self._loop.run_blocking(self._list_services)

    def _list_services(self) -> inspection_pb2.ListServicesResponse:
        revision, services = self._registry.services()
        return inspection_pb2.ListServicesResponse(
            revision=revision,
            services=[
                inspection_pb2.ServiceSummary(
                    name=s.name,
                    nodes=len(s.nodes),
                    healthy=len(s.healthy_nodes()),
                    revision=s.revision,
                )
                for s in services
            ],
        )

    async def GetService(
        self, request: inspection_pb2.GetServiceRequest, context: Any
    ) -> inspection_pb2.GetServiceResponse:
        if not request.name or len(request.name) > MAX_SERVICE_NAME:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"name: 1-{MAX_SERVICE_NAME} characters (got {len(request.name)})",
            )
        try:
            return await self._loop.run_blocking(self._get_service, request.name)
        except RegistryError as exc:
            await _refused(context, exc)

    def _get_service(self, name: str) -> inspection_pb2.GetServiceResponse:
        revision, stored, origins = self._registry.service(name)
        pb_origins = {k: _ORIGIN_TO_PB[v] for k, v in origins.items()}
        return inspection_pb2.GetServiceResponse(
            revision=revision, service=service_to_pb(stored.service, stored.digest, pb_origins)
        )

    async def GetStatus(
        self, request: inspection_pb2.GetStatusRequest, context: Any
    ) -> inspection_pb2.GetStatusResponse:
        st = await self._loop.run_blocking(self._registry.status)
        return inspection_pb2.GetStatusResponse(
            epoch=st.epoch,
            revision=st.revision,
            ready=st.ready,
            self_preservation=st.self_preservation,
            services=st.services,
            nodes=st.nodes,
            leases=st.leases,
            overdue_leases=st.overdue_leases,
            checksum=st.checksum,
            uptime_seconds=st.uptime,
        )
