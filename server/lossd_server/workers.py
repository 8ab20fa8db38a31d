"""Worker processes on one port (``--workers N``): a supervisor and the workers it starts.

One Python process serves calls on about one core (the event loop, protobuf decoding and gRPC's
receive path hold the GIL). With ``--workers N`` the process started by ``lossd-server`` becomes a
supervisor and starts N worker processes that serve the same port with ``SO_REUSEPORT``: the
kernel spreads incoming *connections* over their listening sockets. Each worker is a complete
lossd server (:func:`lossd_server.app.listen`) with its own event loop, batcher, engine and a
memory budget of ``memory_budget_bytes // N`` (:meth:`ServerConfig.per_worker`).

The supervisor never imports grpc or torch: it checks the port and holds it
(:class:`~lossd_server.ports.PortReservation`, bound, never listening), serves the aggregated
``/metrics`` (prometheus-client's multiprocess mode over a directory it creates at start and
removes at exit, on the bounded listener of :mod:`lossd_server.metrics_http`), starts the workers
with the ``spawn`` method (fresh interpreters: no gRPC or CUDA state is ever inherited through a
fork) and talks to each over a pipe:

- a worker reports ``listening`` (port, device, build labels), ``warm`` (its warm-up evaluation
  ran), ``error`` (it could not start) or ``leaving`` (it got a stop signal of its own);
- the supervisor sends ``serving`` (True only while every worker is warm and nobody stops), ``stop``
  (start the drain), ``hurry`` (skip what is left of it) and ``ping``, which the worker's event
  loop answers with ``pong``.

A health check lands on whichever worker holds its connection, so every worker answers with the
supervisor's decision: SERVING only when all N are warm, NOT_SERVING while one is being replaced
and from the first SIGTERM on. SIGTERM/SIGINT/SIGHUP (:mod:`lossd_server.stopsignals`) to the
supervisor relays ``stop`` to every worker, which drains exactly as one process does
(:meth:`~lossd_server.app.LossServer.wait_and_shutdown`); a second signal relays ``hurry``. A signal to the whole process group also reaches each worker
directly: a worker counts its own signals and the supervisor's orders apart and follows the
furthest (:class:`~lossd_server.app.StopSignal`), so the two copies of one stop drain once and a
second group signal hurries once. The supervisor exits 0 once every worker has. A worker that
gets a stop signal of its own (``kill -TERM <worker pid>``; not relayed) tells the supervisor
(``leaving``), which takes it out of its slot and starts a new worker there after
:data:`LEAVING_REPLACE_DELAY_S`, while it drains. A worker that exits on its own is logged and replaced (at once when it had run for :data:`STABLE_S`, else after
a backoff); its connections break, so its calls in flight end UNAVAILABLE, which the client
retries. A new worker that cannot be started (the supervisor is out of file descriptors, memory or
processes) is logged and tried again after the same backoff: the supervisor carries on, NOT_SERVING
until its slot is filled and warm. A worker whose supervisor is gone (its pipe closes) drains and exits.

A worker that hangs is replaced too (:class:`Liveness`). Its process does not exit, so nothing
above notices it, while the kernel keeps handing it new connections whose callers then wait for
their deadline or for ever. The supervisor pings every listening worker four times per
``--worker-stall-timeout-s``; the worker's event loop answers (the pipe is read by the loop, not
by a thread, since a stuck loop is what makes callers hang; engine threads computing do not hold
it). A worker that has sent nothing for ``--worker-stall-timeout-s`` (a deadlock, SIGSTOP) is
logged, killed with SIGKILL (a stopped process ignores SIGTERM), health turns NOT_SERVING, and the
exit takes the path above: replaced, counted in ``lossd_worker_restarts_total``. Not while
stopping: a draining worker is bounded by the stop deadline instead.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from typing import Any

from . import multiproc_dir, stopsignals
from .config import ServerConfig
from .ports import PortReservation, StartupError, metrics_port_error
from .stopsignals import stop_signals

log = logging.getLogger("lossd")

#: prometheus-client's multiprocess directory, read by each worker when it imports prometheus_client.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: A worker that ran this long before it exited is replaced at once ...
STABLE_S = 10.0
#: ... one that exited sooner after this many seconds, doubling with each quick exit ...
RESTART_BACKOFF_S = 1.0
#: ... up to this many.
MAX_RESTART_BACKOFF_S = 30.0
#: After SIGTERM a worker gets drain_s + grace_s plus this margin to exit before it is killed.
STOP_MARGIN_S = 15.0
#: A worker that got a stop signal of its own is replaced this many seconds later: a signal to the
#: whole process group reaches the supervisor too, and its stop, relayed within this delay, cancels
#: the replacement.
LEAVING_REPLACE_DELAY_S = 0.5


# --------------------------------------------------------------------------- the supervisor's side
@dataclass
class Worker:
    """One worker process as the supervisor sees it."""

    index: int
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection | None
    started: float
    listening: bool = False
    warm: bool = False
    #: When the supervisor last heard from it (any message; its start until then; monotonic): see Liveness.
    last_sign: float = 0.0
    #: Killed for not answering (its exit, which follows, replaces it as any exit does).
    stalled: bool = False
    #: It got a stop signal of its own (not the supervisor's): it drains and finishes its calls out
    #: of its slot (:attr:`Supervisor.leaving`) while a new worker takes the slot.
    leaving: bool = False
    #: Killed if still running then (monotonic): set when it stops, by a signal or as ``leaving``.
    gone_by: float | None = None

    def __post_init__(self) -> None:
        self.last_sign = self.last_sign or self.started

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, order: tuple) -> None:
        """An order over the pipe; a worker that is gone is noticed through its sentinel instead."""
        if self.conn is not None:
            try:
                self.conn.send(order)
            except OSError:
                pass


def describe_exit(code: int | None) -> str:
    """``exit status 3`` / ``signal SIGKILL``: how a process ended, for the log."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def restart_delay(ran_s: float, quick_exits: int) -> float:
    """Seconds before a worker that exited after ``ran_s`` is replaced (``quick_exits`` in a row before it)."""
    if ran_s >= STABLE_S:
        return 0.0
    return min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2**quick_exits)


class Restarts:
    """When each worker slot whose process exited gets a new one (and how many were replaced)."""

    def __init__(self) -> None:
        self.due: dict[int, float] = {}
        self.quick_exits: dict[int, int] = {}
        self.count = 0

    def schedule(self, index: int, ran_s: float) -> float:
        """The worker of slot ``index`` exited after ``ran_s``: its replacement's delay in seconds."""
        quick = self.quick_exits.get(index, 0) if ran_s < STABLE_S else 0
        delay = restart_delay(ran_s, quick)
        self.quick_exits[index] = quick + 1 if ran_s < STABLE_S else 0
        self.due[index] = time.monotonic() + delay
        return delay

    def take_due(self) -> list[int]:
        """The slots whose replacement is due now (counted as restarts)."""
        now = time.monotonic()
        ready = sorted(index for index, when in self.due.items() if when <= now)
        for index in ready:
            del self.due[index]
        self.count += len(ready)
        return ready

    def start_due(self, spawn: Callable[[int], None]) -> None:
        """Start the replacements due now with ``spawn(index)``. One whose process cannot be started
        (an OSError: out of file descriptors, memory or processes) is no restart: it is logged and
        tried again after the backoff of a quick exit, its slot empty (health NOT_SERVING) meanwhile."""
        for index in self.take_due():
            try:
                spawn(index)
            except OSError as exc:
                self.count -= 1
                delay = self.schedule(index, 0.0)
                log.error("could not start a new worker %d (%s): trying again in %.0fs; NOT_SERVING until it is warm", index, exc, delay)


#: A starting worker (not listening yet) may stay silent this many times --worker-stall-timeout-s.
STARTING_FACTOR = 4


class Liveness:
    """When to ping the workers and which ones stalled (``timeout_s`` without a word; 0: never).

    A ping goes out every ``timeout_s / 4``, so a worker is judged on several pings it left
    unanswered. A supervisor that did not itself run for ``timeout_s / 2`` (the whole process group
    stopped by Ctrl-Z, a paused VM) measured nothing in that time: every worker's clock restarts
    instead of every worker being killed on resume.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.interval_s = timeout_s / 4
        now = time.monotonic()
        self.next_ping = now
        self.last_turn = now

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def limit_s(self, worker: Worker) -> float:
        """How long ``worker`` may stay silent: ``timeout_s``; STARTING_FACTOR times that until it
        reports listening (a new interpreter imports torch first; one stopped then was never
        noticed, and health stayed NOT_SERVING for good)."""
        return self.timeout_s if worker.listening else STARTING_FACTOR * self.timeout_s

    def next_turn(self, workers: list[Worker]) -> float:
        """When the supervisor must look again: the next ping, or a worker's silence reaching its limit."""
        return min([self.next_ping, *(w.last_sign + self.limit_s(w) for w in workers if not w.stalled)])

    def check(self, workers: list[Worker], now: float) -> list[Worker]:
        """The workers silent for their :meth:`limit_s` (to be killed); call it on every turn."""
        away = now - self.last_turn > self.timeout_s / 2
        self.last_turn = now
        if not self.enabled:
            return []
        watched = [w for w in workers if not w.stalled]
        if away:
            for worker in watched:
                worker.last_sign = now
            return []
        return [w for w in watched if now - w.last_sign >= self.limit_s(w)]

    def ping_due(self, now: float) -> bool:
        """Whether to ping the workers now (then the next ping is scheduled)."""
        if not self.enabled or now < self.next_ping:
            return False
        self.next_ping = now + self.interval_s
        return True

    def kill_stalled(self, workers: Iterable[Worker], now: float, *, stopping: bool) -> bool:
        """Kill the workers silent for ``timeout_s`` (their exits replace them: marked ``stalled``
        and not warm); whether any was. None while ``stopping``: a draining worker is bounded by
        the stop deadline instead."""
        stalled = self.check(list(workers), now)
        if stopping:
            return False
        for worker in stalled:
            log.error(
                "worker %d (pid %d) has not %s for %.1fs (--worker-stall-timeout-s %g): its event loop is stuck or "
                "the process is stopped; killing it (SIGKILL) to replace it",
                worker.index,
                worker.pid,
                "answered" if worker.listening else "reported listening",
                now - worker.last_sign,
                self.timeout_s,
            )
            worker.stalled = True
            worker.warm = False
            worker.process.kill()
        return bool(stalled)

    def ping(self, workers: Iterable[Worker], now: float) -> None:
        """Ping the listening workers when a ping is due."""
        if self.ping_due(now):
            for worker in workers:
                if worker.listening and not worker.stalled:
                    worker.send(("ping",))


class AggregateMetrics:
    """The supervisor's ``/metrics``: every worker's multiprocess files and the supervisor's figures.

    The directory is created fresh (:mod:`lossd_server.multiproc_dir`), exported to the workers as
    ``PROMETHEUS_MULTIPROC_DIR`` before the first one starts, and removed by :meth:`close`.
    """

    def __init__(self, config: ServerConfig, supervisor: Supervisor) -> None:
        from prometheus_client import CollectorRegistry

        from . import metrics_http
        from .metrics_files import FoldingCollector

        self.directory = multiproc_dir.create()
        registry = CollectorRegistry(auto_describe=True)
        self.files = FoldingCollector(self.directory)
        registry.register(self.files)
        registry.register(SupervisorCollector(supervisor))
        try:
            self.httpd = metrics_http.serve(config.metrics_host, max(config.metrics_port, 0), registry)
        except OSError as exc:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise metrics_port_error(config.metrics_host, config.metrics_port, exc) from None
        os.environ[MULTIPROC_ENV] = self.directory
        self.port = int(self.httpd.server_address[1])

    def process_dead(self, pid: int) -> None:
        """Drop a dead worker's live gauges and fold its counters and histograms into the archives,
        where they keep counting in the sums (:mod:`lossd_server.metrics_files`)."""
        self.files.process_dead(pid)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)
        if os.environ.get(MULTIPROC_ENV) == self.directory:
            del os.environ[MULTIPROC_ENV]


class SupervisorCollector:
    """``lossd_workers``, ``lossd_workers_ready``, ``lossd_worker_restarts_total`` and ``lossd_build_info``."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        sup = self.supervisor
        yield GaugeMetricFamily("lossd_workers", "worker processes configured (--workers)", value=sup.config.workers)
        yield GaugeMetricFamily("lossd_workers_ready", "worker processes that finished their warm-up", value=sup.ready_count)
        yield CounterMetricFamily("lossd_worker_restarts", "worker processes started to replace one that exited", value=sup.restarts.count)
        if sup.build:
            yield InfoMetricFamily("lossd_build", "lossd build: version, torch version, device", value=sup.build)


WorkerTarget = Callable[[int, ServerConfig, Connection], None]


class SignalInbox:
    """The supervisor's stop signals: counted by the handler (:meth:`__call__`), which wakes the
    loop's wait on :attr:`wake` with a byte; the loop takes the new ones with :meth:`take`."""

    def __init__(self) -> None:
        self.received = 0
        self.taken = 0
        self.wake, self._waker = socket.socketpair()
        self._waker.setblocking(False)

    def __call__(self, signum: int, frame: object = None) -> None:
        self.received += 1
        try:
            self._waker.send(b"\0")
        except OSError:
            pass

    def take(self) -> list[int]:
        """The ordinals (1 for the first signal ever) of the signals not taken yet."""
        new = list(range(self.taken + 1, self.received + 1))
        self.taken = self.received
        return new

    def close(self) -> None:
        self.wake.close()
        self._waker.close()


def spawn_worker(ctx: Any, target: WorkerTarget, index: int, config: ServerConfig) -> Worker:
    """Start the worker process of slot ``index``, the stop signals blocked in it until it handles them.

    OSError when it cannot be started (no file descriptor for its pipe, no memory or process to
    fork), the pipe closed again."""
    parent_end, child_end = ctx.Pipe()
    try:
        process = ctx.Process(target=target, args=(index, config, child_end), name=f"lossd-worker-{index}", daemon=True)
        with stopsignals.held():  # the worker unblocks them once it handles them (_serve_worker)
            process.start()
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()
    log.info("worker %d started (pid %d)", index, process.pid)
    return Worker(index, process, parent_end, time.monotonic())


def start_first(spawn: Callable[[int], None], workers: int) -> None:
    """Start the first worker of each of ``workers`` slots with ``spawn(index)``: one that cannot be
    started fails the start (StartupError: one line, exit status 2)."""
    for index in range(workers):
        try:
            spawn(index)
        except OSError as exc:
            raise StartupError(f"cannot start worker {index}: {exc}") from None


class Supervisor:
    """Starts, watches, replaces and stops the worker processes (see the module's docstring).

    ``target`` is the worker's entry point (:func:`worker_main`; tests pass a wrapper of it).
    Signals reach it through :meth:`on_signal`, which the caller installs.
    """

    def __init__(self, config: ServerConfig, target: WorkerTarget | None = None) -> None:
        self.config = config
        self.target = target or worker_main
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: dict[int, Worker] = {}
        #: Workers out of their slot that drain after a stop signal of their own, by pid.
        self.leaving: dict[int, Worker] = {}
        self.restarts = Restarts()
        self.build: dict[str, str] = {}
        self.serving = False
        self.announced = False
        self.stop_deadline: float | None = None
        self.liveness = Liveness(config.worker_stall_timeout_s)
        self.exit_code = 0
        self.fatal: str | None = None
        #: The SIGTERM/SIGINT/SIGHUP handler (installed by the caller): counted, acted on by the loop.
        self.on_signal = SignalInbox()
        self.reservation: PortReservation | None = None
        self.metrics: AggregateMetrics | None = None
        self.worker_config: ServerConfig | None = None

    @property
    def stopping(self) -> bool:
        return self.stop_deadline is not None

    @property
    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.warm)

    # ------------------------------------------------------------------ start and stop
    def start(self) -> None:
        """Check and hold the port, serve /metrics, start every worker; StartupError when it cannot."""
        cfg = self.config
        self.reservation = PortReservation(cfg.host, cfg.port)
        self.worker_config = cfg.per_worker(self.reservation.port)
        if cfg.metrics_port:
            self.metrics = AggregateMetrics(cfg, self)
        else:
            os.environ.pop(MULTIPROC_ENV, None)
        _log_supervising(cfg, self.worker_config)
        # Started once before any worker: starting it unblocks SIGTERM/SIGINT in this thread, which
        # would undo stopsignals.held() around the first worker's start.
        resource_tracker.ensure_running()
        start_first(self._spawn, cfg.workers)

    def _spawn(self, index: int) -> None:
        self.workers[index] = spawn_worker(self.ctx, self.target, index, self.worker_config)

    def close(self) -> None:
        """Kill what is left (only after a failed start or the stop deadline), release the port and /metrics."""
        for worker in self._processes():
            worker.process.kill()
            worker.process.join(10)
            self._forget(worker)
        if self.metrics is not None:
            self.metrics.close()
        if self.reservation is not None:
            self.reservation.close()
        self.on_signal.close()

    def run(self) -> int:
        """Start, supervise until every worker has stopped, clean up; the exit status (0 after a drain)."""
        try:
            self.start()
            while self.fatal is None and (self.workers or self.leaving or (self.restarts.due and not self.stopping)):
                self.step()
        finally:
            self.close()
        if self.fatal is not None:
            raise StartupError(self.fatal)
        return self.exit_code

    # ------------------------------------------------------------------ one turn of the loop
    def step(self) -> None:
        """Wait for a message, an exit, a signal or a timer, and act on it."""
        processes = self._processes()
        conns = {w.conn: w for w in processes if w.conn is not None}
        sentinels = {w.process.sentinel: w for w in processes}
        ready = wait([self.on_signal.wake, *conns, *sentinels], timeout=self._timeout())
        if self.on_signal.wake in ready:
            self.on_signal.wake.recv(4096)
        self._relay_signals()  # first: a worker that exits in the same turn exits while stopping
        for obj in ready:
            if obj in conns:
                self._receive(conns[obj])
        for obj in ready:
            if obj in sentinels:
                self._exited(sentinels[obj])
        self._check_liveness()
        self._restart_due()
        self._enforce_stop_deadline()

    def _processes(self) -> list[Worker]:
        """Every worker process still there: those in a slot and those leaving."""
        return [*self.workers.values(), *self.leaving.values()]

    def _timeout(self) -> float | None:
        times = list(self.restarts.due.values()) if not self.stopping else []
        if self.liveness.enabled and not self.stopping:
            times.append(self.liveness.next_turn(list(self.workers.values())))
        times.extend(w.gone_by for w in self._processes() if w.gone_by is not None)
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _receive(self, worker: Worker) -> None:
        try:
            while worker.conn is not None and worker.conn.poll():
                self._handle(worker, worker.conn.recv())
        except (EOFError, OSError):
            worker.conn.close()
            worker.conn = None

    def _handle(self, worker: Worker, message: tuple) -> None:
        kind = message[0]
        worker.last_sign = time.monotonic()  # every message comes from the worker's event loop
        if kind == "listening":
            worker.listening = True
            self.build = message[2]
            self._announce(worker)
        elif kind == "warm":
            worker.warm = True
            log.info("worker %d (pid %d) is warm", worker.index, worker.pid)
            self._update_health()
        elif kind == "leaving":
            self._retire(worker)
        elif kind == "error":
            if not self.announced:
                self.fatal = message[1]
            else:
                log.error("worker %d (pid %d) could not start: %s", worker.index, worker.pid, message[1])

    def _announce(self, worker: Worker) -> None:
        if self.announced:
            log.info("worker %d (pid %d) listening again on port %d", worker.index, worker.pid, self.reservation.port)
            return
        if len(self.workers) == self.config.workers and all(w.listening for w in self.workers.values()):
            self.announced = True
            _log_listening(self.config, self.reservation.port, list(self.workers.values()), self.metrics)

    def _update_health(self) -> None:
        serving = not self.stopping and len(self.workers) == self.config.workers and all(w.warm for w in self.workers.values())
        if serving == self.serving:
            return
        self.serving = serving
        for worker in self.workers.values():
            worker.send(("serving", serving))
        if serving:
            log.info("all %d workers warm: SERVING", self.config.workers)
        elif not self.stopping:
            log.warning("a worker is not warm: NOT_SERVING until its replacement is")

    def _retire(self, worker: Worker) -> None:
        """``worker`` got a stop signal of its own: out of its slot, a replacement in it (unless stopping)."""
        if self.stopping or worker.leaving:
            return
        cfg = self.config
        worker.leaving = True
        worker.gone_by = time.monotonic() + cfg.drain_s + cfg.grace_s + STOP_MARGIN_S
        del self.workers[worker.index]
        self.leaving[worker.pid] = worker
        self.restarts.due[worker.index] = time.monotonic() + LEAVING_REPLACE_DELAY_S
        log.info("worker %d (pid %d) got its own stop signal: it drains out of its slot; a new one takes it", worker.index, worker.pid)
        self._update_health()

    def _exited(self, worker: Worker) -> None:
        self._receive(worker)  # its last words (an error) first
        worker.process.join()
        code = worker.process.exitcode
        self._forget(worker)
        if worker.leaving or self.stopping:
            log.info("worker %d (pid %d) stopped (%s)", worker.index, worker.pid, describe_exit(code))
            if code != 0 and self.stopping:
                self.exit_code = 1
            return
        if not self.announced and self.fatal is None:
            how = "stopped answering before every worker was listening" if worker.stalled else "exited with {} before it was listening"
            self.fatal = f"worker {worker.index} (pid {worker.pid}) " + how.format(describe_exit(code))
            return
        ran = time.monotonic() - worker.started
        delay = self.restarts.schedule(worker.index, ran)
        log.warning(
            "worker %d (pid %d) exited with %s after %.1fs; its calls in flight end UNAVAILABLE; a new worker starts in %.0fs",
            worker.index,
            worker.pid,
            describe_exit(code),
            ran,
            delay,
        )
        self._update_health()

    def _forget(self, worker: Worker) -> None:
        if worker.conn is not None:
            worker.conn.close()
            worker.conn = None
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self.leaving.pop(worker.pid, None)
        if self.metrics is not None:
            self.metrics.process_dead(worker.pid)

    def _check_liveness(self) -> None:
        """Kill the workers that stopped answering (their exit replaces them), then ping the others."""
        now = time.monotonic()
        if self.liveness.kill_stalled(self.workers.values(), now, stopping=self.stopping):
            self._update_health()
        if not self.stopping:
            self.liveness.ping(self.workers.values(), now)

    def _restart_due(self) -> None:
        if self.stopping:
            self.restarts.due.clear()
            return
        self.restarts.start_due(self._spawn)

    def _relay_signals(self) -> None:
        for ordinal in self.on_signal.take():
            if ordinal == 1:
                cfg = self.config
                self.stop_deadline = time.monotonic() + cfg.drain_s + cfg.grace_s + STOP_MARGIN_S
                self.serving = False
                log.info("stopping: every worker drains (health NOT_SERVING, %.1fs still accepting), then finishes its calls", cfg.drain_s)
                order: tuple = ("stop",)
            else:
                self.stop_deadline = min(self.stop_deadline, time.monotonic() + STOP_MARGIN_S)
                log.info("second signal: every worker skips what is left of its drain")
                order = ("hurry",)
            for worker in self._processes():
                worker.gone_by = min(worker.gone_by or self.stop_deadline, self.stop_deadline)
                worker.send(order)

    def _enforce_stop_deadline(self) -> None:
        now = time.monotonic()
        for worker in [w for w in self._processes() if w.gone_by is not None and w.gone_by <= now]:
            log.error("worker %d (pid %d) did not stop in time: killed", worker.index, worker.pid)
            worker.process.kill()
            worker.process.join(10)
            self._forget(worker)
            if self.stopping:
                self.exit_code = 1


def _log_supervising(config: ServerConfig, worker_config: ServerConfig) -> None:
    log.info(
        "supervising %d workers on %s:%d (memory budget %d bytes each, %d torch threads each)",
        config.workers,
        config.host,
        worker_config.port,
        worker_config.memory_budget_bytes,
        worker_config.torch_threads,
    )


def _log_listening(config: ServerConfig, port: int, workers: list[Worker], metrics: AggregateMetrics | None) -> None:
    pids = ", ".join(str(w.pid) for w in workers)
    log.info(
        "lossd listening on %s:%d with %d worker processes (pids %s): NOT_SERVING until every worker is warm",
        config.host,
        port,
        config.workers,
        pids,
    )
    if metrics is not None:
        log.info("metrics on http://%s:%d/metrics (every worker aggregated from %s)", config.metrics_host, metrics.port, metrics.directory)


def serve(config: ServerConfig, target: WorkerTarget | None = None) -> int:
    """``lossd-server --workers N`` (N > 1): supervise until SIGTERM/SIGINT/SIGHUP; the exit status.

    Once the supervisor has run, the stop signals are left ignored (:func:`.stopsignals.ignore`),
    not handed back to the start's handler: the process only exits now, and an orchestrator's
    second SIGTERM arriving between the two ran that handler ("SIGTERM while starting"), whose
    state Python's finalization then undid, so the signal after it killed the exit (status -15,
    1 run of the CI's signal test in about 20)."""
    supervisor = Supervisor(config, target)
    previous = {sig: signal.signal(sig, supervisor.on_signal) for sig in stop_signals()}
    try:
        status = supervisor.run()
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise
    stopsignals.ignore()
    return status


# --------------------------------------------------------------------------- the worker's side
def worker_main(index: int, config: ServerConfig, conn: Connection) -> None:
    """A worker process (spawned by the supervisor): serve ``config`` on the shared port until told to stop.

    It starts with the stop signals blocked (:func:`lossd_server.stopsignals.held`): one that
    arrives while torch is imported is taken once the event loop handles them."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s",
        stream=sys.stderr,
    )
    from . import allocator

    allocator.tune()
    code = asyncio.run(_serve_worker(index, config, conn))
    from .process_exit import exit_now

    exit_now(code)


async def _serve_worker(index: int, config: ServerConfig, conn: Connection) -> int:
    """Handle the stop signals on the event loop, then serve (the worker's exit status)."""
    from . import app

    stop_signal = app.StopSignal()

    def own_signal() -> None:
        if not stop_signal.requested.is_set():  # not after the supervisor's stop: one it relayed
            _tell(conn, ("leaving",))
        stop_signal()

    loop = asyncio.get_running_loop()
    for sig in stop_signals():
        loop.add_signal_handler(sig, own_signal)
    stopsignals.accept()
    try:
        return await _run_worker(index, config, conn, stop_signal)
    finally:
        stopsignals.block()  # the loop's handlers go with it: a late stop signal must not kill the exit


async def _run_worker(index: int, config: ServerConfig, conn: Connection, stop_signal: Any) -> int:
    """Listen, warm up, serve until told to stop, drain (the worker's exit status)."""
    from . import app, metrics

    m = metrics.get()
    interceptor = metrics.RpcMetricsInterceptor(m, worker=index)
    try:
        lossd = await app.listen(config, interceptors=[interceptor], observer=metrics.BatchMetrics(m), reuse_port=True)
    except app.StartupError as exc:
        _tell(conn, ("error", str(exc)))
        return 2
    lossd.stop_signal = stop_signal
    interceptor.server_cutting = lossd.servicer.calls.cutting
    link = SupervisorLink(conn, lossd)
    gauges = asyncio.ensure_future(metrics.refresh_gauges(lossd, m))
    _tell(conn, ("listening", lossd.port, metrics.build_labels(lossd.device)))
    try:
        await lossd.warm()
        if not lossd.stopping:
            log.info("warm-up done on %s; the supervisor decides health", lossd.device)
            _tell(conn, ("warm",))
        await lossd.wait_and_shutdown()
    finally:
        gauges.cancel()
        link.close()
    return 0


def _tell(conn: Connection, message: tuple) -> None:
    try:
        conn.send(message)
    except OSError:
        pass  # the supervisor is gone: SupervisorLink stops this worker


class SupervisorLink:
    """A worker's end of the pipe, read on its event loop: the supervisor's orders, or its absence."""

    def __init__(self, conn: Connection, lossd: Any) -> None:
        self.conn = conn
        self.lossd = lossd
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(conn.fileno(), self._read)
        self._tasks: set[asyncio.Task] = set()

    def _read(self) -> None:
        try:
            while self.conn.poll():
                self._obey(self.conn.recv())
        except (EOFError, OSError):
            self.close()
            if not self.lossd.stopping:
                log.warning("the supervisor is gone: stopping")
                self.lossd.request_stop()

    def _obey(self, order: tuple) -> None:
        from .app import DRAIN, HURRY

        if order[0] == "ping":  # answered here, on the event loop: a stuck loop leaves it unanswered
            _tell(self.conn, ("pong",))
        elif order[0] == "serving":
            task = asyncio.ensure_future(self.lossd.set_serving(order[1]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif order[0] in ("stop", "hurry"):  # counted apart from this worker's own signals (app.StopSignal)
            self.lossd.stop_signal.order(DRAIN if order[0] == "stop" else HURRY)

    def close(self) -> None:
        if self.conn.closed:
            return
        self.loop.remove_reader(self.conn.fileno())
        self.conn.close()
