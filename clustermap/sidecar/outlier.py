"""Outlier detection from callers' feedback (pure: numbers in, verdicts out, no I/O, no clock).

Envoy's semantics and defaults where they fit (docs/feedback.md lists the differences):

* **consecutive failures** (``consecutive_failures``, 5): failures of a node with no success in
  between, from whichever workers of the machine. The sidecar sees the rows once per sweep, so
  within one sweep the order of a success and a failure from different workers is unknown: a
  sweep with a success keeps only the failures each worker saw after its own last success.
* **failure percentage** (off unless ``failure_percentage`` is set, as Envoy's enforcement is
  0 by default): every ``interval``, in a service with at least ``minimum_hosts`` nodes that had
  ``request_volume`` calls each, a node failing at least that percentage of them is ejected.
* **success rate** (Envoy's statistical detector, on by default as there): every ``interval``,
  in a service with at least ``success_rate_minimum_hosts`` nodes that had
  ``success_rate_request_volume`` calls each, a node whose success rate is below
  ``mean - success_rate_stdev_factor x stdev`` of those nodes' rates (population standard
  deviation, as Envoy) is ejected, with probability ``success_rate_enforcing`` %.
* **ejection time** = ``base_ejection_time`` × times ejected, at most ``max_ejection_time``; the
  multiplier drops by one for each ``interval`` the node spends in service.
* **bounded share**: at most ``max_ejection_percent`` of a service's nodes are ejected at once,
  but always at least one may be.
* the node **returns on its own** when its time is up, with its streak forgotten; or, with
  ``half_open_tries`` > 0, goes **half-open** first: it stays ejected for every worker but one,
  the process holding a row the caller's ``choose`` names (one that recently called the
  service), which sends it one trial request. Its outcome (``outcomes``) decides: a success
  returns the node, a failure ejects it again for base × (times ejected + 1); no outcome within
  ``half_open_timeout`` (or the row's owner gone) moves the trial to another row, and after
  ``half_open_tries`` rows the node returns, as it would without half-open.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

__all__ = [
    "TRIAL_GRACE_S",
    "Ejected",
    "HalfOpen",
    "Observation",
    "OutlierPolicy",
    "Outliers",
    "SuccessRateVerdict",
    "success_rate_outliers",
]


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_failures: int = 5
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 10.0
    interval: float = 10.0
    failure_percentage: float | None = None
    minimum_hosts: int = 5
    request_volume: int = 50
    #: Envoy's success_rate_stdev_factor is 1900 in thousandths: 1.9 here.
    success_rate_stdev_factor: float = 1.9
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    #: Percent chance that a success-rate outlier is ejected (0: the detector is off).
    success_rate_enforcing: float = 100.0
    #: Rows a half-open node's trial is offered to in turn before it simply returns (0: no
    #: half-open state; the node returns when its time is up).
    half_open_tries: int = 3
    #: Seconds a row has to send the trial request and record its outcome.
    half_open_timeout: float = 10.0


#: An ejection (with half-open on) or a trial ends on the workers' clocks this much past the
#: sidecar's own end, so the node never returns to every worker in between the sidecar's
#: deciding and its publishing the half-open state or the next row's trial; if the sidecar is
#: gone, the node returns then.
TRIAL_GRACE_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class HalfOpen:
    """A half-open node's trial: granted to feedback row ``row`` while its owner word is
    ``owner``, until ``deadline`` (monotonic); ``tried`` are the rows offered it so far."""

    row: int
    owner: int
    deadline: float
    tried: frozenset[int]


@dataclass(frozen=True, slots=True)
class Observation:
    """What one sweep saw of one node, summed over every live row.

    ``tail`` is the sum over rows of the failures each row had after its own last success
    within this sweep (its streak, capped at its failures this sweep).
    """

    ok: int = 0
    failed: int = 0
    tail: int = 0


@dataclass(frozen=True, slots=True)
class Ejected:
    """A node out of rotation: until when (the caller's monotonic clock) and why."""

    until: float
    reason: str
    times: int
    #: Which detector: "consecutive", "failure_percentage", "success_rate", or "trial" for a
    #: failed trial request (metrics label).
    kind: str = "consecutive"
    #: Set while the node is half-open (``until`` is then the trial's end plus a grace).
    half_open: HalfOpen | None = None


@dataclass(frozen=True, slots=True)
class SuccessRateVerdict:
    """One interval's success-rate analysis of a service: the mean of the rates (percent) of
    the nodes with enough calls, the threshold below which a node is an outlier, and those."""

    mean: float
    threshold: float
    outliers: tuple[int, ...]


def success_rate_outliers(
    counts: Mapping[int, tuple[int, int]],
    stdev_factor: float,
    minimum_hosts: int,
    request_volume: int,
) -> SuccessRateVerdict | None:
    """Envoy's success-rate detector over one interval's ``{node: (successes, failures)}``.

    Nodes with fewer than ``request_volume`` calls take no part; with fewer than
    ``minimum_hosts`` nodes left there is no verdict (None). Otherwise each node's success rate
    is ``100 x successes / calls``, and the outliers are the nodes whose rate is below
    ``mean - stdev_factor x stdev`` (population standard deviation over the same nodes).
    """
    rates = {
        i: 100.0 * ok / (ok + failed)
        for i, (ok, failed) in counts.items()
        if ok + failed >= max(1, request_volume)
    }
    if len(rates) < max(1, minimum_hosts):
        return None
    mean = sum(rates.values()) / len(rates)
    stdev = math.sqrt(sum((r - mean) ** 2 for r in rates.values()) / len(rates))
    threshold = mean - stdev_factor * stdev
    return SuccessRateVerdict(
        mean, threshold, tuple(sorted(i for i, r in rates.items() if r < threshold))
    )


#: ``choose(service, node id, rows tried) -> (row, owner word) | None``: a row for a trial.
Chooser = Callable[[str, int, frozenset[int]], "tuple[int, int] | None"]


@dataclass(slots=True)
class _Node:
    streak: int = 0
    times: int = 0
    ejected: Ejected | None = None
    window_ok: int = 0
    window_failed: int = 0
    last_decay: float = 0.0


@dataclass(slots=True)
class Outliers:
    """Per-node state, keyed by node id, grouped by service for the ejected share."""

    policy: OutlierPolicy
    _nodes: dict[int, _Node] = field(default_factory=dict)
    _interval_at: float = 0.0
    #: Uniform in [0, 1): decides a partly enforced ejection (``success_rate_enforcing``).
    draw: Callable[[], float] = random.random
    #: What the last :meth:`step` did with trials: (service, node id, "started" | "success" |
    #: "failure" | "moved" | "returned").
    trial_events: list[tuple[str, int, str]] = field(default_factory=list)

    def drop(self, node_ids: Iterable[int]) -> None:
        """Drop the state of these nodes (gone from the map)."""
        for node_id in node_ids:
            self._nodes.pop(node_id, None)

    def ejected(self, node_id: int) -> Ejected | None:
        node = self._nodes.get(node_id)
        return node.ejected if node is not None else None

    def published_until(self, e: Ejected) -> float:
        """When the workers end ``e`` on their own clocks: with half-open on, a grace after the
        sidecar's own end, so the node never returns to every worker in the moment between
        that end and the sidecar's publishing the half-open state (or the next trial)."""
        if e.half_open is None and self.policy.half_open_tries > 0:
            return e.until + TRIAL_GRACE_S
        return e.until

    def ejected_ids(self) -> list[int]:
        return [i for i, n in self._nodes.items() if n.ejected is not None]

    def interval_due(self, now: float) -> bool:
        """Whether the next :meth:`step` at ``now`` ends an interval (it then judges the
        failure percentage and success rate of every service it is given)."""
        return now - self._interval_at >= self.policy.interval

    def streak(self, node_id: int) -> int:
        node = self._nodes.get(node_id)
        return node.streak if node is not None else 0

    def step(
        self,
        now: float,
        seen: Mapping[int, Observation],
        services: Mapping[str, list[int]],
        outcomes: Mapping[int, bool | None] | None = None,
        choose: Chooser | None = None,
    ) -> tuple[set[str], list[tuple[str, int, Ejected]]]:
        """One sweep at ``now``: (services whose ejections changed, new ejections).

        ``services`` maps each service to its nodes' ids (-1 for a node without one); it needs
        only the services with a node in ``seen`` or ejected. ``outcomes`` are the results of
        half-open nodes' trials seen this sweep from their trial rows (True: success, False:
        failure, None: the row's owner is gone); ``choose(service, node id, rows tried)`` names
        a row ``(row, owner)`` for a trial, or None (then, or without it, nodes return at once).
        """
        p = self.policy
        nodes = self._nodes
        self.trial_events = []
        for node_id, o in seen.items():
            node = nodes.get(node_id)
            if node is None:
                node = nodes[node_id] = _Node(last_decay=now)
            if node.ejected is not None:
                continue  # calls that were in flight when it was ejected: not evidence
            node.streak = o.tail if o.ok else node.streak + o.failed
            node.window_ok += o.ok
            node.window_failed += o.failed
        changed: set[str] = set()
        new: list[tuple[str, int, Ejected]] = []
        interval_due = self.interval_due(now)
        for name, ids in services.items():
            members = [(i, nodes[i]) for i in ids if i >= 0 and i in nodes]
            if not members:
                continue
            out = 0
            for i, node in members:
                e = node.ejected
                if e is not None and (e.half_open is not None or now >= e.until):
                    self._half_open(name, i, node, now, outcomes, choose, changed, new)
                if node.ejected is not None:
                    out += 1
                elif now - node.last_decay >= p.interval:  # one step per interval in service
                    steps = int((now - node.last_decay) / p.interval)
                    node.times = max(0, node.times - steps)
                    node.last_decay += steps * p.interval
            allowed = max(1, int(len(ids) * p.max_ejection_percent / 100))
            candidates: list[tuple[int, _Node, str, str]] = []
            if p.consecutive_failures > 0:
                for i, node in members:
                    if node.ejected is None and node.streak >= p.consecutive_failures:
                        reason = f"{node.streak} consecutive failures"
                        candidates.append((i, node, reason, "consecutive"))
            if interval_due and p.failure_percentage is not None:
                busy = [
                    (i, n)
                    for i, n in members
                    if n.ejected is None and n.window_ok + n.window_failed >= p.request_volume
                ]
                if len(busy) >= p.minimum_hosts:
                    for i, node in busy:
                        share = 100 * node.window_failed / (node.window_ok + node.window_failed)
                        if share >= p.failure_percentage and all(c[0] != i for c in candidates):
                            reason = f"{share:.0f}% of calls failed over {p.interval:g} s"
                            candidates.append((i, node, reason, "failure_percentage"))
            if interval_due and p.success_rate_enforcing > 0:
                candidates += self._success_rate(members, {c[0] for c in candidates})
            for i, node, reason, kind in candidates:
                if out >= allowed:
                    break
                node.times += 1
                span = min(
                    p.base_ejection_time * node.times,
                    max(p.base_ejection_time, p.max_ejection_time),
                )
                node.ejected = Ejected(now + span, reason, node.times, kind)
                node.streak = 0
                out += 1
                changed.add(name)
                new.append((name, i, node.ejected))
        if interval_due:
            self._interval_at = now
            for node in nodes.values():
                node.window_ok = node.window_failed = 0
        return changed, new

    def _half_open(
        self,
        name: str,
        i: int,
        node: _Node,
        now: float,
        outcomes: Mapping[int, bool | None] | None,
        choose: Chooser | None,
        changed: set[str],
        new: list[tuple[str, int, Ejected]],
    ) -> None:
        """An ejected node whose time is up, or a half-open one: start, judge or move its
        trial, or return it."""
        p = self.policy
        e = node.ejected
        assert e is not None
        trial = e.half_open
        tried: frozenset[int] = frozenset()
        if trial is not None:
            outcome = outcomes.get(i, ...) if outcomes else ...
            if outcome is True:
                self._return(name, i, node, now, changed, "success")
                return
            if outcome is False:
                node.times += 1
                span = min(
                    p.base_ejection_time * node.times,
                    max(p.base_ejection_time, p.max_ejection_time),
                )
                node.ejected = Ejected(now + span, "trial request failed", node.times, "trial")
                changed.add(name)
                new.append((name, i, node.ejected))
                self.trial_events.append((name, i, "failure"))
                return
            if outcome is not None and now < trial.deadline:
                return  # still waiting for the trial's outcome
            tried = trial.tried
        elif now < e.until:
            return
        found = (
            choose(name, i, tried)
            if choose is not None and len(tried) < p.half_open_tries
            else None
        )
        if found is None:
            self._return(name, i, node, now, changed, "returned" if tried else "")
            return
        row, owner = found
        node.ejected = replace(
            e,
            until=now + p.half_open_timeout + TRIAL_GRACE_S,
            half_open=HalfOpen(row, owner, now + p.half_open_timeout, tried | {row}),
        )
        changed.add(name)
        self.trial_events.append((name, i, "moved" if tried else "started"))

    def _return(
        self, name: str, i: int, node: _Node, now: float, changed: set[str], event: str
    ) -> None:
        node.ejected = None
        node.streak = 0
        node.last_decay = now
        changed.add(name)
        if event:
            self.trial_events.append((name, i, event))

    def _success_rate(
        self, members: list[tuple[int, _Node]], taken: set[int]
    ) -> list[tuple[int, _Node, str, str]]:
        p = self.policy
        live = {i: n for i, n in members if n.ejected is None}
        verdict = success_rate_outliers(
            {i: (n.window_ok, n.window_failed) for i, n in live.items()},
            p.success_rate_stdev_factor,
            p.success_rate_minimum_hosts,
            p.success_rate_request_volume,
        )
        if verdict is None:
            return []
        out = []
        for i in verdict.outliers:
            if i in taken or self.draw() * 100 >= p.success_rate_enforcing:
                continue
            n = live[i]
            rate = 100 * n.window_ok / (n.window_ok + n.window_failed)
            reason = (
                f"success rate {rate:.0f}% below {verdict.threshold:.0f}% "
                f"(mean {verdict.mean:.0f}%) over {p.interval:g} s"
            )
            out.append((i, n, reason, "success_rate"))
        return out
