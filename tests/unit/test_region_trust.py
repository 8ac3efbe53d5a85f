"""The region trust rule (clustermap.region.trust) on real files and directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clustermap.errors import RegionUnavailable
from clustermap.region import trust


def test_owners_are_root_self_and_the_setting() -> None:
    me = os.geteuid()
    assert trust.reader_owners("") == {0, me}
    assert trust.reader_owners("daemon, 4242,,") == {0, me, 1, 4242}
    with pytest.raises(RegionUnavailable, match="no user named 'no-such-user-x'"):
        trust.reader_owners("no-such-user-x")
    assert trust.writer_owners() == {0, me}


def test_directories_others_can_change_are_refused(tmp_path: Path) -> None:
    owners = trust.writer_owners()
    base = tmp_path / "base"
    base.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    trust.check_directory(str(base / "r.region"), owners)
    os.chmod(base, 0o775)
    with pytest.raises(RegionUnavailable, match="mode 0775"):
        trust.check_directory(str(base / "r.region"), owners)
    os.chmod(base, 0o1777)  # sticky, as /dev/shm
    trust.check_directory(str(base / "r.region"), owners)
    (tmp_path / "link").symlink_to(base)
    with pytest.raises(RegionUnavailable, match="directory is a symlink"):
        trust.check_directory(str(tmp_path / "link" / "r.region"), owners)
    os.chmod(tmp_path, 0o777)  # a directory higher up counts too
    with pytest.raises(RegionUnavailable, match=f"{tmp_path}: directory is writable"):
        trust.check_directory(str(base / "r.region"), owners)


def test_files_others_can_write_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "r.region"
    f.write_bytes(b"x")
    owners = trust.reader_owners("")
    for mode, ok in ((0o644, True), (0o664, False), (0o646, False)):
        os.chmod(f, mode)
        if ok:
            trust.check_file(str(f), f.stat(), owners)
        else:
            with pytest.raises(RegionUnavailable, match="writable"):
                trust.check_file(str(f), f.stat(), owners)
