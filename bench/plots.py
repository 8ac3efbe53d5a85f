"""Draw docs/img/*.png from bench/results/*.json (what bench/run.py saved).

    uv run --group bench python bench/plots.py [--results bench/results] [--out docs/img]

Every figure carries, at its foot, the machine, the Python version and the command(s) that
produced its data. A figure whose results file is missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
BAR = {"color": "crimson", "linestyle": "--", "linewidth": 1.2}
COLORS = {"clustermap": "tab:blue", "alternative": "tab:gray", "baseline": "black"}

Data = dict[str, Any]


def load(results: Path, name: str) -> Data | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def footer(fig: Figure, *runs: Data) -> int:
    """The machine, the Python and each command, at the foot of the figure."""
    info = runs[0]["info"]
    lines = [f"{info['machine']} ({info['date']})"]
    suites = set()
    for run in runs:
        command, _, suite = run["info"]["command"].partition("  (in: ")
        lines.append(f"$ {command}")
        if suite:
            suites.add(suite.rstrip(")"))
    lines += [f"  (steps of: {s})" for s in sorted(suites)]
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=7, family="monospace", va="bottom")
    return len(lines)


def save(fig: Figure, out: Path, name: str, footer_lines: int) -> None:
    fig.tight_layout(rect=(0, 0.025 + 0.022 * footer_lines, 1, 1))
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    print(f"wrote {out / name}")


def pick_figure(results: Path, out: Path) -> None:
    data = load(results, "pick")
    if data is None:
        print("no pick.json: skipped pick.png")
        return
    rows = [r for r in data["results"]["rows"] if r["group"] != "baseline"][::-1]
    fig, ax = plt.subplots(figsize=(9, 5.2))
    y = range(len(rows))
    ax.barh(
        list(y),
        [r["x_bare"] for r in rows],
        color=[COLORS[r["group"]] for r in rows],
    )
    for i, r in enumerate(rows):
        ns = r["ns"]
        shown = f"{ns / 1e3:,.1f} µs" if ns >= 1000 else f"{ns:.0f} ns"
        ax.text(r["x_bare"] * 1.08, i, f"{r['x_bare']:,.1f}x  ({shown})", va="center", fontsize=8)
    ax.set_yticks(list(y), [r["label"] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(1, max(r["x_bare"] for r in rows) * 30)
    ax.axvline(5, **BAR, label="bar: pick() ≤ 5x")
    ax.axvline(8, **{**BAR, "linestyle": ":"}, label="bar: pick(key=...) ≤ 8x")
    ax.legend(fontsize=8, loc="upper right")
    base = next(r for r in data["results"]["rows"] if r["group"] == "baseline")
    ax.set_xlabel(f"cost per call as a multiple of a bare Python call ({base['ns']:.0f} ns), log")
    ax.set_title(
        f"pick() per strategy vs what users do instead ({data['results']['nodes']} nodes; "
        "blue: clustermap, grey: alternatives)",
        fontsize=10,
    )
    save(fig, out, "pick.png", footer(fig, data))


def propagation_figure(results: Path, out: Path) -> None:
    runs = [d for d in (load(results, "propagation_gunicorn"), load(results, "propagation")) if d]
    if not runs:
        print("no propagation*.json: skipped propagation.png")
        return
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for run in runs:
        r = run["results"]
        lat = sorted(r["latencies_ms"])
        frac = [(i + 1) / len(lat) for i in range(len(lat))]
        label = (
            f"{r['workers']} gunicorn sync workers"
            if r["mode"] == "gunicorn"
            else f"{r['workers']} plain worker processes"
        )
        ax.step(
            lat,
            frac,
            where="post",
            label=f"{label}: p50 {r['p50_ms']:.0f}, "
            f"p99 {r['p99_ms']:.0f} ms ({r['changes']} changes)",
        )
    bar = runs[0]["results"]["bar_ms"]
    interval = runs[0]["results"]["interval_ms"]
    ax.axvline(bar, **BAR, label=f"bar: p99 ≤ poll interval + 100 ms = {bar:.0f} ms")
    ax.axvline(interval, color="gray", linestyle=":", label=f"poll interval {interval:.0f} ms")
    ax.axhline(0.99, color="gray", linewidth=0.5)
    ax.set_xlabel("ms from the change on cm-server until a worker's pick() sees it")
    ax.set_ylabel("fraction of (change, worker) pairs")
    ax.set_ylim(0, 1.01)
    ax.set_xlim(0, max(bar, max(max(d["results"]["latencies_ms"]) for d in runs)) * 1.05)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Propagation latency CDF (sidecar in poll mode)", fontsize=10)
    save(fig, out, "propagation.png", footer(fig, *runs))


def propagation_watch_figure(results: Path, out: Path) -> None:
    """Poll and watch side by side (bench_propagation.py --subscribe both): the CDFs, and where
    the watch's milliseconds go, stage by stage."""
    data = load(results, "propagation_watch")
    if data is None:
        print("no propagation_watch.json: skipped propagation_watch.png")
        return
    runs = data["results"]
    fig, (cdf, stages) = plt.subplots(1, 2, figsize=(12, 4.8), width_ratios=(3, 2))
    for how, color in (("poll", "tab:gray"), ("watch", "tab:blue")):
        r = runs.get(how)
        if r is None:
            continue
        lat = sorted(r["latencies_ms"])
        frac = [(i + 1) / len(lat) for i in range(len(lat))]
        cdf.step(
            lat,
            frac,
            where="post",
            color=color,
            label=f"{how}: p50 {r['p50_ms']:.1f}, p90 {r['p90_ms']:.1f}, p99 {r['p99_ms']:.1f} ms",
        )
        cdf.axvline(
            r["bar_ms"], **{**BAR, "color": color}, label=f"{how} bar: p99 ≤ {r['bar_ms']:.0f} ms"
        )
    cdf.axhline(0.99, color="gray", linewidth=0.5)
    cdf.set_xscale("log")
    cdf.set_xlabel(f"ms from {runs['watch']['origin']} to the first pick() that sees it (log)")
    cdf.set_ylabel("fraction of (change, worker) pairs")
    cdf.set_ylim(0, 1.01)
    cdf.legend(fontsize=7, loc="upper left")
    w = runs["watch"]
    cdf.set_title(
        f"{w['workers']} {w['mode']} workers per sidecar, {w['changes']} changes", fontsize=10
    )
    names = [*w.get("stages_ms", {}), "publish_to_pick"]
    if w.get("stages_ms"):
        q = {**w["stages_ms"], "publish_to_pick": w["publish_to_pick_ms"]}
        y = list(range(len(names)))[::-1]
        stages.barh(y, [q[n]["p99"] for n in names], color="lightsteelblue", label="p99")
        stages.barh(y, [q[n]["p50"] for n in names], color="tab:blue", label="p50")
        labels = [n if n != "publish_to_pick" else "until each worker's next pick" for n in names]
        stages.set_yticks(y, labels, fontsize=8)
        stages.set_xscale("log")
        stages.set_xlabel("ms spent in each stage (since the previous one), log")
        stages.legend(fontsize=8, loc="lower right")
        stages.set_title("watch: where the milliseconds go", fontsize=10)
    save(fig, out, "propagation_watch.png", footer(fig, data))


def scale_figure(results: Path, out: Path) -> None:
    data = load(results, "scale")
    if data is None:
        print("no scale.json: skipped scale.png")
        return
    rows = data["results"]["rows"]
    bars = data["results"]["bars"]
    x = [r["services"] for r in rows]
    nodes = rows[0]["nodes"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2))
    (a, b), (c, d) = axes
    a.plot(x, [r["region_bytes"] / 2**20 for r in rows], "o-", label="region file")
    a.plot(x, [r["payload_bytes"] / 2**20 for r in rows], "s--", label="payload (encoded)")
    a.plot(
        x,
        [bars["region_over_payload"] * r["payload_bytes"] / 2**20 for r in rows],
        **BAR,
        label=f"bar {bars['region_over_payload']} x payload",
    )
    a.set_ylabel("MiB")
    a.set_title("region size", fontsize=10)
    b.plot(x, [r["full_publish_s"] for r in rows], "o-", label="full publish")
    b.axhline(bars["full_publish_s"], **BAR, label="bar 1 s (at 10 000)")
    b.set_ylabel("s")
    b.set_title("full publish (replace_all)", fontsize=10)
    c.plot(x, [r["delta_publish_ms"] for r in rows], "o-", label="1-node delta publish")
    c.axhline(bars["delta_publish_ms"], **BAR, label="bar 5 ms")
    c.set_ylabel("ms")
    c.set_title("1-node delta publish (median)", fontsize=10)
    d.plot(x, [r["reread_us"] for r in rows], "o-", label="validated re-read + decode")
    d.plot(
        x,
        [r["first_pick_after_change_us"] for r in rows],
        "s--",
        label="first pick() after the change (re-read + picker)",
    )
    d.axhline(bars["reread_us"], **BAR, label="bar 150 µs (re-read)")
    d.set_ylabel("µs")
    d.set_ylim(0, max(bars["reread_us"], *(r["first_pick_after_change_us"] for r in rows)) * 1.2)
    d.set_title(f"worker re-reading one changed {nodes}-node service", fontsize=10)
    for ax in (a, b, c, d):
        ax.set_xscale("log")
        ax.set_xlabel(f"services ({nodes} nodes each)")
        ax.legend(fontsize=8)
    for ax in (a, b, c):
        ax.set_yscale("log")
    save(fig, out, "scale.png", footer(fig, data))


def memory_figure(results: Path, out: Path) -> None:
    data = load(results, "scale")
    if data is None:
        return
    mem = data["results"]["memory_kib"]
    stages = list(mem)
    fig, ax = plt.subplots(figsize=(8, 4))
    left = [0.0] * len(stages)
    for part, color in (
        ("RssAnon", "tab:blue"),
        ("RssFile", "tab:gray"),
        ("RssShmem", "tab:green"),
    ):
        vals = [mem[s][part] / 1024 for s in stages]
        ax.barh(stages[::-1], vals[::-1], left=left[::-1], color=color, label=part)
        left = [lft + v for lft, v in zip(left, vals, strict=True)]
    for i, s in enumerate(stages[::-1]):
        ax.text(
            mem[s]["VmRSS"] / 1024 + 0.3,
            i,
            f"{mem[s]['VmRSS'] / 1024:.1f} MiB",
            va="center",
            fontsize=8,
        )
    ax.set_xlabel("resident memory of one worker process, MiB")
    ax.set_xlim(0, max(m["VmRSS"] for m in mem.values()) / 1024 * 1.2)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(
        f"Worker memory, {data['results']['memory_map']} map: anonymous / file-backed / region "
        "(shmem) pages",
        fontsize=10,
    )
    save(fig, out, "memory.png", footer(fig, data))


def fleet_figure(results: Path, out: Path) -> None:
    data = load(results, "fleet")
    if data is None:
        print("no fleet.json: skipped fleet.png")
        return
    rows = data["results"]["rows"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4.4))
    subs = sorted({r["subscribers"] for r in rows})
    a.plot(
        subs, [s / data["results"]["interval_s"] for s in subs], "k:", label="demand (N / 0.5 s)"
    )
    for phase, style in (("steady", "o-"), ("churn", "s--")):
        pr = sorted((r for r in rows if r["phase"] == phase), key=lambda r: r["subscribers"])
        if not pr:
            continue
        xs = [r["subscribers"] for r in pr]
        a.plot(xs, [r["answered_polls_per_s"] for r in pr], style, label=f"answered, {phase}")
        b.plot(xs, [r["p99_ms"] for r in pr], style, label=f"p99, {phase}")
        b.plot(xs, [r["p50_ms"] for r in pr], style, alpha=0.4, label=f"p50, {phase}")
        c.plot(xs, [r["server_cpu_cores"] for r in pr], style, label=f"cm-server CPU, {phase}")
        c.plot(
            xs,
            [2 * r["machine_busy"] for r in pr],
            style,
            alpha=0.4,
            label=f"whole machine, {phase}",
        )
    a.set_ylabel("polls/s")
    a.set_title("polls/s answered vs asked", fontsize=10)
    b.set_ylabel("ms (log)")
    b.set_yscale("log")
    b.set_title("poll latency seen by subscribers", fontsize=10)
    c.set_ylabel("cores (of 2)")
    c.set_ylim(0, 2.1)
    c.set_title("CPU: server vs machine (clients share it)", fontsize=10)
    for ax in (a, b, c):
        ax.set_xscale("log")
        ax.set_xlabel("subscribers (real gRPC channels)")
        ax.legend(fontsize=7)
    save(fig, out, "fleet.png", footer(fig, data))


def hash_figure(results: Path, out: Path) -> None:
    data = load(results, "hash")
    if data is None:
        print("no hash.json: skipped hash.png")
        return
    bal, moved = data["results"]["balance"], data["results"]["moved"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4))
    a.plot([r["nodes"] for r in bal], [r["maglev"] for r in bal], "o-", label="Maglev (default)")
    a.plot(
        [r["nodes"] for r in bal],
        [r["ketama"] for r in bal],
        "s--",
        label="ketama 160 points/node (= uhashring)",
    )
    a.axhline(1.0, color="gray", linewidth=0.5)
    a.set_xscale("log")
    a.set_xlabel("equal nodes")
    a.set_ylabel("largest share / mean share")
    a.set_title("balance (1.0 is perfect)", fontsize=10)
    n = [r["nodes"] for r in moved]
    b.axhline(1.0, color="black", linestyle=":", label="ideal: 1/(N+1) of the keys")
    b.plot(n, [r["maglev"] / r["ideal"] for r in moved], "o-", label="Maglev")
    b.plot(n, [r["ketama"] / r["ideal"] for r in moved], "s--", label="ketama")
    b.set_xscale("log")
    b.set_xlabel("N (nodes before adding one)")
    b.set_ylabel("keys moved / ideal 1/(N+1)")
    b.set_title("keys moved when adding a node to N, relative to the ideal", fontsize=10)
    for ax in (a, b):
        ax.legend(fontsize=8)
    save(fig, out, "hash.png", footer(fig, data))


def feedback_figure(results: Path, out: Path) -> None:
    data = load(results, "feedback")
    if data is None or "comparison" not in data["results"]:
        print("no feedback.json: skipped feedback_ejection.png")
        return
    cmp = data["results"]["comparison"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, label, color in (
        ("shared", "ClusterMap: failures of every worker add up", "tab:blue"),
        ("local", "per-process ejection: each worker fails 5 times itself", "tab:gray"),
    ):
        times = sorted(cmp[mode])
        if not times:
            continue
        t0 = times[0]
        xs = [t - t0 for t in times]
        ax.step(xs, range(1, len(xs) + 1), where="post", label=f"{label} ({len(xs)})", color=color)
    ax.set_xlabel("ms since the first failed request")
    ax.set_ylabel("failed requests (cumulative)")
    ax.set_title("A node fails every call: 8 workers, 3 nodes, 10 ms per request")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, out, "feedback_ejection.png", footer(fig, data))


FIGURES: list[Callable[[Path, Path], None]] = [
    pick_figure,
    propagation_figure,
    propagation_watch_figure,
    scale_figure,
    memory_figure,
    fleet_figure,
    hash_figure,
    feedback_figure,
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for draw in FIGURES:
        draw(args.results, args.out)


if __name__ == "__main__":
    main()
