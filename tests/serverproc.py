"""Start real lossd server processes on 127.0.0.1 for tests (never mocked gRPC)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

_LISTEN = re.compile(r"listening on [^ ]+:(\d+)")
_METRICS = re.compile(r"metrics on http://[^:]+:(\d+)")


@dataclass
class ServerProcess:
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

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60.0, metrics: bool = False) -> ServerProcess:
    """Run ``python -m lossd_server --host 127.0.0.1 --port 0 ...`` and wait until it is SERVING.

    ``metrics=True`` serves /metrics on a port the OS picks (``.metrics_port``); a ``--port`` in
    ``args`` replaces ``--port 0`` (to restart a server on the same port).
    """
    cmd = [sys.executable, "-m", "lossd_server", "--host", "127.0.0.1"]
    if not any(a.startswith("--port") for a in args):
        cmd += ["--port", "0"]
    if not any(a.startswith("--metrics-port") for a in args):
        cmd += ["--metrics-port", "-1" if metrics else "0"]
    cmd += list(args)
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    server = ServerProcess(proc)
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
            if "SERVING" in line and "NOT_SERVING" not in line:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server did not become ready:\n{server.log()}")
    if proc.poll() is not None or not server.port:
        raise RuntimeError(f"server exited early (rc={proc.returncode}):\n{server.log()}")
    return server
