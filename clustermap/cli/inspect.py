"""Region commands of cmctl: they read the region exactly as a worker does.

``dump`` and ``status`` read a consistent snapshot; ``pick`` goes through the same
:class:`~clustermap.client.ClusterMap` a worker uses, so what it prints is what a worker picks;
``watch`` prints each published change.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from clustermap.balance.picker import live_ejections
from clustermap.balance.routing import OFF, ZoneDecision, routing_options, zone_decision, zone_name
from clustermap.client import ClusterMap
from clustermap.errors import UnknownService
from clustermap.feedback.layout import owner_pid
from clustermap.feedback.status import feedback_status
from clustermap.model import STRATEGIES, Ejection, Node, Service, Trial
from clustermap.region import FORMAT_VERSION, RegionReader, Snapshot
from clustermap.region.election import writer_running
from clustermap.region.layout import Meta
from clustermap.rules import printable

__all__ = ["STALE_AFTER_S", "add_commands", "service_json", "status_json"]

#: A map not synced for this long is reported stale even if the sidecar has not said so (it may
#: be dead). Ten poll intervals at the default 0.5 s.
STALE_AFTER_S = 5.0

#: A last sync further in the future than this is not believed: the map is reported stale.
FUTURE_SLACK_S = 1.0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("dump", help="print the map as workers see it")
    p.add_argument("services", nargs="*", metavar="SERVICE", help="only these services")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(run=dump)

    p = sub.add_parser("status", help="the sidecar's health as published in the region")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument(
        "--stale-after",
        type=float,
        default=STALE_AFTER_S,
        metavar="S",
        help="report stale when the last sync is older than this (default %(default)s)",
    )
    p.set_defaults(run=status)

    p = sub.add_parser("pick", help="what a worker would pick")
    p.add_argument("service")
    p.add_argument("--key", help="consistent-hash key")
    p.add_argument("--strategy", choices=[*STRATEGIES, "weighted_random"])
    p.add_argument("--count", type=int, default=1, metavar="N", help="pick N times")
    p.add_argument(
        "--subset",
        action="append",
        default=[],
        metavar="K=V",
        help="only nodes whose meta has K=V (repeatable; docs/routing.md)",
    )
    p.set_defaults(run=pick)

    p = sub.add_parser("watch", help="print changes as they are published")
    p.add_argument("--interval", type=float, default=0.1, metavar="S", help="check period")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N changes")
    p.set_defaults(run=watch)


# -- JSON shapes (also used by tests and the docs) -----------------------------------------------


def node_json(n: Node, ejected: bool = False, trial: Trial | None = None) -> dict[str, Any]:
    out = {
        "host": n.host,
        "port": n.port,
        "address": n.address,
        "weight": n.weight,
        "status": n.status,
        "meta": dict(n.meta),
        "ejected": ejected,
        "half_open": ejected and trial is not None,
    }
    if ejected and trial is not None:
        out["trial"] = trial_json(trial, time.time_ns())
    return out


def _trials(s: Service, ejected: dict[int, Ejection]) -> dict[int, Trial]:
    """Positions of ``s``'s half-open nodes (ejected, with a trial granted to one row)."""
    if s.overlay is None:
        return {}
    return {t.position: t for t in s.overlay.trials if t.position in ejected}


def trial_json(t: Trial, now_ns: int) -> dict[str, Any]:
    return {
        "pid": owner_pid(t.owner),
        "owner": t.owner,
        "until": round(t.until_ns / 1e9, 3),
        "seconds_left": round((t.until_ns - now_ns) / 1e9, 1),
    }


def _ejections(s: Service, now_ns: int) -> dict[int, Ejection]:
    """Positions of ``s``'s nodes ejected at ``now_ns`` (as a worker would judge them)."""
    if s.overlay is None:
        return {}
    live, _ = live_ejections(s, now_ns)
    return {e.position: e for e in s.overlay.ejected if e.position in live}


def ejected_json(services: dict[str, Service]) -> list[dict[str, Any]]:
    now = time.time_ns()
    out = []
    for name in sorted(services):
        s = services[name]
        ejected = _ejections(s, now)
        trials = _trials(s, ejected)
        for position, e in sorted(ejected.items()):
            entry: dict[str, Any] = {
                "service": name,
                "address": s.nodes[position].address,
                "reason": e.reason,
                "until": round(e.until_ns / 1e9, 3),
                "seconds_left": round((e.until_ns - now) / 1e9, 1),
                "state": "half-open" if position in trials else "ejected",
            }
            if position in trials:
                entry["trial"] = trial_json(trials[position], now)
            out.append(entry)
    return out


def _zone(s: Service, zone: str) -> ZoneDecision:
    """Where a worker's key-less picks of ``s`` go on this machine (docs/routing.md)."""
    return zone_decision(s, zone, routing_options(s.meta), time.time_ns())


def zone_json(d: ZoneDecision) -> dict[str, Any]:
    return {"decision": d.state, "reason": d.reason, "local_nodes": len(d.local)}


def service_json(s: Service, zone: str = "") -> dict[str, Any]:
    ejected = _ejections(s, time.time_ns())
    trials = _trials(s, ejected)
    return {
        "zone": zone_json(_zone(s, zone)),
        "nodes": [node_json(n, k in ejected, trials.get(k)) for k, n in enumerate(s.nodes)],
        "strategy": s.strategy,
        "panic_threshold": s.panic_threshold,
        "revision": s.revision,
        "meta": dict(s.meta),
        "healthy": sum(n.healthy for n in s.nodes),
    }


def status_json(
    reader: RegionReader, snap: Snapshot, stale_after: float = STALE_AFTER_S
) -> dict[str, Any]:
    meta = snap.meta
    age = (time.time_ns() - snap.last_sync_ns) / 1e9 if snap.last_sync_ns else None
    alive = writer_running(reader.path)
    stale = bool(meta.stale or age is None or age > stale_after or alive is False)
    future = age is not None and age < -FUTURE_SLACK_S
    stale = stale or future
    reasons = []
    if meta.reason:
        reasons.append(meta.reason)
    if age is None:
        reasons.append("never synced with a server")
    elif future:
        reasons.append(f"last sync is {-age:.1f} s in the future (clock step, or a forged region)")
    elif age > stale_after and not meta.stale:
        reasons.append(f"no sync for {age:.1f} s")
    if alive is False:
        reasons.append(f"no writer is running (last was pid {snap.writer_pid})")
    return {
        "region": reader.path,
        "format_version": FORMAT_VERSION,
        "region_bytes": reader.file_size,
        "generation": snap.generation,
        "revision": meta.revision,
        "epoch": meta.epoch,
        "source": meta.source,
        "server": meta.server,
        "last_sync_ns": snap.last_sync_ns,
        "age_seconds": None if age is None else round(age, 3),
        "stale": stale,
        "protected": meta.protected,
        "reason": "; ".join(reasons),
        "writer_pid": snap.writer_pid,
        "writer_alive": alive,
        "repair_pending": snap.repair_pending,
        "services": len(snap.services),
        "nodes": sum(len(s.nodes) for s in snap.services.values()),
        "counters": dict(meta.counters),
        "subset_tables_capped": meta.tables_capped,
        **_mode_json(meta),
        "quarantined": [
            {"service": name, "reason": why} for name, why in sorted(meta.quarantined.items())
        ],
        "ejected": ejected_json(snap.services),
        "feedback": feedback_status(reader.path),
        "zone": zone_name(meta.zone) or None,
    }


def _mode_json(meta: Meta) -> dict[str, Any]:
    """How the sidecar follows the server (``cm-sidecar --watch``): poll, or watch with the
    stream's age and how often it was opened again."""
    watch = meta.mode == "watch" and meta.stream_since_ns > 0
    age = (time.time_ns() - meta.stream_since_ns) / 1e9 if watch else None
    return {
        "mode": "watch" if watch else "poll",
        "stream_age_seconds": None if age is None else round(age, 3),
        "stream_reconnects": meta.counters.get("watch_reconnects", 0),
        "stream_fallbacks": meta.counters.get("watch_fallbacks", 0),
    }


# -- commands ------------------------------------------------------------------------------------


def _snapshot(args: argparse.Namespace) -> tuple[RegionReader, Snapshot]:
    reader = RegionReader(args.region)
    return reader, reader.snapshot()


def dump(args: argparse.Namespace) -> int:
    reader, snap = _snapshot(args)
    names = args.services or sorted(snap.services)
    for name in names:
        if name not in snap.services:
            raise UnknownService(f"unknown service {name!r} in {reader.path}")
    if args.json:
        out = status_json(reader, snap)
        zone = out["zone"] or ""
        out["services"] = {n: service_json(snap.services[n], zone) for n in names}
        json.dump(out, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    st = status_json(reader, snap)
    print(_status_line(st))
    for name in names:  # the region is untrusted: nothing reaches the terminal unescaped
        s = snap.services[name]
        healthy = sum(n.healthy for n in s.nodes)
        where = _zone(s, st["zone"] or "")
        print(
            f"\n{printable(name)}  {printable(s.strategy)}, {len(s.nodes)} nodes, "
            f"{healthy} healthy, rev {s.revision}"
            + ("" if where.state == OFF else f", zone {where.state}: {printable(where.reason)}")
        )
        width = max((len(n.address) for n in s.nodes), default=0)
        ejected = _ejections(s, time.time_ns())
        trials = _trials(s, ejected)
        for i, n in enumerate(s.nodes):
            meta = " ".join(f"{printable(k)}={printable(v)}" for k, v in sorted(n.meta.items()))
            flag = "EJECTED " if i in ejected else ""
            if i in trials:
                flag = f"HALF-OPEN (trial: pid {owner_pid(trials[i].owner)}) "
            line = (
                f"  {printable(n.address):<{width}}  weight {n.weight:<4} {printable(n.status):<5}"
            )
            print(f"{line} {flag}{meta}".rstrip())
    return 0


def _status_line(st: dict[str, Any]) -> str:
    age = "never synced" if st["age_seconds"] is None else f"synced {st['age_seconds']:.1f} s ago"
    flags = [f for f in ("stale", "protected") if st[f]]
    line = (
        f"revision {st['revision']}, generation {st['generation']}, {age}, "
        f"{st['services']} services, {st['nodes']} nodes"
    )
    if st["zone"]:
        line += f", zone {st['zone']}"
    if flags:
        line += f"  [{', '.join(flags).upper()}: {st['reason']}]"
    if st["quarantined"]:
        line += f"  [QUARANTINED: {', '.join(q['service'] for q in st['quarantined'])}]"
    return line


def status(args: argparse.Namespace) -> int:
    reader, snap = _snapshot(args)
    st = status_json(reader, snap, args.stale_after)
    if args.json:
        json.dump(st, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    rows = [
        ("region", f"{st['region']} ({st['region_bytes']} bytes, format {st['format_version']})"),
        ("revision", f"{st['revision']} (generation {st['generation']}, epoch {st['epoch']})"),
        ("last sync", "never" if st["age_seconds"] is None else f"{st['age_seconds']:.3f} s ago"),
        ("source", f"{st['source']} {st['server']}".strip()),
        ("mode", _mode_text(st)),
        ("stale", "yes" if st["stale"] else "no"),
        ("protected", "yes" if st["protected"] else "no"),
        ("reason", st["reason"] or "-"),
        ("writer", f"pid {st['writer_pid']} ({_alive_word(st['writer_alive'])})"),
        ("map", f"{st['services']} services, {st['nodes']} nodes"),
        ("capped", _capped_text(st["subset_tables_capped"])),
        ("zone", st["zone"] or "-"),
        ("quarantined", str(len(st["quarantined"])) if st["quarantined"] else "-"),
    ]
    rows += [(f"  {q['service']}", q["reason"]) for q in st["quarantined"]]
    rows += [(f"  {k}", str(v)) for k, v in sorted(st["counters"].items())]
    fb = st["feedback"]
    if fb["state"] == "on":
        rows.append(("feedback", f"on, {fb['rows_in_use']} of {fb['rows']} rows in use"))
    else:
        rows.append(("feedback", f"off: {fb['reason']}"))
    for e in st["ejected"]:
        if "trial" in e:
            rows.append(
                (
                    "half-open",
                    f"{printable(e['service'])} {printable(e['address'])}: trial by pid "
                    f"{e['trial']['pid']}, {e['trial']['seconds_left']} s left "
                    f"(ejected: {printable(e['reason'])})",
                )
            )
            continue
        rows.append(
            (
                "ejected",
                f"{printable(e['service'])} {printable(e['address'])} "
                f"for {e['seconds_left']} s: {printable(e['reason'])}",
            )
        )
    for k, v in rows:
        print(f"{k:<12} {v}")
    return 0


def _mode_text(st: dict[str, Any]) -> str:
    if st["mode"] == "watch":
        text = f"watch, stream up {st['stream_age_seconds']:.1f} s"
    elif st["stream_fallbacks"]:
        text = "poll (stream down; reconnecting)"
    else:
        text = "poll"
    if st["stream_reconnects"] or st["stream_fallbacks"]:
        text += f", {st['stream_reconnects']} reconnects, {st['stream_fallbacks']} fallbacks"
    return text


def _capped_text(capped: int) -> str:
    if not capped:
        return "-"
    return f"{capped} services: some subset tables over a limit, built by workers (see the log)"


def _alive_word(alive: bool | None) -> str:
    return {True: "running", False: "not running", None: "unknown"}[alive]


def pick(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise SystemExit("cmctl: --count must be at least 1")
    subset: dict[str, str] | None = None
    for item in args.subset:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise SystemExit(f"cmctl: --subset {item!r} is not K=V")
        subset = {**(subset or {}), k: v}
    cm = ClusterMap(args.region)
    found = cm.route(args.service, subset)  # what workers do, with the reasons (on stderr)
    if found.fallback:
        print(f"subset fallback: {printable(found.fallback)}", file=sys.stderr)
    if found.zone.state != OFF:
        keyed = args.key is not None and args.strategy in (None, "consistent_hash")
        print(
            f"zone {found.zone.zone}: {found.zone.state} ({printable(found.zone.reason)})"
            + ("; keyed picks ignore zones" if keyed else ""),
            file=sys.stderr,
        )
    for _ in range(args.count):
        print(cm.pick(args.service, args.key, args.strategy, subset).address)
    return 0


def watch(args: argparse.Namespace) -> int:
    reader = RegionReader(args.region)
    prev = reader.snapshot()
    print(_status_line(status_json(reader, prev)), flush=True)
    changes = 0
    while not args.count or changes < args.count:
        time.sleep(args.interval)
        if reader.generation == prev.generation:
            continue
        snap = reader.snapshot()
        for line in _diff(prev, snap):
            print(line, flush=True)
        prev = snap
        changes += 1
    return 0


def _diff(a: Snapshot, b: Snapshot) -> list[str]:
    head = f"generation {b.generation} revision {b.meta.revision}:"
    out = []
    for name in sorted(set(a.services) | set(b.services)):
        old, new = a.services.get(name), b.services.get(name)
        if old == new:
            continue
        if old is None:
            out.append(f"{head} + {name} ({len(new.nodes) if new else 0} nodes)")
        elif new is None:
            out.append(f"{head} - {name}")
        else:
            before = {n.key: n for n in old.nodes}
            after = {n.key: n for n in new.nodes}
            for key in sorted(set(before) | set(after)):
                x, y = before.get(key), after.get(key)
                if y is None:
                    out.append(f"{head} {name} - {before[key].address}")
                elif x != y:
                    sign = "+" if x is None else "~"
                    out.append(f"{head} {name} {sign} {y.address} weight {y.weight} {y.status}")
            if old.strategy != new.strategy or old.meta != new.meta:
                out.append(f"{head} {name} options {new.strategy} {dict(new.meta)}")
    now = time.time_ns()
    for name in sorted(set(a.services) & set(b.services)):
        was = a.services[name]
        old_ej = {was.nodes[p].address for p in _ejections(was, now)}
        new_ej = _ejections(b.services[name], now)
        nodes = b.services[name].nodes
        for p, e in sorted(new_ej.items()):
            if nodes[p].address not in old_ej:
                out.append(f"{head} {name} ejected {nodes[p].address}: {e.reason}")
        for address in sorted(old_ej - {nodes[p].address for p in new_ej}):
            out.append(f"{head} {name} returned {address}")
    for flag in ("stale", "protected"):
        if getattr(a.meta, flag) != getattr(b.meta, flag):
            out.append(f"{head} {flag} = {getattr(b.meta, flag)} {b.meta.reason}".rstrip())
    return out or [f"{head} (no change to services)"]
