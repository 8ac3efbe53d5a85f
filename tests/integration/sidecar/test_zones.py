"""Zones with real processes: one cm-server, two cm-sidecars on two machines' regions whose zones
differ (``--zone`` and ``$CLUSTERMAP_ZONE``). Picks stay in each machine's zone, spill when it
drains, return when it recovers; a sidecar restarted in another zone moves warm workers along."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import clustermap
from tests.support.procs import wait_for
from tests.support.stack import CMCTL, ServerProc, SidecarProc

UP, DRAIN = 1, 3  # NODE_STATUS_UP, NODE_STATUS_DRAIN
ZONE_A = {f"10.3.0.{i}:80" for i in range(4)}
ZONE_B = {f"10.3.0.{i}:80" for i in range(4, 8)}


def picks(cm: clustermap.ClusterMap, n: int = 200) -> set[str]:
    return {cm.pick("api").address for _ in range(n)}


def cmctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CMCTL, *args], capture_output=True, text=True, timeout=30, check=False)


def test_picks_stay_local_spill_and_return_with_real_sidecars(region_dir: Path) -> None:
    server = ServerProc()
    a = b = None
    try:
        for i in range(8):
            server.register("api", f"10.3.0.{i}", 80, zone="a" if i < 4 else "b")
        server.register("api", "10.3.0.9", 80)  # no zone: used only on spill
        a = SidecarProc(region_dir / "a.region", [server.address], "--zone", "a")
        b = SidecarProc(region_dir / "b.region", [server.address], env={"CLUSTERMAP_ZONE": "b"})
        a.wait_synced()
        b.wait_synced()
        in_a = clustermap.open(a.region)
        in_b = clustermap.open(b.region)
        assert (in_a.zone, in_b.zone) == ("a", "b")
        wait_for(lambda: picks(in_a) == ZONE_A, 30, "picks in zone a")
        wait_for(lambda: picks(in_b) == ZONE_B, 30, "picks in zone b")

        # zone a drains down to 2 of 4: machine a spills to every healthy node; b stays home
        for i in (0, 1):
            server.set("api", f"10.3.0.{i}", 80, status=DRAIN)
        rest = ZONE_A - {"10.3.0.0:80", "10.3.0.1:80"} | ZONE_B | {"10.3.0.9:80"}
        wait_for(lambda: picks(in_a, 400) == rest, 30, "machine a to spill")
        assert picks(in_b) == ZONE_B
        shown = cmctl("--region", str(a.region), "pick", "api")
        assert shown.returncode == 0, shown.stderr
        assert "zone a: spilled (2 of 4 nodes healthy in zone a, under" in shown.stderr
        dumped = json.loads(cmctl("--region", str(a.region), "dump", "--json").stdout)
        assert dumped["zone"] == "a"
        assert dumped["services"]["api"]["zone"]["decision"] == "spilled"

        # it recovers: picks return to zone a
        for i in (0, 1):
            server.set("api", f"10.3.0.{i}", 80, status=UP)
        wait_for(lambda: picks(in_a) == ZONE_A, 30, "picks back in zone a")
        text = cmctl("--region", str(a.region), "dump").stdout
        assert "zone local: 4 of 4 nodes healthy in zone a" in text

        # machine a's sidecar restarts in zone b: its warm workers follow without a map change
        a.close()
        a = SidecarProc(region_dir / "a.region", [server.address], "--zone", "b")
        wait_for(lambda: picks(in_a) == ZONE_B, 30, "machine a's workers to move to zone b")
        assert in_a.zone == "b"
    finally:
        for p in (a, b):
            if p is not None:
                p.close()
        server.close()


def test_a_zone_name_the_rules_refuse_is_a_one_line_error(region_dir: Path) -> None:
    for bad in ("bad zone", "-a", "z" * 65, "a\x1bb"):
        out = subprocess.run(
            [
                str(Path(CMCTL).with_name("cm-sidecar")),
                "--region",
                str(region_dir / "r"),
                "--zone=" + bad,
                "--print-config",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 2
        assert out.stderr.startswith("cm-sidecar: invalid settings: zone: Value error, zone name")
        assert out.stderr.count("\n") == 1
        assert "Traceback" not in out.stderr
