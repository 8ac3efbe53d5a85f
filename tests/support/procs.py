"""Real child processes for tests: own session, killed as a group on teardown, awaited by
condition (a line on stdout, a file state), never by fixed sleeps."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]


def python_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Child:
    """A subprocess in its own session, with line-oriented stdout."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        # stderr goes to a file: a pipe nobody drains fills up (64 KiB of logs) and then blocks
        # the child inside a log call, which looks exactly like a deadlock.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env or python_env(),
            start_new_session=True,
            text=True,
        )
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.lines: list[str] = []
        self._buf = ""

    @classmethod
    def python(cls, *args: str, env: dict[str, str] | None = None) -> Child:
        return cls([sys.executable, *args], env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float = 30.0) -> str:
        """The next stdout line; fails the test on timeout or EOF, showing stderr.

        Reads the pipe itself (no buffered file object): lines written together must not sit in
        a buffer that select() cannot see."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while "\n" not in self._buf:
            if not self._sel.select(max(deadline - time.monotonic(), 0)):
                raise AssertionError(f"no output from {self.argv} within {timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"{self.argv} exited ({self.proc.wait()}): {self.stderr()}")
            self._buf += chunk.decode(errors="replace")
        line, self._buf = self._buf.split("\n", 1)
        self.lines.append(line)
        return line

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(deadline - time.monotonic(), 0.01))
            if line.startswith(prefix):
                return line

    def stderr(self) -> str:
        """The tail of what the child wrote to stderr so far (kept after close)."""
        if self._log.closed:
            return self._stderr_tail
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def kill(self, sig: int = signal.SIGKILL) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        return self.wait()

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        self.close()
        return rc

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._sel.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self._log.closed:
            self._stderr_tail = self.stderr()
            self._log.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
