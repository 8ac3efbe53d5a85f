"""Protection: which of the server's changes the sidecar publishes now, and which it holds back.

A discovery server that restarted empty, lost its store or saw every heartbeat stop at once can
answer with a map that is mostly or entirely empty. Publishing it would take every backend away
from every worker at once (nacos #4470, envoy #13072). The guard compares the server's map with
what is published and holds back:

* **a mass drop** — the change would remove more than ``max_drop`` of the published nodes: nothing
  is published until the server's map recovers;
* **a service dropping to zero** — a full map in which a service with nodes has none (or is
  gone): that service keeps its published nodes, the rest of the map moves on.

Both are flagged (``protected`` + a reason) and end on their own when the server's map recovers,
or after ``max_hold`` seconds so protection never hides a real outage forever. Deltas are
trusted: they come from the history this sidecar has been following.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from clustermap.model import Service

__all__ = ["Decision", "Guard", "GuardPolicy"]


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    max_drop: float = 0.5  # fraction of published nodes one update may remove
    max_hold: float = 300.0  # seconds before a held change is published anyway
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Decision:
    """What to publish: ``upserts`` and ``removals`` against the published map."""

    upserts: tuple[Service, ...] = ()
    removals: tuple[str, ...] = ()
    held: tuple[str, ...] = ()  # services kept at their published version
    mass_hold: bool = False  # nothing published: the update would remove too much
    reason: str = ""
    released: tuple[str, ...] = ()  # holds that ran past max_hold and were let go now

    @property
    def protected(self) -> bool:
        return self.mass_hold or bool(self.held)


@dataclass(slots=True)
class Guard:
    policy: GuardPolicy = field(default_factory=GuardPolicy)
    clock: Callable[[], float] = time.monotonic
    _held_since: dict[str, float] = field(default_factory=dict)
    _mass_since: float | None = None

    @property
    def holding(self) -> bool:
        """Whether anything is held back (then every poll must re-decide: holds expire)."""
        return self._mass_since is not None or bool(self._held_since)

    def decide(
        self,
        server: Mapping[str, Service],
        published: Mapping[str, Service],
        *,
        full: bool,
        changed: Iterable[str] | None = None,
    ) -> Decision:
        """What to publish. ``changed`` (the names a delta touched) lets an ordinary delta be
        decided without comparing the whole map; a full map or an active hold always is."""
        if changed is not None and not full and not self.holding:
            names = set(changed)
            return Decision(
                tuple(server[n] for n in names if n in server and published.get(n) != server[n]),
                tuple(n for n in names if n not in server and n in published),
            )
        upserts = [s for n, s in server.items() if published.get(n) != s]
        removals = [n for n in published if n not in server]
        if not self.policy.enabled:
            return Decision(tuple(upserts), tuple(removals))
        now = self.clock()
        released: list[str] = []

        # Mass drop: compare node counts of the published map and of the map we would publish.
        before = sum(len(s.nodes) for s in published.values())
        after = sum(len(s.nodes) for s in server.values())
        lost = before - after
        if before and lost > self.policy.max_drop * before:
            if self._mass_since is None:
                self._mass_since = now
            if now - self._mass_since < self.policy.max_hold:
                return Decision(
                    mass_hold=True,
                    reason=(
                        f"held back an update removing {lost} of {before} nodes "
                        f"({lost / before:.0%} > {self.policy.max_drop:.0%}) "
                        f"for {now - self._mass_since:.0f} s"
                    ),
                )
            # Held long enough: publish the update whole, without starting per-service holds
            # that would hide the same outage for another max_hold.
            self._mass_since = None
            self._held_since.clear()
            return Decision(tuple(upserts), tuple(removals), released=("*",))
        self._mass_since = None

        # Per service: a full map must not take a service's last nodes away.
        held: list[str] = []
        for name, pub in published.items():
            if not pub.nodes:
                continue
            new = server.get(name)
            if new is not None and new.nodes:
                self._held_since.pop(name, None)
                continue
            if not full and name not in self._held_since:
                continue  # a delta emptying a service is the server's history: trust it
            since = self._held_since.setdefault(name, now)
            if now - since < self.policy.max_hold:
                held.append(name)
            else:
                del self._held_since[name]
                released.append(name)
        for name in list(self._held_since):
            if name not in published:
                del self._held_since[name]
        if held:
            keep = set(held)
            upserts = [s for s in upserts if s.name not in keep]
            removals = [n for n in removals if n not in keep]
        reason = ""
        if held:
            shown = ", ".join(sorted(held)[:5]) + (" ..." if len(held) > 5 else "")
            reason = f"kept the last nodes of {len(held)} service(s) the server emptied: {shown}"
        return Decision(
            tuple(upserts), tuple(removals), tuple(held), False, reason, tuple(released)
        )
