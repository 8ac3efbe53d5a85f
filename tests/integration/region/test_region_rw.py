"""Publishing and reading through real files: versioning, growth, permissions, bad files."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import churn
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustermap.errors import (
    ClusterMapError,
    CorruptRegion,
    RegionFull,
    RegionUnavailable,
    UnknownService,
)
from clustermap.model import Node, Service
from clustermap.region import layout as L
from clustermap.region.reader import RegionReader
from clustermap.region.writer import RegionWriter
from tests.support.procs import Child


def svc(name: str, *ports: int) -> Service:
    return Service(name, tuple(Node("10.0.0.1", p) for p in ports))


def test_only_changed_services_get_a_new_version(region_path: Path) -> None:
    with RegionWriter(region_path) as w:
        w.publish([svc("a", 1), svc("b", 2)])
        r = RegionReader(region_path)
        slot_a, va, _ = r.lookup("a")
        slot_b, vb, _ = r.lookup("b")
        gen = r.generation

        stats = w.publish([svc("a", 1), svc("b", 3)])  # a is unchanged
        assert (stats.written, stats.unchanged) == (1, 1)
        assert r.generation == gen + 1
        assert r.slot_version(slot_a) == va  # one load says "a did not change"
        assert r.slot_version(slot_b) != vb
        assert r.service("b").nodes[0].port == 3

        assert w.publish([svc("a", 1)]).written == 0
        assert r.generation == gen + 1  # nothing changed, nothing published

        w.publish(removals=["a"])
        with pytest.raises(UnknownService, match="'a'"):
            r.service("a")
        assert r.names() == ["b"]


def test_meta_and_sync_time_are_published(region_path: Path) -> None:
    with RegionWriter(region_path) as w:
        w.publish([svc("a", 1)], meta=L.Meta(revision=9, stale=True, reason="x"), sync_ns=123)
        r = RegionReader(region_path)
        assert r.meta().revision == 9
        assert r.meta().stale
        assert r.last_sync_ns == 123
        assert r.writer_pid == os.getpid()
        w.touch(456)
        assert r.last_sync_ns == 456


GROW_READER = """
import sys
from clustermap.errors import UnknownService
from clustermap.region.reader import RegionReader
r = RegionReader(sys.argv[1])
print("ready", flush=True)
while True:
    names = r.names()
    for n in names:
        try:
            s = r.service(n)
        except UnknownService:  # removed since names() was read: a legitimate race
            continue
        assert s.name == n, s
        assert n == "seed" or len(s.nodes) == 100, s
    if len(names) == int(sys.argv[2]):
        print("done", r.file_size, flush=True)
        break
"""


def test_readers_follow_the_region_as_it_grows_and_compacts(region_path: Path) -> None:
    total = 400
    with RegionWriter(region_path) as w:
        w.publish([churn.service("seed", 1)])
        first_size = RegionReader(region_path).file_size
        with Child.python("-c", GROW_READER, str(region_path), str(total)) as reader:
            reader.expect("ready")
            for i in range(0, total, 25):
                batch = [
                    Service(f"svc-{j}", tuple(Node(f"10.1.{j % 250}.{k}", 80) for k in range(100)))
                    for j in range(i, i + 25)
                ]
                w.publish(batch, ["seed"])
            done = reader.expect("done", timeout=30)
        grown = int(done.split()[1])
        assert grown > first_size
        assert len(RegionReader(region_path).names()) == total
        payload = sum(
            len(L.encode_service(RegionReader(region_path).service(n)))
            for n in RegionReader(region_path).names()
        )
        assert grown <= 1.5 * payload + 256 * 1024, (grown, payload)

        # Remove nearly everything: the region compacts, and an old reader moves with it.
        r = RegionReader(region_path)
        w.replace_all([svc("last", 1)])
        assert r.names() == ["last"]
        assert r.file_size < grown


def test_region_is_created_0644_and_symlinks_are_refused(region_path: Path) -> None:
    old = os.umask(0o077)
    try:
        RegionWriter(region_path).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(region_path).st_mode) == 0o644
    link = region_path.with_name("link.region")
    link.symlink_to(region_path)
    with pytest.raises(ClusterMapError, match="symlink"):
        RegionWriter(link)
    with pytest.raises(RegionUnavailable, match="symlink"):
        RegionReader(link)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_a_region_owned_by_another_user_is_refused_by_the_writer(
    region_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    RegionWriter(region_path).close()
    os.chown(region_path, 65534, 65534)
    with pytest.raises(ClusterMapError, match="owned by uid 65534"):
        RegionWriter(region_path)
    # Readers trust root, themselves, and the owners named in CLUSTERMAP_REGION_OWNER.
    monkeypatch.delenv("CLUSTERMAP_REGION_OWNER", raising=False)
    with pytest.raises(RegionUnavailable, match="set CLUSTERMAP_REGION_OWNER=nobody"):
        RegionReader(region_path)
    for owner in ("nobody", "65534", "daemon, nobody"):
        monkeypatch.setenv("CLUSTERMAP_REGION_OWNER", owner)
        RegionReader(region_path)
    monkeypatch.setenv("CLUSTERMAP_REGION_OWNER", "no-such-user-here")
    with pytest.raises(RegionUnavailable, match="no user named"):
        RegionReader(region_path)


def test_world_writable_region_is_not_trusted(region_path: Path) -> None:
    RegionWriter(region_path).close()
    os.chmod(region_path, 0o666)
    with pytest.raises(RegionUnavailable, match="world-writable"):
        RegionReader(region_path)


def test_bad_files_give_one_line_errors(region_path: Path) -> None:
    with pytest.raises(RegionUnavailable, match="no region"):
        RegionReader(region_path)
    region_path.write_bytes(b"")
    with pytest.raises(CorruptRegion, match="truncated"):
        RegionReader(region_path)
    region_path.write_bytes(os.urandom(8192))
    with pytest.raises(CorruptRegion, match="not a ClusterMap region"):
        RegionReader(region_path)
    with pytest.raises(ClusterMapError, match="refusing to overwrite"):
        RegionWriter(region_path)  # someone else's file stays untouched

    region_path.unlink()
    with RegionWriter(region_path) as w:
        w.publish([svc("a", 1)])
    good = region_path.read_bytes()
    region_path.write_bytes(good[:5000])
    with pytest.raises(CorruptRegion, match="size"):
        RegionReader(region_path)
    newer = bytearray(good)
    newer[8:12] = (2).to_bytes(4, "little")
    region_path.write_bytes(bytes(newer))
    with pytest.raises(CorruptRegion, match="version 2"):
        RegionReader(region_path)


@contextlib.contextmanager
def _corruptible(region_path: Path) -> Iterator[bytes]:
    region_path.unlink(missing_ok=True)
    with RegionWriter(region_path) as w:
        w.publish([churn.service(f"svc-{i}", i + 1) for i in range(5)], meta=L.Meta(revision=3))
    yield region_path.read_bytes()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzzed_regions_give_valid_content_or_a_clustermap_error(
    region_path: Path, flips: list[tuple[int, int]]
) -> None:
    with _corruptible(region_path) as good:
        data = bytearray(good)
        for pos, value in flips:
            data[pos % len(data)] = value
        region_path.write_bytes(bytes(data))
    try:
        r = RegionReader(region_path, read_budget=0.005)
        r.meta()
        for name in r.names():
            churn.verify(r.service(name))  # whatever is returned is exactly right
    except ClusterMapError:
        pass


def test_a_corrupt_record_fails_fast_after_the_first_budget(region_path: Path) -> None:
    with _corruptible(region_path):
        pass
    r = RegionReader(region_path, read_budget=1.0)
    slot, _, _ = r.lookup("svc-1")
    off = int(r.words[r.version_index(slot) + 1])
    data = bytearray(region_path.read_bytes())
    data[off + 30] ^= 0xFF
    region_path.write_bytes(bytes(data))  # same inode: the mapping sees the damage
    with pytest.raises(CorruptRegion, match="no valid record"):
        r.service("svc-1")
    # "holds an invalid record" (not "no valid record after 1 s"): the version already known to
    # be bad is refused at once, without spending a second budget on it
    with pytest.raises(CorruptRegion, match="holds an invalid record"):
        r.service("svc-1")
    churn.verify(r.service("svc-2"))  # the rest of the map still reads


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a test tmpfs (the RLIMIT test covers the rest)")
    d = Path(tempfile.mkdtemp(prefix="cm-tmpfs-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(d)]).returncode:
        pytest.skip("mount is not permitted here")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


def _fill_until_full(path: Path) -> tuple[dict[str, int], RegionFull]:
    with RegionWriter(path) as w:
        w.publish([churn.service("keep", 1)])
        good = {"keep": 1}
        for i in range(10_000):
            big = Service(f"big-{i}", tuple(Node(f"10.2.{i % 250}.{k}", 80) for k in range(200)))
            try:
                w.publish([big])
            except RegionFull as exc:
                return good, exc
            good[big.name] = 0
    raise AssertionError("the region never filled up")


def test_full_tmpfs_is_reported_and_the_last_map_stays(small_tmpfs: Path) -> None:
    path = small_tmpfs / "r.region"
    good, exc = _fill_until_full(path)
    assert "no space" in str(exc)
    r = RegionReader(path)
    assert set(r.names()) == set(good)  # nothing lost, nothing half-written
    churn.verify(r.service("keep"))
    assert not [p for p in os.listdir(small_tmpfs) if p.endswith(".tmp")]


RLIMIT_CHILD = """
import resource, signal, sys
sys.path[:0] = [sys.argv[2]]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))
from test_region_rw import _fill_until_full
from pathlib import Path
good, exc = _fill_until_full(Path(sys.argv[1]))
print("full", len(good), exc)
"""


def test_file_size_limit_is_reported_not_a_sigbus(region_path: Path) -> None:
    here = str(Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", RLIMIT_CHILD, str(region_path), here],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(here).parents[2])},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip()
    assert line.startswith("full "), line
    assert "no space" in line, line
    kept = int(line.split()[1])
    assert len(RegionReader(region_path).names()) == kept
