"""Launch benchmark servers as subprocesses; read their RSS, their CPU time and lossd's /metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import NamedTuple

from lossd_server.spawn import ServerProcess, spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat, in seconds (resolution 1/CLK_TCK)."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class ThreadUse(NamedTuple):
    """What one thread has used: user-mode and kernel CPU seconds, minor page faults."""

    user_s: float
    system_s: float
    minor_faults: int

    def __sub__(self, earlier: ThreadUse) -> ThreadUse:  # type: ignore[override]
        return ThreadUse(self.user_s - earlier.user_s, self.system_s - earlier.system_s, self.minor_faults - earlier.minor_faults)


def thread_use(pid: int | str) -> dict[int, ThreadUse]:
    """Each thread of a process (thread id: its use so far) from /proc/PID/task/TID/stat; the
    main thread's id is the PID. A thread that ends while it is read is left out."""
    use = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        except (FileNotFoundError, ProcessLookupError):
            continue
        use[int(tid)] = ThreadUse(int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS, int(fields[7]))
    return use


def _stat_fields(path: str) -> list[str]:
    """The fields of a /proc stat file after "pid (comm)": [0] is field 3 (state), [7] minflt, [11] utime, [12] stime."""
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(ServerProcess):
    """A benchmark server process: lossd_server.spawn's ServerProcess plus RSS readers."""

    name: str = "server"

    def peak_rss_mib(self) -> float:
        return self.status_kib("VmHWM") / 1024

    def rss_mib(self) -> float:
        return self.status_kib("VmRSS") / 1024

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far (user + system, every thread)."""
        return cpu_seconds(self.proc.pid)


def _launch(name: str, cmd: list[str], metrics_port: int | None, timeout_s: float = 90.0) -> Server:
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def make(proc: subprocess.Popen) -> Server:
        server = Server(proc, metrics_port=metrics_port)
        server.name = name
        return server

    return spawn(cmd, env=env, cwd=ROOT, timeout_s=timeout_s, make=make)


def start_lossd(*flags: str, device: str = "cpu", name: str = "lossd") -> Server:
    """``python -m lossd_server`` on an OS-picked port, with /metrics on a free port."""
    mport = free_port()
    cmd = [sys.executable, "-m", "lossd_server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(mport), "--device", device, *flags]
    return _launch(name, cmd, mport)


def start_naive(device: str = "cpu") -> Server:
    cmd = [sys.executable, "-m", "benchmarks.naive_server", "--port", "0", "--device", device]
    return _launch("naive", cmd, None)


def start_floor() -> Server:
    """benchmarks.floor_server: receives the bytes, answers an empty message (the transport floor)."""
    cmd = [sys.executable, "-m", "benchmarks.floor_server", "--port", "0"]
    return _launch("floor", cmd, None)
