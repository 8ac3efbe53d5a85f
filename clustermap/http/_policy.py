"""The rules shared by the requests and httpx glue (and the gRPC helper's retries): pure, no I/O.

One home for each rule: which statuses are failures, which methods are idempotent, when a failed
attempt is retried and after how long, how a URL is rewritten to a node and which name TLS
verifies. The library modules only translate their own exceptions into a :class:`Failure`.
"""

from __future__ import annotations

import enum
import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from clustermap.feedback.budget import BudgetRule
from clustermap.feedback.retries import jittered_backoff
from clustermap.model import Node

__all__ = [
    "ATTEMPT_HEADER",
    "FAILURE_STATUSES",
    "IDEMPOTENT_METHODS",
    "RETRY_STATUSES",
    "Failure",
    "Policy",
    "Target",
    "node_netloc",
    "rewrite",
    "target_of",
    "target_of_host",
]

#: RFC 9110 §9.2.2: methods whose repetition has the same effect as one request.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: Responses that count as a failure of the node in the shared feedback.
FAILURE_STATUSES: Final = frozenset(range(500, 600))
#: Responses after which an idempotent request is retried on another node (Envoy's
#: ``retry_on: gateway-error``; a 500 is usually the request's fault, not the node's).
RETRY_STATUSES: Final = frozenset({502, 503, 504})
#: Sent with every attempt to a node (1, 2, ...), like Envoy's ``x-envoy-attempt-count``.
ATTEMPT_HEADER: Final = "X-ClusterMap-Attempt"


class Failure(enum.Enum):
    """How an attempt failed, as far as retrying is concerned."""

    CONNECT = "connect"  # no connection: nothing was sent, any method may go elsewhere
    TIMEOUT = "timeout"  # connected, no answer in time: the node may have acted on it
    RESET = "reset"  # connected, the connection broke: the node may have acted on it
    STATUS = "status"  # an answer whose status is in ``retry_statuses``


@dataclass(frozen=True, slots=True)
class Policy:
    """What counts as a failure and when to retry; shared by Session, Transport, AsyncTransport.

    A request that could not connect is retried on another node whatever its method. A request
    with an idempotent method and a body that can be sent again is also retried after a status in
    ``retry_statuses``, a broken connection (``retry_on_reset``) or a timeout
    (``retry_on_timeout``, off by default: the node may still be working on it). At most
    ``max_retries`` retries, each on a node not tried yet, each after a jittered backoff and
    only within the machine's retry budget (``budget``).
    """

    failure_statuses: frozenset[int] = FAILURE_STATUSES
    retry_statuses: frozenset[int] = RETRY_STATUSES
    idempotent_methods: frozenset[str] = IDEMPOTENT_METHODS
    retry_on_reset: bool = True
    retry_on_timeout: bool = False
    max_retries: int = 2
    #: Full jitter: the n-th retry waits uniform(0, min(backoff_max, backoff_base * 2**(n-1))).
    #: Envoy's defaults (25 ms base, 10 x the base at most).
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    budget: BudgetRule = field(default_factory=BudgetRule)

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError("max_retries, backoff_base and backoff_max must be >= 0")

    def is_failure(self, status: int) -> bool:
        return status in self.failure_statuses

    def may_retry(self, failure: Failure, method: str, replayable: bool, retries: int) -> bool:
        """Whether the policy allows one more attempt after ``retries`` retries (the budget and
        the choice of another node are asked separately)."""
        if retries >= self.max_retries:
            return False
        if failure is Failure.CONNECT:
            return True
        if not replayable or method.upper() not in self.idempotent_methods:
            return False
        if failure is Failure.TIMEOUT:
            return self.retry_on_timeout
        if failure is Failure.RESET:
            return self.retry_on_reset
        return True

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...): jittered, so workers that
        failed together do not come back together."""
        return jittered_backoff(retry, self.backoff_base, self.backoff_max, rand)


class Target(NamedTuple):
    """A request whose host is a service in the map."""

    service: str
    host_header: str  # what the Host header keeps: the URL's host[:port], as the client sent it
    tls_name: str  # the name TLS sends as SNI and verifies the certificate against


def _is_ip(host: str) -> bool:
    if not (host[-1:].isdigit() or ":" in host):  # cheap: a name never ends in a digit-only label
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def target_of_host(
    host: str, host_header: str, is_service: Callable[[str], bool], tls_server_name: str | None
) -> Target | None:
    """The service ``host`` (already lower-case) names, or None when it is not a service in the
    map (an IP literal never is)."""
    if not host or _is_ip(host) or not is_service(host):
        return None
    return Target(host, host_header, tls_server_name or host)


def target_of(
    url: str, is_service: Callable[[str], bool], tls_server_name: str | None = None
) -> Target | None:
    """The service ``url`` names, or None when its host is not a service in the map.
    ``tls_server_name`` overrides the name TLS verifies (default: the service name)."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return None
    return target_of_host(host, parts.netloc.rpartition("@")[2], is_service, tls_server_name)


def node_netloc(node: Node) -> str:
    return node.address


def rewrite(url: str, node: Node) -> str:
    """``url`` sent to ``node`` instead of its service: scheme, user info, path, query kept;
    the URL's port (if any) gives way to the node's."""
    parts = urlsplit(url)
    user, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(
        (parts.scheme, f"{user}{at}{node_netloc(node)}", parts.path, parts.query, parts.fragment)
    )
