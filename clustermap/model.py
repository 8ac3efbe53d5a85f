"""The map's data model: plain immutable values shared by every layer.

These classes carry no I/O and no validation framework, so the worker-side import stays light.
Validation of untrusted input happens at the edges (the server's gRPC handlers, the sidecar's
response check), which build these values only from data they have already checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, NamedTuple

from clustermap.rules import MAX_PORT

__all__ = [
    "DELTA",
    "DOWN",
    "DRAIN",
    "FULL",
    "NOT_MODIFIED",
    "NOT_READY",
    "POLL_KINDS",
    "STATUSES",
    "STRATEGIES",
    "UP",
    "Ejection",
    "Node",
    "Overlay",
    "Service",
    "SlowStart",
    "Trial",
    "format_address",
    "parse_address",
]

UP: Final = "up"
DOWN: Final = "down"
DRAIN: Final = "drain"
#: Node statuses. Only ``up`` nodes of positive weight receive traffic (see :attr:`Node.healthy`).
STATUSES: Final = (UP, DOWN, DRAIN)

#: Load-balancing strategy names accepted by ``pick(strategy=...)`` and in a service's options.
STRATEGIES: Final = ("round_robin", "random", "weighted", "consistent_hash", "least_request")

#: Poll answer kinds, named once for the server (which answers) and the sidecar (which reads):
#: nothing changed; the changed services only; the whole map; the server is still warming up.
NOT_MODIFIED: Final = "not_modified"
DELTA: Final = "delta"
FULL: Final = "full"
NOT_READY: Final = "not_ready"
POLL_KINDS: Final = (NOT_MODIFIED, DELTA, FULL, NOT_READY)

_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})


class Node(NamedTuple):
    """One backend instance of a service.

    A named tuple rather than a dataclass: a worker decodes every node of a changed service, and
    a tuple is built in half the time (35 µs instead of 80 µs for 100 nodes). Compare nodes with
    each other, not with plain tuples.
    """

    host: str
    port: int
    weight: int = 1
    status: str = UP
    meta: Mapping[str, str] = _EMPTY

    @property
    def address(self) -> str:
        """``host:port``, with IPv6 literals bracketed so the string can be dialled as is."""
        return format_address(self.host, self.port)

    @property
    def healthy(self) -> bool:
        """Whether the node may receive traffic outside panic mode."""
        return self.status == UP and self.weight > 0

    @property
    def key(self) -> tuple[str, int]:
        """The node's identity within its service: two nodes with one address are one node."""
        return (self.host, self.port)


class Ejection(NamedTuple):
    """A node the sidecar took out of rotation from callers' feedback (see docs/feedback.md).

    ``position`` indexes :attr:`Service.nodes`; ``until_ns`` is the wall clock (ns since the
    epoch) at which the node returns on its own, even if no sidecar is left to say so.
    """

    position: int
    until_ns: int
    reason: str


class Trial(NamedTuple):
    """A half-open node's one trial request (docs/feedback.md): the node stays in
    :attr:`Overlay.ejected` for every worker, except that the process holding the feedback row
    whose owner word is ``owner`` serves it to one key-less pick. ``until_ns`` (wall clock) is
    when the trial ends; the node's ejection ends then too, so it returns on the workers' own
    clock if no sidecar is left to judge the trial.
    """

    position: int
    owner: int
    until_ns: int


@dataclass(frozen=True, slots=True)
class Overlay:
    """What the sidecar adds to a service from callers' feedback; never the server's data.

    ``ids`` is parallel to :attr:`Service.nodes`: each node's index into the machine's feedback
    counters (-1: none). ``ejected`` lists the nodes currently ejected; ``trials`` the ejected
    nodes that are half-open, each granted to one worker's row.
    """

    ids: tuple[int, ...] = ()
    ejected: tuple[Ejection, ...] = ()
    trials: tuple[Trial, ...] = ()


class SlowStart(NamedTuple):
    """Nodes of a service ramping up their weight after they joined or came back up, as the
    sidecar publishes them (docs/slow-start.md): every worker ramps on this one clock.

    ``since`` pairs a position in :attr:`Service.nodes` with the wall clock (ns since the epoch)
    at which its ramp starts (in the future for a node ejected until then). A node's weight is
    scaled by ``max(min_weight, (max(elapsed, 1 s) / window) ** (1 / aggression))``.
    """

    window_ns: int
    aggression: float
    min_weight: float
    since: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Service:
    """A named set of nodes plus the options that steer picking among them.

    ``strategy`` is the default used by ``pick`` when the caller names none. ``panic_threshold``
    (0.0-1.0, 0 disables it) is Envoy's panic mode: when the healthy fraction of nodes falls below
    it, picks spread over every node that is ``up`` or ``down`` (never ``drain`` or weight 0, which
    are an operator's decisions). ``revision`` is the server revision at which the service last
    changed. ``overlay`` carries the sidecar's feedback verdicts (node ids, ejections); it takes
    no part in equality, so a service with an overlay equals the server's service.
    """

    name: str
    nodes: tuple[Node, ...] = ()
    strategy: str = "round_robin"
    panic_threshold: float = 0.0
    revision: int = 0
    meta: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    overlay: Overlay | None = field(default=None, compare=False)
    #: Nodes in slow start (the sidecar's, like ``overlay``); None: none.
    slow_start: SlowStart | None = field(default=None, compare=False)

    def healthy_nodes(self) -> tuple[Node, ...]:
        """The nodes that may receive traffic outside panic mode, in map order."""
        return tuple(n for n in self.nodes if n.healthy)


def parse_address(
    text: str, *, check_port: bool = True, allow_zero: bool = False
) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) -> (host, port); ValueError saying what is wrong.

    The one HOST:PORT parser of the package. ``check_port=False`` checks the syntax only, for
    callers that leave the rules to the authority they forward the address to (cmctl's
    registrations: cm-server validates them). ``allow_zero=True`` accepts port 0 ("any free
    port"), for addresses we listen on.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    if check_port and not (0 if allow_zero else 1) <= int(port) <= MAX_PORT:
        raise ValueError(f"{text!r}: port outside {0 if allow_zero else 1}-{MAX_PORT}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def format_address(host: str, port: int) -> str:
    """``host:port``, IPv6 literals bracketed: the inverse of :func:`parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
