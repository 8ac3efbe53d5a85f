"""``cmctl up``: cm-server and cm-sidecar together on this machine, in the foreground.

For a laptop or a single box: the server keeps its registry in memory, the sidecar publishes the
default region, so ``clustermap.pick`` and ``cmctl dump`` work at once with no configuration.
Ctrl-C (or SIGTERM) stops the sidecar first, leaving the region readable, then the server.

Nothing is registered and nothing is announced before both processes are confirmed to be *ours*:
the server bound the address itself (another server answering there does not count), and the
sidecar holds the region (another sidecar's map does not count). Otherwise ``up`` fails in one
line saying what to do, and the children's own logs are not shown.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from clustermap.client import default_region_path
from clustermap.defaults import DEFAULT_REGION, DEFAULT_SERVER
from clustermap.errors import ClusterMapError
from clustermap.signals import SignalQueue

__all__ = ["add_commands"]

#: Demo services: (name, options for the clusters file, nodes as (host, port, weight)).
#: Loopback addresses only: they are data for pick() to return, nothing ever connects to them.
DEMO: tuple[tuple[str, str, tuple[tuple[str, int, int], ...]], ...] = (
    ("user-svc", "", (("127.0.0.1", 8001, 1), ("127.0.0.1", 8002, 1), ("127.0.0.1", 8003, 1))),
    ("payment-svc", 'strategy = "weighted"', (("127.0.0.1", 9001, 3), ("127.0.0.1", 9002, 1))),
    (
        "session-cache",
        'strategy = "consistent_hash"',
        tuple(("127.0.0.1", 11211 + i, 1) for i in range(4)),
    ),
)

_START_TIMEOUT_S = 60.0


def add_commands(sub: Any) -> None:
    from clustermap.cli.main import server_address

    p = sub.add_parser("up", help="run cm-server and cm-sidecar locally, in the foreground")
    p.add_argument(
        "--listen",
        type=server_address,
        default=os.environ.get("CLUSTERMAP_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help=f"cm-server address (default: $CLUSTERMAP_SERVER or {DEFAULT_SERVER})",
    )
    p.add_argument("--interval", type=float, default=0.5, metavar="S", help="sidecar poll period")
    p.add_argument("--demo", action="store_true", help="register a few example services")
    p.set_defaults(run=up)


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when ``cmctl up`` dies, even by SIGKILL (the
    children run in their own sessions, so nothing else would stop them). libc is loaded here,
    before the fork, so the child only makes the call."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)

    return preexec


class _Child:
    """A child in its own session whose stderr is held back until :meth:`show` (so a failed
    start is reported in one line of ours), then passed through to our stderr."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        self.lines: list[str] = []
        self._shown = False
        self._lock = threading.Lock()
        assert self.proc.stderr is not None
        self._pump = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self._pump.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace")
            with self._lock:
                if self._shown:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                else:
                    self.lines.append(line.rstrip("\n"))

    def show(self) -> None:
        with self._lock:
            self._shown = True
            for line in self.lines:
                print(line, file=sys.stderr)

    def saw(self, text: str) -> bool:
        with self._lock:
            return any(text in line for line in self.lines)

    def check_alive(self, hint: str = "") -> None:
        """Raise the child's own last words (its one-line error) if it exited."""
        if self.proc.poll() is None:
            return
        self._pump.join(5)
        with self._lock:
            # its one-line error ("cm-sidecar: ...") if it printed one: gRPC's C core may log
            # after it while the process exits
            lines = [ln for ln in reversed(self.lines) if ln.strip()]
            prefix = f"{self.name}: "
            last = next((ln for ln in lines if ln.startswith(prefix)), lines[0] if lines else "")
        reason = last.removeprefix(prefix).strip() or f"status {self.proc.returncode}"
        raise ClusterMapError(f"{self.name} did not start: {reason}{hint}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._pump.join(5)
        if not self._pump.is_alive() and self.proc.stderr is not None:
            self.proc.stderr.close()


def up(args: argparse.Namespace) -> int:
    region = args.region or default_region_path()
    stopping = SignalQueue((signal.SIGINT, signal.SIGTERM)).install()
    with tempfile.TemporaryDirectory(prefix="cmctl-up-") as tmp:
        server_cmd = [_bin("cm-server"), "--listen", args.listen, "--warmup", "0.1"]
        if args.demo:
            clusters = Path(tmp) / "demo-clusters.toml"
            clusters.write_text(
                "".join(f"[clusters.{name}]\n{opts}\n" for name, opts, _ in DEMO if opts)
            )
            server_cmd += ["--clusters", str(clusters)]
        server = _Child("cm-server", server_cmd)
        sidecar: _Child | None = None
        try:
            epoch = _await_server(args.listen, server, stopping)
            sidecar = _Child(
                "cm-sidecar",
                [
                    _bin("cm-sidecar"),
                    *("--server", args.listen, "--region", region),
                    *("--interval", str(args.interval)),
                ],
            )
            _await_writer(region, sidecar, stopping)
            revision = _register_demo(args.listen) if args.demo else 0
            _await_region(region, sidecar, epoch, revision, stopping)
            if stopping:
                return 0
            server.show()
            sidecar.show()
            print(_banner(args.listen, region), flush=True)
            while not stopping:
                for child in (server, sidecar):
                    if child.proc.poll() is not None:
                        raise ClusterMapError(
                            f"{child.name} exited with status {child.proc.returncode}"
                        )
                stopping.wait(0.2)
            return 0
        finally:
            if sidecar is not None:  # the sidecar first: the region stays readable
                sidecar.stop()
            server.stop()


def _banner(listen: str, region: str) -> str:
    """What to try next, as commands that work when pasted into a new shell."""
    uv = os.environ.get("UV")
    if uv:  # started by `uv run`: the same, from this directory
        run = "uv run " if shutil.which("uv") else f"{shlex.quote(uv)} run "
        cmctl, python = f"{run}cmctl", f"{run}python"
    else:
        cmctl, python = shlex.quote(_bin("cmctl")), shlex.quote(sys.executable)
    env = "" if region == DEFAULT_REGION else f"CLUSTERMAP_REGION={shlex.quote(region)} "
    pick = 'import clustermap; print(clustermap.pick("user-svc").address)'
    where = " (from this directory)" if uv else ""
    return (
        f"cmctl up: cm-server on {listen}, cm-sidecar publishing {region}\n"
        f"  try, in another shell{where}:\n"
        f"    {env}{cmctl} dump\n"
        f"    {env}{python} -c '{pick}'\n"
        "  Ctrl-C stops both."
    )


def _await_server(address: str, server: _Child, stopping: SignalQueue) -> str:
    """Until *our* server listens (it logged so: it bound the port itself) and answers; its
    epoch, to recognise its map in the region."""
    import grpc

    from clustermap._pb.clustermap.v1 import inspection_pb2, inspection_pb2_grpc

    hint = ""
    deadline = time.monotonic() + _START_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        inspection = inspection_pb2_grpc.InspectionStub(channel)
        while not stopping:
            if server.saw("in use"):
                hint = "; stop what listens there, or pass another --listen HOST:PORT"
            server.check_alive(hint)
            if server.saw("listening"):
                try:
                    status = inspection.GetStatus(inspection_pb2.GetStatusRequest(), timeout=2)
                    return str(status.epoch)
                except grpc.RpcError:
                    pass
            if time.monotonic() > deadline:
                raise ClusterMapError(f"cm-server did not start serving on {address}")
            stopping.wait(0.05)
    return ""


def _await_writer(region: str, sidecar: _Child, stopping: SignalQueue) -> None:
    """Until our sidecar holds the region (its pid is the region's writer)."""
    from clustermap.region.reader import RegionReader

    deadline = time.monotonic() + _START_TIMEOUT_S
    while not stopping:
        hint = ""
        if sidecar.saw("another writer"):
            hint = "; stop that sidecar, or pass another --region PATH"
        sidecar.check_alive(hint)
        try:
            if RegionReader(region).writer_pid == sidecar.proc.pid:
                return
        except ClusterMapError:
            pass
        if time.monotonic() > deadline:
            raise ClusterMapError(f"cm-sidecar did not open {region}")
        stopping.wait(0.05)


def _register_demo(address: str) -> int:
    """Register the demo nodes; the server's revision after the last one."""
    import grpc

    from clustermap._pb.clustermap.v1 import registry_pb2, registry_pb2_grpc

    revision = 0
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        for name, _, nodes in DEMO:
            for host, port, weight in nodes:
                try:
                    resp = stub.Register(
                        registry_pb2.RegisterRequest(
                            service=name,
                            host=host,
                            port=port,
                            weight=weight,
                            meta={"demo": "1"},
                            ttl_seconds=0,  # permanent: no lease to keep alive
                        ),
                        timeout=10,
                    )
                except grpc.RpcError as exc:
                    raise ClusterMapError(
                        f"registering the demo failed: {exc.code().name}"
                    ) from None
                revision = max(revision, resp.revision)
    return revision


def _await_region(
    region: str, sidecar: _Child, epoch: str, revision: int, stopping: SignalQueue
) -> None:
    """Until our sidecar has published our server's map (at ``revision`` or later)."""
    from clustermap.region.reader import RegionReader

    deadline = time.monotonic() + _START_TIMEOUT_S
    while not stopping:
        sidecar.check_alive()
        try:
            reader = RegionReader(region)
            meta = reader.meta()
            if (
                reader.writer_pid == sidecar.proc.pid
                and reader.last_sync_ns
                and meta.epoch == epoch
                and meta.revision >= revision
                and not meta.stale
            ):
                return
        except ClusterMapError:
            pass
        if time.monotonic() > deadline:
            raise ClusterMapError(f"cm-sidecar did not publish the map into {region}")
        stopping.wait(0.05)
