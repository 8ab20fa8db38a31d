"""Health checks sent back to back from a thread while a test does something else: when each was
sent and answered, with what status, and (given the server's PID) how much CPU the server spent
while it waited, in all and by each of its threads. The event loop answers health checks, so they
show whether it was held."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.servers import ThreadUse, cpu_seconds, thread_use  # noqa: E402


@dataclass(frozen=True)
class HealthCheck:
    sent: float  # time.monotonic()
    answered: float
    status: int
    server_cpu_s: float | None  # the server's CPU seconds while it waited (None: no PID given)
    threads: dict[int, ThreadUse] | None = None  # what each server thread used meanwhile (thread id: use)

    def busiest(self, what: str) -> tuple[int, float]:
        """The server thread that used the most ``what`` (a :class:`ThreadUse` field) while this
        check waited: (its id, that amount). The event loop, and a thread holding the GIL, are each
        one thread; the process's CPU (``server_cpu_s``) also counts threads that run beside the loop
        without the GIL (torch's, gRPC core's)."""
        return max(((tid, getattr(use, what)) for tid, use in (self.threads or {}).items()), key=lambda item: item[1], default=(0, 0))


class BackgroundHealthChecks:
    """A context manager: health checks on a connection of their own, from a thread, one after
    another (``pause_s`` apart), until it exits; ``checks`` holds those made inside it."""

    def __init__(self, address: str, pid: int | None = None, pause_s: float = 0.005) -> None:
        self.pid = pid
        self.pause_s = pause_s
        self.checks: list[HealthCheck] = []
        self._channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        self._check = health_pb2_grpc.HealthStub(self._channel).Check
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            threads = None if self.pid is None else thread_use(self.pid)
            sent, cpu = time.monotonic(), None if self.pid is None else cpu_seconds(self.pid)
            status = self._check(health_pb2.HealthCheckRequest(), timeout=120).status
            answered = time.monotonic()
            waited = per_thread = None
            if self.pid is not None:
                waited, now = cpu_seconds(self.pid) - cpu, thread_use(self.pid)
                per_thread = {tid: use - threads.get(tid, ThreadUse(0.0, 0.0, 0)) for tid, use in now.items()}
            self.checks.append(HealthCheck(sent, answered, status, waited, per_thread))
            time.sleep(self.pause_s)

    def __enter__(self) -> BackgroundHealthChecks:
        self._thread.start()
        while not self.checks and self._thread.is_alive():  # connected and answered once
            time.sleep(0.01)
        self.checks.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)
        self._channel.close()

    def within(self, start: float, stop: float) -> int:
        """Health checks sent and answered between ``start`` and ``stop`` (time.monotonic())."""
        return sum(start <= c.sent and c.answered <= stop for c in self.checks)

    @property
    def waits(self) -> list[float]:
        """The server's CPU seconds while each check waited."""
        return [c.server_cpu_s for c in self.checks if c.server_cpu_s is not None]

    @property
    def statuses(self) -> set[int]:
        return {c.status for c in self.checks}
