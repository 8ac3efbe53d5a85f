"""The shell blocks of README.md and docs/quickstart.md, run as a reader runs them, so the docs
cannot drift from the code.

Each ```sh block is taken line by line, in document order, with a few substitutions that only
keep the run off shared resources: a fresh region directory instead of ``/dev/shm/clustermap/``
and free ports instead of 7700 (cm-server) and 8000 (the example app), passed the ways the docs
themselves name (``CLUSTERMAP_SERVER``, ``BIND``, a uWSGI option, ``--listen``). ``curl`` gets
``-fsS`` so that an error answer fails the run. Commands that run in the foreground until Ctrl-C
(``./scripts/start``, gunicorn, uWSGI) are started in the background and awaited until they
serve, as a reader waits before opening the next shell; a line ending in ``&`` likewise. A
``<!-- docs-test: stop ... -->`` comment stops everything started so far (where the text says to
stop it). Blocks in :data:`SKIP` are not run, for the reason given there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import ROOT, Child, wait_for
from tests.support.stack import free_port

DOCS = ("README.md", "docs/quickstart.md")

#: Commands not run here, and why.
SKIP = {
    "./scripts/test": "runs this whole suite (lint, types, every test) itself",
    "uv run --group bench python bench/run.py": "the benchmarks take minutes and want an idle "
    "machine; bench/ is run on its own",
}
#: Commands that run until stopped: started in the background, awaited until they serve.
FOREGROUND = ("./scripts/start", "uv run gunicorn", "uv run uwsgi")
STOP_MARK = "<!-- docs-test: stop"

_TOKEN = re.compile(r"```sh\n(.*?)```|(<!-- docs-test: stop[^>]*-->)", re.S)


def steps(markdown: str) -> list[str]:
    """Command lines and stop marks, in document order."""
    out: list[str] = []
    for block, mark in _TOKEN.findall(markdown):
        if mark:
            out.append(STOP_MARK)
            continue
        for line in block.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(line.strip())
    return out


def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for kid in kids.get(todo.pop(), []):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return found


class Reader:
    """Runs one document's commands with its own region directory and ports."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.server = f"127.0.0.1:{free_port()}"
        self.app = f"127.0.0.1:{free_port()}"
        self.env = {
            **os.environ,
            "CLUSTERMAP_REGION": f"{tmp}/default.region",
            "CLUSTERMAP_SERVER": self.server,
            "BIND": self.app,  # client/gunicorn.conf.py
            "UWSGI_HTTP_SOCKET": self.app,  # = --http-socket, which client/uwsgi.ini honours
        }
        for var in ("PYTHONPATH", "VIRTUAL_ENV", "UV_RUN_RECURSION_DEPTH"):
            self.env.pop(var, None)  # a reader's shell has none of the test runner's
        self.background: list[Child] = []
        self.outputs: list[tuple[str, str]] = []

    def rewrite(self, line: str) -> str:
        line = line.replace("/dev/shm/clustermap/", f"{self.tmp}/")
        line = line.replace("127.0.0.1:7700", self.server).replace("127.0.0.1:8000", self.app)
        if line.startswith("curl "):
            line = "curl -fsS " + line[len("curl ") :]
        if re.search(r"\bcm-server\b", line) and "--listen" not in line:
            line = re.sub(r"\bcm-server\b", f"cm-server --listen {self.server}", line, count=1)
        return line

    def run(self, step: str) -> None:
        if step == STOP_MARK:
            self.stop()
            return
        line = self.rewrite(step)
        export = re.fullmatch(r"export (\w+)=(\S+)(\s+#.*)?", line)
        if export:
            self.env[export.group(1)] = export.group(2)
            return
        if line.startswith(FOREGROUND):
            self.start(line)
            return
        if re.search(r"&(\s+#.*)?$", line):
            self.start(line)
            return
        r = subprocess.run(
            ["bash", "-c", line],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, f"{step!r} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        self.outputs.append((step, r.stdout))

    def start(self, line: str) -> None:
        child = Child(["bash", "-c", line.rstrip()], env=self.env)
        self.background.append(child)

        def alive() -> None:
            if child.proc.poll() is not None:
                raise AssertionError(f"{line!r} exited ({child.proc.returncode}): {child.stderr()}")

        if line.startswith("./scripts/start"):
            child.expect("cmctl up:", timeout=300)
        elif "cm-server" in line:  # `... &`: bash returns at once, the server runs on
            wait_for(lambda: _listening(self.server), 120, f"{line!r} to listen")
        else:  # a web server: until the example app answers from a synced map
            wait_for(lambda: alive() or _answers(self.app), 120, f"{line!r} to serve")

    def stop(self) -> None:
        """Ctrl-C, as the text says; then whatever is left of each process tree."""
        for child in self.background:
            tree = _descendants(child.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGINT if _is_up(child) else signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(60)
            for pid in [child.pid, *tree]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            child.close()
        self.background.clear()


def _is_up(child: Child) -> bool:
    return "./scripts/start" in " ".join(child.argv)


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=2):
        return True
    return False


def _answers(address: str) -> bool:
    url = f"http://{address}/?service=user-svc"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def reader() -> Iterator[Reader]:
    if shutil.which("uv") is None or shutil.which("curl") is None:
        pytest.skip("the docs' commands need uv and curl on PATH")
    tmp = Path(tempfile.mkdtemp(prefix="cm-docs-", dir="/dev/shm"))
    r = Reader(tmp)
    try:
        yield r
    finally:
        r.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("doc", DOCS)
def test_every_shell_block_runs_as_written(doc: str, reader: Reader) -> None:
    ran = 0
    for step in steps((ROOT / doc).read_text()):
        if any(step.startswith(prefix) for prefix in SKIP):
            continue
        reader.run(step)
        ran += 1
    assert ran >= 5, f"{doc}: only {ran} commands ran; did the blocks move?"
    if doc == "docs/quickstart.md":
        # §3 serves its own server's map, not §1's demo map held back by protection
        last = json.loads(reader.outputs[-1][1])
        assert set(last["nodes"]) == {"127.0.0.1:8001", "127.0.0.1:8002"}, last


def test_skipped_commands_are_still_in_the_docs() -> None:
    """The skip list names commands the docs really show (so it cannot hide a typo)."""
    shown = [s for doc in DOCS for s in steps((ROOT / doc).read_text())]
    for prefix in SKIP:
        assert any(s.startswith(prefix) for s in shown), prefix


def test_the_quick_benchmark_time_is_written_the_same_everywhere() -> None:
    texts = {
        "README.md": (ROOT / "README.md").read_text(),
        "docs/performance.md": (ROOT / "docs/performance.md").read_text(),
        "bench/run.py": (ROOT / "bench/run.py").read_text(),
    }
    for name, text in texts.items():
        times = set(re.findall(r"quick\W[^\n]*?about (\d+) minutes", text, re.S))
        assert times == {"2"}, (name, times)


def test_removed_entry_points_are_not_documented() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "python -m clustermap.cli.admin" not in doc.read_text(), doc
