"""Polling the servers: one gRPC channel per server, failover in order, backoff per server.

The only module of the sidecar that speaks gRPC. A poll round tries the servers that are not
backing off, in the configured order, and returns the first valid answer; an error, a deadline or a
malformed answer counts against that server and the round moves on to the next. A service the
sidecar cannot accept is set aside in the answer (``PollAnswer.rejected``), not held against the
server: the rest of the answer is good.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from clustermap._pb.clustermap.v1 import subscription_pb2_grpc
from clustermap.retry import Backoff
from clustermap.sidecar.answers import rpc_error, set_aside_invalid
from clustermap.sidecar.config import SidecarSettings
from clustermap.wire import PollAnswer, WireError, poll_answer_from_pb, poll_request

__all__ = ["PollFailed", "Polled", "Poller", "subscription_stubs"]

log = logging.getLogger("clustermap.sidecar")

_MAX_MESSAGE = 512 << 20  # a full map of 10 000 services x 100 nodes is ~40 MiB


class PollFailed(Exception):
    """No server gave a valid answer this round; the message lists each server's error."""


@dataclass(frozen=True, slots=True)
class Polled:
    server: str
    answer: PollAnswer
    failovers: int  # servers that failed before this one answered, this round


def subscription_stubs(
    settings: SidecarSettings, options: list[tuple[str, int]]
) -> tuple[dict[str, grpc.Channel], dict[str, subscription_pb2_grpc.SubscriptionStub]]:
    """One channel and Subscription stub per configured server, in failover order: the same
    credentials, message limit and no gRPC-level retries (failover and backoff are ours), plus
    the caller's ``options`` (keepalive pings differ between polling and a held stream)."""
    credentials = _credentials(settings)
    opts = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.enable_retries", 0),
        *options,
    ]
    channels: dict[str, grpc.Channel] = {}
    stubs: dict[str, subscription_pb2_grpc.SubscriptionStub] = {}
    for server in settings.server:
        if credentials is None:
            channel = grpc.insecure_channel(server, options=opts)
        else:
            channel = grpc.secure_channel(server, credentials, options=opts)
        channels[server] = channel
        stubs[server] = subscription_pb2_grpc.SubscriptionStub(channel)
    return channels, stubs


class Poller:
    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        self.backoff = Backoff(list(settings.server), settings.backoff_base, settings.backoff_max)
        token = settings.bearer_token()
        self._metadata: Sequence[tuple[str, str]] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._channels, self._stubs = subscription_stubs(
            settings, [("grpc.keepalive_time_ms", 30_000)]
        )

    def poll(self, epoch: str, revision: int) -> Polled:
        request = poll_request(epoch, revision, self.settings.services)
        errors: list[str] = []
        for server in self.backoff.order():
            try:
                msg = self._stubs[server].Poll(
                    request, timeout=self.settings.timeout, metadata=self._metadata
                )
                answer = set_aside_invalid(poll_answer_from_pb(msg))
            except grpc.RpcError as exc:
                errors.append(f"{server}: {rpc_error(exc)}")
            except WireError as exc:
                errors.append(f"{server}: malformed answer: {exc}")
                log.error("rejected a malformed answer from %s: %s", server, exc)
            else:
                self.backoff.succeeded(server)
                return Polled(server, answer, len(errors))
            delay = self.backoff.failed(server)
            log.debug("%s failed (%s); next try in %.2f s", server, errors[-1], delay)
        raise PollFailed("; ".join(errors))

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


def _credentials(settings: SidecarSettings) -> grpc.ChannelCredentials | None:
    if settings.tls_ca is None and settings.tls_cert is None:
        return None
    root = settings.tls_ca.read_bytes() if settings.tls_ca else None
    cert = settings.tls_cert.read_bytes() if settings.tls_cert else None
    key = settings.tls_key.read_bytes() if settings.tls_key else None
    return grpc.ssl_channel_credentials(root, key, cert)
