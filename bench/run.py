"""Run the whole benchmark suite, keep every figure as JSON, and draw the plots.

    uv run --group bench python bench/run.py [--quick] [--only pick,scale,...] [--no-plots]
                                             [--results DIR] [--img DIR]

Each step is one of the scripts next to this file (each also runs on its own), started in its
own session with a time limit; its output goes to the terminal and to ``bench/results/NAME.txt``,
its figures to ``bench/results/NAME.json``. Then ``bench/plots.py`` draws ``docs/img/*.png``
from those files. The full run takes about 4 minutes on the 2-core reference machine, ``--quick``
about 2 minutes. A failed step is reported at the end (exit status 1); the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name: (script and arguments, arguments instead for --quick, time limit in seconds)
STEPS: dict[str, tuple[list[str], list[str], float]] = {
    "pick": (["bench_pick.py"], ["bench_pick.py", "--number", "100000"], 180),
    "balance": (["bench_balance.py"], ["bench_balance.py", "--quick"], 180),
    "region": (["bench_region.py"], ["bench_region.py", "--services", "3000"], 120),
    "sidecar": (["bench_sidecar.py"], ["bench_sidecar.py", "--services", "3000"], 120),
    "scale": (["bench_scale.py"], ["bench_scale.py", "--quick"], 240),
    "hash": (["bench_hash.py"], ["bench_hash.py", "--max-add", "16"], 120),
    "feedback": (["bench_feedback.py"], ["bench_feedback.py", "--quick"], 300),
    "latency": (["bench_latency.py"], ["bench_latency.py", "--seconds", "60"], 120),
    "http": (["bench_http.py"], ["bench_http.py", "--quick"], 300),
    "tables": (["bench_tables.py"], ["bench_tables.py", "--quick", "--repeat", "7"], 600),
    "routing": (["bench_routing.py"], ["bench_routing.py", "--quick"], 300),
    "callgrind": (["bench_callgrind.py"], ["bench_callgrind.py", "--number", "5000"], 1800),
    "propagation": (
        ["bench_propagation.py", "--changes", "40"],
        ["bench_propagation.py", "--changes", "15"],
        180,
    ),
    "propagation_gunicorn": (
        ["bench_propagation.py", "--mode", "gunicorn", "--changes", "40"],
        ["bench_propagation.py", "--mode", "gunicorn", "--changes", "15"],
        180,
    ),
    "propagation_watch": (
        ["bench_propagation.py", "--mode", "gunicorn", "--subscribe", "both", "--changes", "40"],
        ["bench_propagation.py", "--mode", "gunicorn", "--subscribe", "both", "--changes", "15"],
        240,
    ),
    "server": (
        ["bench_server.py"],
        ["bench_server.py", "--duration", "2", "--scale", "1000x100"],
        240,
    ),
    "fleet": (
        [
            "bench_fleet.py",
            "--subscribers",
            "100,500,1000,2000,5000",
            "--duration",
            "8",
            "--client-nice",
            "10",
        ],
        [
            "bench_fleet.py",
            "--subscribers",
            "100,1000,2000",
            "--duration",
            "4",
            "--client-nice",
            "10",
        ],
        420,
    ),
    "streams": (
        ["bench_streams.py", "--streams", "1000,2000,5000", "--pin"],
        ["bench_streams.py", "--streams", "500,1000", "--idle", "16", "--changes", "5", "--pin"],
        900,
    ),
}


def run_step(name: str, argv: list[str], limit: float, results: Path) -> bool:
    """Run one script in its own session; on timeout or Ctrl-C stop the whole session."""
    out_json = results / f"{name}.json"
    if out_json.is_relative_to(HERE.parent):
        out_json = out_json.relative_to(HERE.parent)
    cmd = [sys.executable, str(HERE / argv[0]), *argv[1:], "--json", str(out_json)]
    print(f"\n=== {name}: {' '.join(['python', f'bench/{argv[0]}', *argv[1:]])}", flush=True)
    log = results / f"{name}.txt"
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=HERE.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=dict(os.environ, CLUSTERMAP_BENCH_SUITE=" ".join(["bench/run.py", *sys.argv[1:]])),
        )
        watchdog = threading.Timer(limit, _stop, [proc])
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                out.write(line)
            proc.wait()
        finally:
            watchdog.cancel()
            _stop(proc)  # also on Ctrl-C; and whatever the script left in its session
    if time.monotonic() - t0 >= limit:
        print(f"=== {name}: stopped after {limit:.0f} s", flush=True)
        return False
    ok = proc.returncode == 0
    print(f"=== {name}: {'done' if ok else 'FAILED'} in {time.monotonic() - t0:.0f} s", flush=True)
    return ok


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the step's session (its servers and workers too), then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived the script
    proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sweeps (about 2 minutes)")
    ap.add_argument("--only", help=f"comma-separated steps among: {', '.join(STEPS)}")
    ap.add_argument("--no-plots", action="store_true", help="do not redraw docs/img/*.png")
    ap.add_argument("--results", type=Path, default=RESULTS, help="default: bench/results")
    ap.add_argument("--img", type=Path, default=HERE.parent / "docs" / "img", help="plots go here")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(STEPS)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        ap.error(f"unknown step(s): {', '.join(unknown)}")
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    failed = []
    for name in names:
        full, quick, limit = STEPS[name]
        if not run_step(name, quick if args.quick else full, limit, results):
            failed.append(name)
    if not args.no_plots:
        print("\n=== plots", flush=True)
        plots = [sys.executable, str(HERE / "plots.py"), "--results", str(results)]
        if subprocess.run([*plots, "--out", str(args.img)], cwd=HERE.parent).returncode:
            failed.append("plots")
    print(f"\nsuite finished in {time.monotonic() - t0:.0f} s; results in {results}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
