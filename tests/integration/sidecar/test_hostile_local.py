"""Hostile input on the machine (issue 17): a bad record from the server, other local users, idle
HTTP clients, garbage in the region's files. Real cm-server, cm-sidecar and cmctl processes; the
other user is made for the test (``useradd``) and acts through ``runuser`` with shell tools."""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import secrets
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import clustermap
from clustermap.region.reader import RegionReader
from clustermap.region.writer import RegionWriter
from tests.support.procs import python_env, wait_for
from tests.support.proxy import TamperingProxy
from tests.support.stack import CM_SIDECAR, CMCTL, ServerProc, SidecarProc, free_port

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to create a second user (useradd) and act as it"
)


@pytest.fixture
def server() -> Iterator[ServerProc]:
    s = ServerProc()
    yield s
    s.close()


@pytest.fixture
def other_user() -> Iterator[str]:
    """A fresh unprivileged local user, deleted afterwards."""
    name = f"cmt{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=30
    )


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=60, env=env or python_env()
    )


def one_line_error(out: subprocess.CompletedProcess[str], prefix: str) -> str:
    """The command failed with a one-line error starting with ``prefix``, and no traceback."""
    assert out.returncode != 0, out
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(prefix), out.stderr
    return last


def addresses(region: Path, service: str) -> set[str]:
    try:
        return {n.address for n in RegionReader(region).service(service).nodes}
    except clustermap.ClusterMapError:
        return set()


def status(region: Path) -> dict[str, Any]:
    out = run(CMCTL, "--region", str(region), "status", "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def _get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# -- item 2: one bad record is contained ---------------------------------------------------------


class PoisoningProxy(TamperingProxy):
    """Gives service ``a``'s first node a host no registry may accept, in every answer (full or
    delta) while ``poisoning`` is set; the digests and checksums stay the server's."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, lambda resp: None)
        self.poisoning = False

    def Poll(self, request, context):  # type: ignore[no-untyped-def]
        resp = self.stub.Poll(request, timeout=5)
        if self.poisoning:
            for s in resp.services:
                if s.name == "a" and s.nodes:
                    s.nodes[0].host = "evil\x1b[2J host"
                    self.tampered += 1
        return resp


def test_one_bad_service_keeps_its_last_nodes_while_the_rest_flows(
    server: ServerProc, region_dir: Path
) -> None:
    region = region_dir / "r.region"
    proxy = PoisoningProxy(server.address)
    server.register("a", "10.0.0.1", 80)
    server.register("b", "10.0.1.1", 80)
    port = free_port()
    sidecar = SidecarProc(region, [proxy.address], "--metrics", f"127.0.0.1:{port}")
    fresh = None
    try:
        sidecar.wait_synced()
        proxy.poisoning = True
        server.register("a", "10.0.0.2", 80)  # this version of a is refused
        wait_for(lambda: status(region)["quarantined"], 30, "a quarantined")
        server.register("b", "10.0.1.2", 80)  # ...and b's change still arrives
        wait_for(lambda: addresses(region, "b") == {"10.0.1.1:80", "10.0.1.2:80"}, 30, "b")
        assert addresses(region, "a") == {"10.0.0.1:80"}  # a's last good nodes
        st = status(region)
        assert st["stale"] is False, st
        [q] = st["quarantined"]
        assert q["service"] == "a", q
        assert "is neither an IP address nor a valid DNS name" in q["reason"], q
        assert "\x1b" not in q["reason"]  # escaped: a record cannot rewrite a terminal
        counters = st["counters"]
        assert counters.get("full") == 1, counters  # no resync storm
        assert not counters.get("checksum_mismatches"), counters
        assert not counters.get("poll_errors"), counters
        text = run(CMCTL, "--region", str(region), "status")
        assert text.returncode == 0
        assert "quarantined  1" in text.stdout, text.stdout
        assert "is neither an IP address nor a valid DNS name" in text.stdout, text.stdout
        _, metrics = _get(f"http://127.0.0.1:{port}/metrics")
        assert 'clustermap_sidecar_quarantined{reason="' in metrics
        assert "clustermap_sidecar_quarantined_services 1.0" in metrics

        # A sidecar starting now gets a full map: a never had a good version there.
        fresh = SidecarProc(region_dir / "fresh.region", [proxy.address])
        fresh.wait_synced()
        assert addresses(region_dir / "fresh.region", "b") == {"10.0.1.1:80", "10.0.1.2:80"}
        assert addresses(region_dir / "fresh.region", "a") == set()
        flagged = status(region_dir / "fresh.region")["quarantined"]
        assert [q["service"] for q in flagged] == ["a"]

        # The server's record is fixed (here: no longer poisoned) and changes: the flag clears.
        proxy.poisoning = False
        server.register("a", "10.0.0.3", 80)
        want = {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}
        wait_for(lambda: addresses(region, "a") == want, 30, "a fixed")
        wait_for(lambda: status(region)["quarantined"] == [], 30, "flag cleared")
        wait_for(lambda: addresses(region_dir / "fresh.region", "a") == want, 30, "a fresh")
        _, metrics = _get(f"http://127.0.0.1:{port}/metrics")
        assert "clustermap_sidecar_quarantined_services 0.0" in metrics
        assert status(region)["counters"].get("full") == 1
    finally:
        if fresh is not None:
            fresh.close()
        sidecar.close()
        proxy.close()


# -- item 7 and issue 16: the metrics server -----------------------------------------------------


def test_an_idle_connection_does_not_stall_healthz_and_unknown_paths_are_404(
    server: ServerProc, region_path: Path
) -> None:
    server.register("a", "10.0.0.1", 80)
    port = free_port()
    sidecar = SidecarProc(region_path, [server.address], "--metrics", f"127.0.0.1:{port}")
    try:
        sidecar.wait_synced()
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(base + "/healthz")[0] == 200, 30, "healthz")
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        idle[1].sendall(b"GET /metr")  # a request that never ends
        try:
            code, body = _get(base + "/healthz")  # would hang behind the idle connections
            assert code == 200, body
            assert body.startswith("ok"), body
            assert _get(base + "/metrics")[0] == 200
            for path in ("/", "/nope", "/metrics/x", "/healthzz"):
                assert _get(base + path)[0] == 404, path
        finally:
            for s in idle:
                s.close()
    finally:
        sidecar.close()
    assert "Traceback" not in sidecar.child.stderr()


def test_a_metrics_port_in_use_is_one_line(server: ServerProc, region_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        out = run(
            CM_SIDECAR, "--region", str(region_path), "--server", server.address,
            "--metrics", address,
        )  # fmt: skip
    last = one_line_error(out, f"cm-sidecar: metrics on {address}: ")
    assert "in use" in last, last


# -- issue 16: a region directory that cannot be created ---------------------------------------


def test_a_region_directory_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    for region in ("/proc/cm-no-such/r.region", f"{afile}/r.region"):
        out = run(CM_SIDECAR, "--region", region, "--server", "127.0.0.1:1")
        one_line_error(out, "cm-sidecar: ")
        for command in ("status", "dump"):
            out = run(CMCTL, "--region", region, command)
            one_line_error(out, "cmctl: ")


# -- item 3: who owns the region and its directory -----------------------------------------------


def test_a_last_sync_in_the_future_is_stale(region_path: Path) -> None:
    with RegionWriter(region_path) as w:
        w.publish(meta=clustermap.region.Meta(revision=7), sync_ns=time.time_ns() + 3600 * 10**9)
        st = status(region_path)
    assert st["stale"] is True, st
    assert "in the future" in str(st["reason"]), st
    out = run(CMCTL, "--region", str(region_path), "status")
    assert "stale        yes" in out.stdout, out.stdout


@needs_root
def test_the_sidecar_refuses_a_directory_others_can_change(
    server: ServerProc, region_dir: Path, other_user: str
) -> None:
    os.chmod(region_dir, 0o755)
    # A sticky world-writable directory, as /dev/shm is.
    sticky = region_dir / "shm"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    # Created there by another user (say, after a reboot, before the sidecar started).
    theirs = sticky / "theirs"
    assert as_user(other_user, "mkdir", "-m", "0755", str(theirs)).returncode == 0
    # Writable by everyone without the sticky bit.
    open_dir = region_dir / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    # A symlink to a good directory.
    good = region_dir / "good"
    good.mkdir()
    (region_dir / "link").symlink_to(good)
    for path, why in (
        (theirs / "r.region", f"owned by {other_user}"),
        (theirs / "deeper" / "r.region", f"owned by {other_user}"),
        (open_dir / "r.region", "without the sticky bit"),
        (region_dir / "link" / "r.region", "is a symlink"),
    ):
        out = run(CM_SIDECAR, "--region", str(path), "--server", server.address)
        assert why in one_line_error(out, "cm-sidecar: "), out.stderr
        assert not path.exists()

    # The sticky directory itself stays usable, and there the other user can neither replace
    # the region nor its directory.
    server.register("a", "10.0.0.1", 80)
    region = sticky / "clustermap" / "r.region"
    sidecar = SidecarProc(region, [server.address])
    try:
        sidecar.wait_synced()
        assert region.parent.stat().st_mode & 0o7777 == 0o755  # made by the sidecar
        forged = sticky / "forged"
        assert as_user(other_user, "cp", str(region), str(forged)).returncode == 0
        assert as_user(other_user, "mv", "-f", str(forged), str(region)).returncode != 0
        moved = as_user(other_user, "mv", str(region.parent), str(sticky / "moved"))
        assert moved.returncode != 0
        assert addresses(region, "a") == {"10.0.0.1:80"}
        # A region the other user made is not trusted by readers, with the way out named.
        out = run(CMCTL, "--region", str(forged), "dump")
        assert f"set CLUSTERMAP_REGION_OWNER={other_user}" in one_line_error(out, "cmctl: ")
        out = run(
            CMCTL,
            "--region",
            str(forged),
            "dump",
            env=python_env(CLUSTERMAP_REGION_OWNER=other_user),
        )
        assert out.returncode == 0, out.stderr
        # A path through a symlink the other user owns (and could re-point) is refused too.
        assert as_user(other_user, "ln", "-s", str(sticky), str(sticky / "via")).returncode == 0
        via = sticky / "via" / "clustermap" / "r.region"
        out = run(CMCTL, "--region", str(via), "dump")
        assert "symlink owned by" in one_line_error(out, "cmctl: ")
    finally:
        sidecar.close()


@needs_root
def test_readers_trust_a_region_only_from_trusted_owners(region_dir: Path, other_user: str) -> None:
    os.chmod(region_dir, 0o755)
    region = region_dir / "r.region"
    with RegionWriter(region) as w:
        w.publish([clustermap.Service("a", (clustermap.Node("10.0.0.1", 80),))])
    uid = pwd.getpwnam(other_user).pw_uid
    code = (
        "import clustermap, sys\n"
        "try:\n"
        "    print(clustermap.open(sys.argv[1]).pick('a').address)\n"
        "except clustermap.ClusterMapError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    worker = [str(Path(CMCTL).parent / "python"), "-c", code, str(region)]
    assert run(*worker).stdout.strip() == "10.0.0.1:80"  # root's region: trusted
    os.chown(region, uid, -1)  # as if that user had planted it
    out = run(*worker).stdout.strip()
    assert out.startswith("RegionUnavailable"), out
    assert f"owned by {other_user} (uid {uid})" in out
    assert "CLUSTERMAP_REGION_OWNER" in out
    for owner in (other_user, str(uid)):
        out = run(*worker, env=python_env(CLUSTERMAP_REGION_OWNER=owner)).stdout.strip()
        assert out == "10.0.0.1:80", out
    # The directory chain counts too: the region's directory handed to that user.
    os.chown(region, 0, -1)
    os.chown(region_dir, uid, -1)
    out = run(*worker).stdout.strip()
    assert out.startswith("RegionUnavailable"), out
    assert "directory owned by" in out, out


# -- item 4: the election cannot be blocked ------------------------------------------------------


@needs_root
def test_another_user_cannot_lock_the_election(
    server: ServerProc, region_dir: Path, other_user: str
) -> None:
    os.chmod(region_dir, 0o755)
    region = region_dir / "r.region"
    lock = Path(f"{region}.lock")
    lock.write_text("")  # left over from an older version, readable by all
    os.chmod(lock, 0o644)
    server.register("a", "10.0.0.1", 80)
    sidecar = SidecarProc(region, [server.address])
    try:
        sidecar.wait_synced()
        assert lock.stat().st_mode & 0o777 == 0o600
        out = as_user(other_user, "flock", "-x", "-n", str(lock), "true")
        assert out.returncode != 0, out
        assert "Permission denied" in out.stderr, out
    finally:
        sidecar.close()


def test_a_busy_lock_is_one_line_even_for_a_standby(server: ServerProc, region_path: Path) -> None:
    """Whoever can open the lock file (the same user, root) and takes an OFD read lock on it
    makes the sidecar wait (standby) or refuse: "busy", never a traceback."""
    server.register("a", "10.0.0.1", 80)
    first = SidecarProc(region_path, [server.address])
    first.wait_synced()
    first.kill()
    fd = os.open(f"{region_path}.lock", os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 1, 0))
        out = run(CM_SIDECAR, "--region", str(region_path), "--server", server.address)
        assert "busy" in one_line_error(out, "cm-sidecar: ")
        standby = SidecarProc(region_path, [server.address], "--standby")
        try:
            wait_for(lambda: "busy" in standby.child.stderr(), 30, "standby says busy")
            assert standby.child.proc.poll() is None, standby.child.stderr()
            before = RegionReader(region_path).last_sync_ns
            os.close(fd)
            fd = -1
            wait_for(lambda: RegionReader(region_path).last_sync_ns > before, 30, "takeover")
            assert RegionReader(region_path).writer_pid == standby.pid
            assert "Traceback" not in standby.child.stderr()
        finally:
            standby.close()
    finally:
        if fd >= 0:
            os.close(fd)


# -- the standing hostile test, local part: garbage in the region's files -----------------------


def test_garbage_in_the_region_files_never_crashes_anyone(
    server: ServerProc, region_dir: Path
) -> None:
    region, snap = region_dir / "r.region", region_dir / "last.snap"
    lock = Path(f"{region}.lock")
    server.register("a", "10.0.0.1", 80)
    sidecar = SidecarProc(region, [server.address], "--snapshot", str(snap))
    try:
        sidecar.wait_synced()
        # Garbage over the lock file of a live writer: a second sidecar still says "busy" in
        # one clean line (the pid it shows is not taken from the garbage).
        lock.write_bytes(b"\x1b[2J\x00" + os.urandom(64))
        out = run(CM_SIDECAR, "--region", str(region), "--server", server.address)
        last = one_line_error(out, "cm-sidecar: ")
        assert "busy" in last, last
        assert "\x1b" not in last, last
        # Garbage over the live region's records: readers get the good map or one clear error.
        data_offset = RegionReader(region).header.data_offset
        with open(region, "r+b") as f:
            f.seek(data_offset)
            f.write(os.urandom(8192))
        for command in ("dump", "status"):
            out = run(CMCTL, "--region", str(region), command)
            assert out.returncode in (0, 1), out
            assert "Traceback" not in out.stderr, out
        server.register("b", "10.0.1.1", 80)  # the sidecar still publishes
        wait_for(lambda: addresses(region, "b") == {"10.0.1.1:80"}, 30, "b published")
    finally:
        sidecar.close()
    # Garbage in the snapshot and the region while no sidecar runs: the next one starts,
    # publishes the server's map, and says what it could not load.
    snap.write_bytes(b"CLMAPSNP" + os.urandom(100))
    with open(region, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(4096))
    sidecar = SidecarProc(region, [server.address], "--snapshot", str(snap))
    try:
        wait_for(lambda: addresses(region, "b") == {"10.0.1.1:80"}, 30, "republished")
        wait_for(lambda: addresses(region, "a") == {"10.0.0.1:80"}, 30, "republished a")
        out = run(CMCTL, "--region", str(region), "dump", "--json")
        assert out.returncode == 0, out.stderr
    finally:
        sidecar.close()
    assert "Traceback" not in sidecar.child.stderr()
