"""`paramcast serve` as a child process, and any child that announces its address on a line.

    with ServeProcess(["--model", "runs/ml-100k", "--threads", "1"]) as server:
        client = ParamClient(server.target)        # HOST:PORT from its readiness line

The one launcher the integration tests, the network-mode simulation and the service benchmark
use. The child's output is drained in a background thread from the start (a server must never
block on a full pipe) and kept - its first lines and its latest ones - for error messages and
tests. `stop()` sends SIGTERM (the server drains in-flight calls) and waits, killing it only if
it does not exit in time; `kill()` is SIGKILL, a crash.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from paramcast.common.errors import ParamCastError

READY_LINE = "paramcast serve ready on "  # what `paramcast serve` prints once it listens
METRICS_LINE = "paramcast serve metrics on "


class ChildProcess:
    """A child process that prints `<ready>HOST:PORT` once it is up; `address` and `port` come from it."""

    HEAD_LINES, TAIL_LINES = 200, 2000  # output kept: the start-up and the latest lines

    def __init__(self, cmd: list[str], ready: str, timeout_s: float = 180.0, cwd: str | Path | None = None):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=cwd)
        self.head: list[str] = []
        self.tail: deque[str] = deque(maxlen=self.TAIL_LINES)
        self._ready = ready
        self._announced: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="child-output", daemon=True)
        self._reader.start()
        try:
            line = self._announced.get(timeout=timeout_s)
        except queue.Empty:
            line = ""
        if not line:
            self.kill()
            raise ParamCastError(f"{' '.join(cmd[:5])} did not become ready within {timeout_s:.0f} s:\n"
                                 + "".join(list(self.tail)[-30:]))
        self.address = line[len(ready):].strip()
        self.port = int(self.address.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            (self.head if len(self.head) < self.HEAD_LINES else self.tail).append(line)
            if line.startswith(self._ready):
                self._announced.put(line)
        self._announced.put("")  # EOF: the process ended

    @property
    def output(self) -> str:
        return "".join(self.head) + "".join(self.tail)

    def line_value(self, prefix: str) -> str | None:
        """What follows `prefix` on the first output line that starts with it."""
        for line in [*self.head, *self.tail]:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        return None

    def rss_bytes(self) -> int:
        """The child's resident memory now (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (a graceful drain) and wait for the exit code; SIGKILL if it takes too long."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: the child vanishes mid-run, as in a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServeProcess(ChildProcess):
    """`paramcast serve ARGS` (its default `--port 0` lets the OS pick a free port)."""

    def __init__(self, args: list[str], timeout_s: float = 180.0, cwd: str | Path | None = None):
        super().__init__([sys.executable, "-m", "paramcast.cli", "serve", *args], READY_LINE, timeout_s, cwd)

    @property
    def target(self) -> str:
        return self.address

    @property
    def metrics_port(self) -> int | None:
        value = self.line_value(METRICS_LINE)
        return None if value is None else int(value.rsplit(":", 1)[1])
