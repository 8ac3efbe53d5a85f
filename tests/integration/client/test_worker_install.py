"""A worker-only install: ``pip install clustermap`` brings msgpack and xxhash and nothing else,
picks from a region, and each command without its extra says in one line what to install.

The wheel is built from this checkout and installed with its two dependencies into a fresh
virtualenv (from uv's cache when it has them: no network needed on a machine that ran the
set-up)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clustermap.model import Node, Service
from clustermap.region.writer import RegionWriter
from tests.support.procs import ROOT


def _uv() -> list[str]:
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv:
        return [uv]
    if subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True).returncode:
        pytest.skip("needs uv (scripts/_uv.sh installs it)")
    return [sys.executable, "-m", "uv"]


def _offline_first(argv: list[str]) -> None:
    """Run a uv command from its cache; retry online when the cache lacks something."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    r = subprocess.run([*argv, "--offline"], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def worker_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = _uv()
    root = tmp_path_factory.mktemp("worker-install")
    _offline_first([*uv, "build", "--wheel", "--out-dir", str(root / "dist"), str(ROOT)])
    (wheel,) = (root / "dist").glob("clustermap-*.whl")
    venv = root / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300
    )
    python = str(venv / "bin" / "python")
    _offline_first([*uv, "pip", "install", "--python", python, "--no-deps", str(wheel)])
    _offline_first([*uv, "pip", "install", "--python", python, "msgpack", "xxhash"])
    return venv


def _run(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        env=env,
        cwd=venv,  # not the checkout: the installed package, never the source tree
        timeout=120,
    )


def test_the_worker_install_has_only_msgpack_and_xxhash(worker_venv: Path) -> None:
    r = _run(
        worker_venv,
        "python",
        "-c",
        "import importlib.metadata as md, clustermap\n"
        "print(clustermap.__file__)\n"
        "print(sorted(d.metadata['Name'].lower() for d in md.distributions()))\n"
        "print(md.requires('clustermap'))\n",
    )
    assert r.returncode == 0, r.stderr
    where, dists, requires = r.stdout.splitlines()
    assert where.startswith(str(worker_venv)), where
    assert eval(dists) == ["clustermap", "msgpack", "xxhash"]
    base = [req for req in eval(requires) if "extra ==" not in req]
    assert sorted(req.split(">")[0] for req in base) == ["msgpack", "xxhash"]


def test_a_worker_only_install_picks_from_a_region(worker_venv: Path, region_path: Path) -> None:
    nodes = (Node("10.0.0.1", 8080), Node("10.0.0.2", 8080))
    with RegionWriter(region_path, wait=5.0) as w:
        w.publish((Service("user-svc", nodes),), (), sync_ns=time.time_ns())
    code = (
        "import sys, clustermap\n"
        f"m = clustermap.open({str(region_path)!r})\n"
        "print(sorted({m.pick('user-svc').address for _ in range(8)}))\n"
        "print(m.pick('user-svc', key='u:42').address)\n"
        "print([n for n in ('grpc', 'google.protobuf', 'pydantic') if n in sys.modules])\n"
    )
    r = _run(worker_venv, "python", "-c", code)
    assert r.returncode == 0, r.stderr
    picked, keyed, heavy = r.stdout.splitlines()
    assert picked == "['10.0.0.1:8080', '10.0.0.2:8080']"
    assert keyed in ("10.0.0.1:8080", "10.0.0.2:8080")
    assert heavy == "[]"
    # cmctl's region commands need nothing more
    r = _run(
        worker_venv, "cmctl", "--region", str(region_path), "pick", "user-svc", "--key", "u:42"
    )
    assert r.returncode == 0, r.stderr
    assert keyed in r.stdout


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["cm-server"], "server"),
        (["cm-server", "--print-config"], "server"),
        (["cm-sidecar", "--region", "/nonexistent/x.region"], "sidecar"),
        (["cmctl", "--server", "127.0.0.1:1", "register", "a", "10.0.0.1:1"], "sidecar"),
    ],
)
def test_a_command_without_its_extra_says_what_to_install(
    worker_venv: Path, argv: list[str], extra: str
) -> None:
    r = _run(worker_venv, *argv)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.strip().endswith(f"pip install 'clustermap[{extra}]'"), r.stderr
