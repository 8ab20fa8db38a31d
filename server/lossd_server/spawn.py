"""Run a lossd server as a child process and wait until it serves.

For the tests, the benchmarks and the examples (the server itself never uses it): the child's
log is read for the bound port ("listening on HOST:PORT"), the metrics port and the SERVING
line, so a server on ``--port 0`` can be used as soon as it is ready.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

_LISTEN = re.compile(r"listening on [^ ]+:(\d+)")
_METRICS = re.compile(r"metrics on http://[^:]+:(\d+)")
_WORKER = re.compile(r"worker (\d+) started \(pid (\d+)\)")
_SAMPLE = re.compile(r"^(lossd_[a-z_]+(?:\{[^}]*\})?) ([0-9.eE+-]+|NaN)$")


def worker_pids(log: str) -> dict[int, int]:
    """``--workers N``: worker index -> pid of the latest worker started in that slot, from the
    supervisor's log (``worker 1 started (pid 123)``); {} for a single-process server."""
    return {int(index): int(pid) for index, pid in _WORKER.findall(log)}


@dataclass
class ServerProcess:
    """A child server process and what its log said."""

    proc: subprocess.Popen
    port: int = 0
    metrics_port: int | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return "".join(self.lines)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def worker_pids(self) -> dict[int, int]:
        """``--workers N``: worker index -> pid of its latest worker (see :func:`worker_pids`)."""
        return worker_pids(self.log())

    def status_kib(self, key: str) -> int:
        """A /proc/<pid>/status field in KiB (VmHWM: peak RSS, VmRSS: current RSS)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def metrics(self) -> dict[str, float]:
        """The server's lossd_* samples from /metrics ({} when it serves no metrics)."""
        if not self.metrics_port:
            return {}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {m.group(1): float(m.group(2)) for m in map(_SAMPLE.match, text.splitlines()) if m}

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait (then SIGKILL); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


P = TypeVar("P", bound=ServerProcess)


def _serving(line: str) -> bool:
    return "SERVING" in line and "NOT_SERVING" not in line


def spawn(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout_s: float = 60.0,
    make: Callable[[subprocess.Popen], P] = ServerProcess,
    ready_when: Callable[[str], bool] | None = None,
) -> P:
    """Start ``cmd`` and return once its log says SERVING (raises with the log otherwise).

    ``ready_when``: a log line that means ready instead (e.g. listening, for a server whose
    warm-up the caller holds back). No ``preexec_fn``: Popen then forks this process (instead of
    vfork), which runs gRPC's fork handlers; they restart gRPC's poller threads in the child, whose
    epoll descriptor Popen then closes before exec, and the child aborts ("Epoll1Poller ...
    epoll_wait error: Bad file descriptor"): 2-4 of 300 starts from a process with a gRPC channel.
    A child that needs other resource limits sets them itself."""
    is_ready = ready_when or _serving
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=cwd)
    server = make(proc)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line)
            m = _LISTEN.search(line)
            if m:
                server.port = int(m.group(1))
            m = _METRICS.search(line)
            if m:
                server.metrics_port = int(m.group(1))
            if is_ready(line):
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{cmd[0]} did not become ready:\n{server.log()}")
    if proc.poll() is not None or not server.port:
        raise RuntimeError(f"server exited early (rc={proc.returncode}):\n{server.log()}")
    return server
