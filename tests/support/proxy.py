"""A real gRPC proxy in front of cm-server that alters answers: the tests' hostile network."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures

import grpc

from clustermap._pb.clustermap.v1 import subscription_pb2, subscription_pb2_grpc

__all__ = ["TamperingProxy"]


class TamperingProxy(subscription_pb2_grpc.SubscriptionServicer):
    """A real gRPC server in front of cm-server that alters the first delta with ``tamper``,
    on polls and streams alike."""

    def __init__(self, upstream: str, tamper: Callable[[subscription_pb2.PollResponse], None]):
        self.channel = grpc.insecure_channel(upstream)
        self.stub = subscription_pb2_grpc.SubscriptionStub(self.channel)
        self.tamper = tamper
        self.tampered = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        subscription_pb2_grpc.add_SubscriptionServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _pass(self, resp: subscription_pb2.PollResponse) -> subscription_pb2.PollResponse:
        if resp.kind == subscription_pb2.POLL_KIND_DELTA and not self.tampered:
            self.tamper(resp)
            self.tampered += 1
        return resp

    def Poll(self, request, context):  # type: ignore[no-untyped-def]
        return self._pass(self.stub.Poll(request, timeout=5))

    def Watch(self, request, context):  # type: ignore[no-untyped-def]
        upstream = self.stub.Watch(request)
        context.add_callback(upstream.cancel)
        for resp in upstream:
            yield self._pass(resp)

    def close(self) -> None:
        self.server.stop(0)
        self.channel.close()
