"""The sidecar's main loop: poll, merge, protect, publish; signals queued and dispatched here.

Threads: the main thread owns everything (the mirror, the guard, the region writer, the poller);
the metrics thread only reads gauges; with ``--watch`` the stream thread (sidecar/watcher.py) only
queues what it reads and wakes the loop, which applies it like a poll answer. Signal handlers only
queue the signal and wake the loop (gunicorn's arbiter pattern), so no handler ever runs inside a
publish.
"""

from __future__ import annotations

import logging
import queue
import random
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Final

from prometheus_client import Counter

from clustermap import trace
from clustermap.errors import ClusterMapError
from clustermap.feedback.layout import owner_pid
from clustermap.model import Service, parse_address
from clustermap.region.layout import Meta
from clustermap.region.reader import RegionReader
from clustermap.region.writer import RegionWriter
from clustermap.sidecar import snapshot
from clustermap.sidecar.config import SidecarSettings
from clustermap.sidecar.feedback import FeedbackHub
from clustermap.sidecar.guard import Decision, Guard, GuardPolicy
from clustermap.sidecar.metrics import Metrics, serve
from clustermap.sidecar.mirror import ChecksumMismatch, Mirror
from clustermap.sidecar.outlier import OutlierPolicy
from clustermap.sidecar.poller import Poller, PollFailed
from clustermap.sidecar.slowstart import RampClock
from clustermap.sidecar.validate import shown_name
from clustermap.sidecar.watcher import Watcher
from clustermap.signals import SignalQueue
from clustermap.wire import FULL, NOT_READY, PollAnswer

__all__ = ["Sidecar"]

log = logging.getLogger("clustermap.sidecar")

_COUNTERS_EVERY: Final = 10.0  # republish counters alone at most this often (seconds)


class Sidecar:
    """One sidecar process: the region's only writer."""

    def __init__(
        self, settings: SidecarSettings, reload: Callable[[], SidecarSettings] | None = None
    ) -> None:
        self.settings = settings
        self._reload = reload
        self.metrics = Metrics()
        self.mirror = Mirror()
        self.guard = Guard(_policy(settings))
        self.published: dict[str, Service] = {}
        self._nodes = 0  # nodes in published
        self.meta = Meta()
        self.counters: dict[str, int] = {}
        self._signals = SignalQueue((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        self._running = True
        self._last_ok = 0.0  # monotonic time of the last successful sync
        self._meta_at = 0.0
        self._snapshot_at = 0.0
        self._snapshot_dirty = False
        self._quarantine_shown: dict[str, str] | None = None  # as last set in the metrics
        self.feedback: FeedbackHub | None = None
        self.ramps = RampClock(settings.slow_start)  # slow start (docs/slow-start.md)
        self.watcher: Watcher | None = None
        self._stream_since = 0.0  # monotonic time the live stream opened; 0: no live stream
        self._stream_since_ns = 0
        self._stream_server = ""
        self._stream_ready = False  # the live stream's last answer was not NOT_READY
        self._heard = 0.0  # monotonic time of the live stream's last answer
        self._streams = 0  # streams that came up

    # -- lifecycle --------------------------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        wait = float("inf") if s.standby else 0.0
        if s.standby:
            log.info("standby: waiting to become the writer of %s", s.region)
        self.writer = RegionWriter(s.region, wait=wait)
        self.poller = Poller(s)
        http = None
        try:
            self._install_signals()
            self._warm_start()
            self._start_feedback()
            self._publish_zone()
            if s.watch:
                self._start_watch()
            if s.metrics:
                host, port = parse_address(s.metrics)
                try:
                    http = serve(self.metrics, host, port, self.healthy)
                except OSError as exc:
                    raise ClusterMapError(
                        f"metrics on {s.metrics}: {exc.strerror or exc} "
                        "(give each sidecar on a machine its own metrics port)"
                    ) from None
            log.info(
                "publishing %s from %s every %.2f s", s.region, ", ".join(s.server), s.interval
            )
            while self._running:
                self._dispatch_signals()
                if not self._running:
                    break
                if self._watching():
                    self._touch()
                else:
                    self.poll_once()
                self._idle(s.interval * (1 + s.jitter * (2 * random.random() - 1)))
        finally:
            self._stop_watch()
            if self.feedback is not None:
                self.feedback.close()
            if http is not None:
                http.shutdown()
            self._save_snapshot(force=True)
            self.poller.close()
            self.writer.close()
            log.info("stopped; %s stays readable with revision %d", s.region, self.meta.revision)
        return 0

    def _install_signals(self) -> None:
        self._signals.install()

    def _wake(self) -> None:
        self._signals.wake()

    def _sleep(self, seconds: float) -> None:
        self._signals.wait(seconds)

    def _dispatch_signals(self) -> None:
        while (sig := self._signals.pop()) is not None:
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.handle_term(sig)
            elif sig == signal.SIGHUP:
                self.handle_hup()

    def handle_term(self, sig: int) -> None:
        log.info("%s: stopping", signal.Signals(sig).name)
        self._running = False

    def handle_hup(self) -> None:
        if self._reload is None:
            return
        try:
            new = self._reload()
        except Exception as exc:  # a bad config file must not stop a running sidecar
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        if new.region != self.settings.region:
            log.warning(
                "SIGHUP: the region path cannot change while running; keeping %s",
                self.settings.region,
            )
            new = new.model_copy(update={"region": self.settings.region})
        self.poller.close()
        self._stop_watch()
        self.settings = new
        self.poller = Poller(new)
        if new.watch:
            self._start_watch()
        self.guard.policy = _policy(new)
        self.ramps.default_window_s = new.slow_start
        if self.feedback is not None:
            self.feedback.outliers.policy = _outlier_policy(new)
        self._publish_zone()
        log.info("SIGHUP: configuration reloaded (servers %s)", ", ".join(new.server))

    def _publish_zone(self) -> None:
        """Record the machine's zone in the region. When it differs from the zone recorded
        there, every service is republished with a new version: workers' cached pickers were
        routed for the old zone (docs/routing.md)."""
        zone = self.settings.zone or ""
        if self.meta.zone == zone and self.writer.meta.zone == zone:
            return
        meta = replace(self.meta, zone=zone)
        hub = self.feedback
        services = [hub.decorate(s) if hub is not None else s for s in self.published.values()]
        self.writer.publish(services, meta=meta, force=True)
        self.meta = meta
        log.info("zone %s: %d services republished", zone or "(none)", len(services))

    # -- feedback (docs/feedback.md) --------------------------------------------------------------

    def _start_feedback(self) -> None:
        """Open the feedback files and republish every service with its node ids. Without them
        the sidecar still publishes the map; workers then run without feedback."""
        s = self.settings
        seeds = list(self.published.values())
        self.published = {n: replace(v, overlay=None) for n, v in self.published.items()}
        if not s.feedback:
            return
        try:
            hub = FeedbackHub(
                str(s.region),
                rows=s.feedback_rows,
                entries=s.feedback_entries,
                capacity=s.feedback_nodes,
                mode=int(s.feedback_mode, 8),
                group=s.feedback_group,
                policy=_outlier_policy(s),
            )
        except (OSError, KeyError, ValueError) as exc:
            log.error("feedback off: cannot set up %s.feedback: %s", s.region, exc)
            return
        hub.seed(seeds)
        self.feedback = hub
        if self.published:
            now_ns = time.time_ns()
            self.writer.publish(
                [self.ramps.decorate(hub.decorate(v), now_ns) for v in self.published.values()]
            )
        log.info(
            "feedback on: %d rows of %d nodes in %s, swept every %.3f s",
            s.feedback_rows,
            s.feedback_entries,
            hub.rows_path,
            s.feedback_interval,
        )

    def _idle(self, seconds: float) -> None:
        """Wait ``seconds`` (a signal cuts it short), applying what the stream brings and
        sweeping the feedback rows meanwhile."""
        hub = self.feedback
        deadline = time.monotonic() + seconds
        period = self.settings.feedback_interval
        next_sweep = time.monotonic()
        while not self._signals:
            self._drain_stream()
            now = time.monotonic()
            if hub is not None and now >= next_sweep:
                self.sweep_feedback()
                t1 = time.monotonic()
                # Sweeping takes at most a quarter of a core: a slow sweep (many busy workers on
                # a loaded machine) stretches the period instead of eating the machine.
                next_sweep = t1 + max(period, 3 * (t1 - now))
                now = t1
            left = deadline - now
            if left <= 0:
                return
            self._sleep(min(left, next_sweep - now) if hub is not None else left)

    def sweep_feedback(self) -> None:
        hub = self.feedback
        if hub is None:
            return
        try:
            changed, new = hub.sweep()
        except Exception:  # feedback must never stop the map from flowing
            log.exception("feedback sweep failed")
            return
        for service, address, verdict in new:
            self.metrics.ejections.labels(verdict.kind).inc()
            self._count("ejections")
            log.warning(
                "ejected %s %s for %.0f s: %s",
                service,
                address,
                verdict.until - time.monotonic(),
                verdict.reason,
            )
        for service, node_id, event in hub.outliers.trial_events:
            self.metrics.trials.labels(event).inc()
            address = hub.address(service, node_id)
            e = hub.outliers.ejected(node_id)
            if e is not None and e.half_open is not None:
                log.info(
                    "half-open %s %s: trial %s, granted to row %d (pid %d)",
                    service,
                    address,
                    event,
                    e.half_open.row,
                    owner_pid(e.half_open.owner),
                )
            else:
                log.info("half-open %s %s: trial %s", service, address, event)
        now_ns = time.time_ns()
        upserts = [
            self.ramps.decorate(hub.decorate(self.published[n]), now_ns)
            for n in sorted(changed)
            if n in self.published
        ]
        if upserts:
            self.writer.publish(upserts)
        self.metrics.ejected.set(len(hub.outliers.ejected_ids()))
        self.metrics.feedback_rows.set(hub.rows_in_use)

    # -- the Watch stream (--watch; sidecar/watcher.py) ------------------------------------------

    def _start_watch(self) -> None:
        self.watcher = Watcher(self.settings, self._wake)
        self.watcher.resume_from(self.mirror.epoch, self.mirror.revision)
        self.watcher.start()
        log.info("watch: holding a stream from %s; polling until it is up", self.settings.server[0])

    def _stop_watch(self) -> None:
        if self.watcher is None:
            return
        self.watcher.close()
        self.watcher = None
        self._stream_since = 0.0
        self.metrics.watching.set(0)

    def _watching(self) -> bool:
        """Whether the stream is up (then the loop does not poll); ends a silent one."""
        if self.watcher is None or not self._stream_since:
            return False
        silent = time.monotonic() - self._heard
        if silent > self.settings.watch_silence:
            self._stream_lost(self._stream_server, f"no answer for {silent:.1f} s")
            self.watcher.restart()
            return False
        return True

    def _drain_stream(self) -> None:
        w = self.watcher
        while w is not None:
            try:
                event = w.events.get_nowait()
            except queue.Empty:
                return
            if event.stream != w.stream:
                continue  # from a stream already ended here
            if event.answer is None:
                self._stream_lost(event.server, event.error)
            else:
                self._stream_answer(event.server, event.answer)

    def _stream_answer(self, server: str, answer: PollAnswer) -> None:
        assert self.watcher is not None
        trace.mark("sidecar.dequeued", answer.revision)
        self._heard = time.monotonic()
        if not self._stream_since:
            self._stream_since = self._heard
            self._stream_since_ns = time.time_ns()
            self._stream_server = server
            self._streams += 1
            if self._streams > 1:
                self._count("watch_reconnects")
                self.metrics.watch_reconnects.inc()
            self.metrics.watching.set(1)
            log.info("watch: stream from %s is up; not polling", server)
        self._count("watch")
        self._stream_ready = answer.kind != NOT_READY
        if not self._apply(server, answer, by_stream=True):
            # rejected: resync as after a bad poll answer, from nothing, on a new stream
            self._stream_lost(server, "an answer was rejected; resyncing")
            self.watcher.restart()

    def _stream_lost(self, server: str, why: str) -> None:
        if not self._stream_since:
            log.debug("watch: no stream from %s: %s", server, why)
            return
        self._stream_since = 0.0
        self._count("watch_fallbacks")
        self.metrics.watch_fallbacks.inc()
        self.metrics.watching.set(0)
        log.warning(
            "watch: stream from %s lost (%s); polling every %.2f s while reconnecting",
            server,
            why,
            self.settings.interval,
        )
        meta = replace(self.meta, mode="poll", stream_since_ns=0, counters=dict(self.counters))
        self.writer.publish(meta=meta)
        self.meta = meta
        self._meta_at = time.monotonic()

    def _touch(self) -> None:
        """The stream is up and has nothing new: the map is as fresh as the server's."""
        if not self._stream_ready:
            return
        now_ns = time.time_ns()
        self.writer.touch(now_ns)
        self._last_ok = time.monotonic()
        self.metrics.synced(now_ns / 1e9)

    # -- warm start -------------------------------------------------------------------------------

    def _warm_start(self) -> None:
        """Start from the map already in the region (a restarted sidecar), else the snapshot."""
        try:
            snap = RegionReader(self.settings.region).snapshot()
        except ClusterMapError as exc:
            log.warning("region unreadable at start (%s); starting empty", exc)
            snap = None
        if snap is not None and snap.services:
            self.published = dict(snap.services)
            self.ramps.seed(self.published.values())  # ramps in progress go on
            self.meta = snap.meta
            log.info(
                "continuing from the region: %d services at revision %d",
                len(self.published),
                snap.meta.revision,
            )
            self._refresh_gauges()
            return
        path = self.settings.snapshot
        if path is None or not path.exists():
            return
        try:
            disk = snapshot.load(path)
        except snapshot.SnapshotError as exc:
            log.error("snapshot not loaded: %s", exc)
            return
        age = (time.time_ns() - disk.written_ns) / 1e9
        meta = Meta(
            revision=disk.revision,
            epoch=disk.epoch,
            source="snapshot",
            stale=True,
            reason=f"warm start from {path} written {age:.0f} s ago; not yet synced",
            zone=self.settings.zone or "",
        )
        self.writer.replace_all(disk.services, meta=meta)
        self.published = {s.name: s for s in disk.services}
        self.meta = meta
        self._refresh_gauges()
        log.info(
            "warm start: %d services from %s (revision %d, %.0f s old)",
            len(disk.services),
            path,
            disk.revision,
            age,
        )

    # -- one poll ---------------------------------------------------------------------------------

    def poll_once(self) -> None:
        try:
            polled = self.poller.poll(self.mirror.epoch, self.mirror.revision)
        except PollFailed as exc:
            self._count("poll_errors", "error")
            self._mark_stale(f"no server answered: {exc}")
            return
        if polled.failovers:
            self._count("failovers")
            self.metrics.failovers.inc()
        self._count("polls")
        self._apply(polled.server, polled.answer)

    def _apply(self, server: str, answer: PollAnswer, by_stream: bool = False) -> bool:
        """The one merge path of poll and stream answers: mirror and checksum, protection,
        publish. False when the answer was rejected (the mirror is reset for a resync)."""
        outcomes = self.metrics.watch_answers if by_stream else self.metrics.polls
        if answer.kind == NOT_READY:
            self._count(NOT_READY, NOT_READY, outcomes)
            log.info(
                "%s is warming up (ready in %.1f s); keeping the map", server, answer.retry_after
            )
            if not self._last_ok and not self.published:  # no map yet: say why in the region
                self._mark_stale(f"{server} is warming up; no map from it yet")
            return True
        try:
            change = self.mirror.apply(answer, self.published)
        except ChecksumMismatch as exc:
            self._count("checksum_mismatches", "checksum_mismatch", outcomes)
            log.warning("%s; resyncing with a full map", exc)
            self.mirror.reset()
            if self.watcher is not None:
                self.watcher.resume_from("", 0)
            return False
        trace.mark("sidecar.merged", answer.revision)
        if self.watcher is not None:
            self.watcher.resume_from(self.mirror.epoch, self.mirror.revision)
        self._count(answer.kind, answer.kind, outcomes)
        if not change and not self.guard.holding:
            decision = Decision()  # nothing changed and nothing is held: nothing to decide
        else:
            decision = self.guard.decide(
                self.mirror.services,
                self.published,
                full=answer.kind == FULL,
                changed=(*change.upserted, *change.removed),
            )
        if decision.protected and (decision.upserts or decision.removals or change):
            self._count("protections")
            self.metrics.protections.inc()
            log.warning("protection: %s", decision.reason)
        for name in decision.released:
            log.error(
                "protection released after %.0f s: %s",
                self.guard.policy.max_hold,
                "the whole update" if name == "*" else name,
            )
        quarantined = self._quarantined()
        meta = Meta(
            revision=self.mirror.revision,
            epoch=self.mirror.epoch,
            source="server",
            stale=False,
            protected=decision.protected,
            reason=decision.reason,
            server=server,
            counters=dict(self.counters),
            quarantined=quarantined,
            mode="watch" if self._stream_since else "poll",
            stream_since_ns=self._stream_since_ns if self._stream_since else 0,
            zone=self.settings.zone or "",
            tables_capped=self.meta.tables_capped,
        )
        trace.mark("sidecar.decided", answer.revision)
        self._publish(decision.upserts, decision.removals, meta)
        trace.mark("sidecar.published", answer.revision)
        return True

    def _quarantined(self) -> dict[str, str]:
        """The mirror's quarantined services, named safely for operators' terminals; logged
        when they change."""
        shown = {shown_name(n): why for n, why in sorted(self.mirror.quarantined.items())}
        if shown != self._quarantine_shown:
            self._quarantine_shown = shown
            self.metrics.set_quarantined(shown)
        if shown != self.meta.quarantined:
            for name, why in shown.items():
                if self.meta.quarantined.get(name) != why:
                    self._count("quarantines")
                    log.error("quarantined %s, keeping its last good nodes: %s", name, why)
            for name in self.meta.quarantined:
                if name not in shown:
                    log.warning("%s: the server's version is valid again; quarantine lifted", name)
        return shown

    def _publish(self, upserts: tuple[Service, ...], removals: tuple[str, ...], meta: Meta) -> None:
        now_ns = time.time_ns()
        meta_due = _without_counters(meta) != _without_counters(self.meta) or (
            time.monotonic() - self._meta_at > _COUNTERS_EVERY
        )
        t0 = time.perf_counter()
        if upserts or removals or meta_due:
            hub = self.feedback
            for s in upserts:
                self.ramps.observe(self.published.get(s.name), s, now_ns)
            for name in removals:
                self.ramps.forget(name)
            written = tuple(hub.decorate(s) for s in upserts) if hub is not None else upserts
            written = tuple(self.ramps.decorate(s, now_ns) for s in written)
            self.writer.publish(written, removals, meta=meta, sync_ns=now_ns)
            meta = self._show_capped(meta)
            self.meta = meta
            self._meta_at = time.monotonic()
            before = [
                old
                for name in (*(s.name for s in upserts), *removals)
                if (old := self.published.get(name)) is not None
            ]
            self._nodes += sum(len(s.nodes) for s in upserts) - sum(len(s.nodes) for s in before)
            for s in upserts:
                self.published[s.name] = s
            for name in removals:
                self.published.pop(name, None)
            if upserts or removals:
                self._snapshot_dirty = True
                if hub is not None:
                    hub.retain(before, self.published)
            self.metrics.publish_seconds.observe(time.perf_counter() - t0)
        else:
            self.writer.touch(now_ns)
        self._last_ok = time.monotonic()
        self.metrics.synced(now_ns / 1e9)
        self._refresh_gauges(recount=False)  # the whole map only at start: this runs per change
        self._save_snapshot()

    def _show_capped(self, meta: Meta) -> Meta:
        """Put the writer's count of services with subset tables over a limit (known only once
        it planned their tables) into the region's meta, republishing the meta when the count
        changed, so that ``cmctl status`` shows it after the log line has scrolled away."""
        capped = self.writer.tables_capped
        self.metrics.subset_tables_capped.set(capped)
        if capped == meta.tables_capped:
            return meta
        meta = replace(meta, tables_capped=capped)
        self.writer.publish(meta=meta)
        return meta

    def _mark_stale(self, reason: str) -> None:
        self.metrics.stale.set(1)
        if self.meta.stale and self.meta.reason == reason:
            return
        log.warning("map is stale: %s", reason)
        meta = replace(self.meta, stale=True, reason=reason, counters=dict(self.counters))
        self.writer.publish(meta=meta)
        self.meta = meta
        self._meta_at = time.monotonic()

    # -- bookkeeping ------------------------------------------------------------------------------

    def _count(self, counter: str, outcome: str | None = None, by: Counter | None = None) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + 1
        if outcome is not None:
            (by or self.metrics.polls).labels(outcome).inc()

    def _refresh_gauges(self, recount: bool = True) -> None:
        """``recount``: count the published nodes anew (else :meth:`_publish` kept the count)."""
        m = self.metrics
        if recount:
            self._nodes = sum(len(s.nodes) for s in self.published.values())
        m.revision.set(self.meta.revision)
        m.services.set(len(self.published))
        m.nodes.set(self._nodes)
        m.protected.set(1 if self.meta.protected else 0)
        m.stale.set(1 if self.meta.stale else 0)

    def _save_snapshot(self, force: bool = False) -> None:
        path = self.settings.snapshot
        if path is None or not self._snapshot_dirty:
            return
        if not force and time.monotonic() - self._snapshot_at < self.settings.snapshot_every:
            return
        try:
            snapshot.save(path, self.published.values(), self.meta.epoch, self.meta.revision)
        except OSError as exc:
            log.error("snapshot not written to %s: %s", path, exc)
            return
        self._snapshot_at = time.monotonic()
        self._snapshot_dirty = False

    def healthy(self) -> tuple[bool, str]:
        """For /healthz: fresh enough, and why not."""
        if not self._last_ok:
            return False, "not synced yet"
        age = time.monotonic() - self._last_ok
        if age > self.settings.stale_after:
            return False, f"last sync {age:.1f} s ago: {self.meta.reason}"
        return True, f"ok: revision {self.meta.revision}, synced {age:.1f} s ago"


def _policy(s: SidecarSettings) -> GuardPolicy:
    return GuardPolicy(max_drop=s.protect_max_drop, max_hold=s.protect_max_hold, enabled=s.protect)


def _outlier_policy(s: SidecarSettings) -> OutlierPolicy:
    return OutlierPolicy(
        consecutive_failures=s.outlier_consecutive_failures,
        base_ejection_time=s.outlier_base_ejection_time,
        max_ejection_time=s.outlier_max_ejection_time,
        max_ejection_percent=s.outlier_max_ejection_percent,
        interval=s.outlier_interval,
        failure_percentage=s.outlier_failure_percentage,
        minimum_hosts=s.outlier_failure_percentage_minimum_hosts,
        request_volume=s.outlier_failure_percentage_request_volume,
        success_rate_stdev_factor=s.outlier_success_rate_stdev_factor,
        success_rate_minimum_hosts=s.outlier_success_rate_minimum_hosts,
        success_rate_request_volume=s.outlier_success_rate_request_volume,
        success_rate_enforcing=s.outlier_success_rate_enforcing,
        half_open_tries=s.outlier_half_open_tries,
        half_open_timeout=s.outlier_half_open_timeout,
    )


def _without_counters(meta: Meta) -> Meta:
    return replace(meta, counters={})
