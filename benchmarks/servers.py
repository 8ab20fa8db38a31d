"""Launch benchmark servers as subprocesses; read their RSS and lossd's /metrics."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

_LISTEN = re.compile(r"listening on [^ ]+:(\d+)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int = 0
    metrics_port: int | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def status_kib(self, key: str) -> int:
        """A /proc/<pid>/status field in KiB (VmHWM: peak RSS, VmRSS: current RSS)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def peak_rss_mib(self) -> float:
        return self.status_kib("VmHWM") / 1024

    def rss_mib(self) -> float:
        return self.status_kib("VmRSS") / 1024

    def metrics(self) -> dict[str, float]:
        if not self.metrics_port:
            return {}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            m = re.match(r"^(lossd_[a-z_]+(?:\{[^}]*\})?) ([0-9.eE+-]+|NaN)$", line)
            if m:
                values[m.group(1)] = float(m.group(2))
        return values

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _launch(name: str, cmd: list[str], metrics_port: int | None, timeout_s: float = 90.0) -> Server:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    server = Server(name, proc, metrics_port=metrics_port)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line)
            m = _LISTEN.search(line)
            if m:
                server.port = int(m.group(1))
            if "SERVING" in line and "NOT_SERVING" not in line:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{name} did not become ready:\n{''.join(server.lines)}")
    if proc.poll() is not None or not server.port:
        raise RuntimeError(f"{name} exited early:\n{''.join(server.lines)}")
    return server


def start_lossd(*flags: str, device: str = "cpu", name: str = "lossd") -> Server:
    """``python -m lossd_server`` on an OS-picked port, with /metrics on a free port."""
    mport = free_port()
    cmd = [sys.executable, "-m", "lossd_server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(mport), "--device", device, *flags]
    return _launch(name, cmd, mport)


def start_naive(device: str = "cpu") -> Server:
    cmd = [sys.executable, "-m", "benchmarks.naive_server", "--port", "0", "--device", device]
    return _launch("naive", cmd, None)
