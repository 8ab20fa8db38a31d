"""Start real lossd server processes on 127.0.0.1 for tests (never mocked gRPC)."""

from __future__ import annotations

import sys

from lossd_server.spawn import ServerProcess, spawn

__all__ = ["ServerProcess", "start_server"]


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
    return spawn(cmd, env=env, timeout_s=timeout_s)
