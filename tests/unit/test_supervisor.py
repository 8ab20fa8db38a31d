"""--workers N without processes: per-worker settings, the port reservation, the supervisor's decisions."""

from __future__ import annotations

import errno
import os
import pickle
import socket
import time
from types import SimpleNamespace

import pytest
from lossd_server import app, workers
from lossd_server import config as config_mod
from lossd_server.config import MiB, ServerConfig
from lossd_server.ports import PortReservation, StartupError, check_bindable
from prometheus_client import CollectorRegistry, generate_latest


def test_each_worker_gets_an_even_share_of_the_budget_and_of_the_cores(monkeypatch):
    monkeypatch.setattr(config_mod.os, "cpu_count", lambda: 16)
    config = ServerConfig(workers=4, memory_budget_bytes=8 * 1024 * MiB)
    each = config.per_worker(port=5000)
    assert each.port == 5000 and each.memory_budget_bytes == 2 * 1024 * MiB
    assert each.memory_budget_share_of == (8 * 1024 * MiB, 4)  # for refusals to name both
    assert pickle.loads(pickle.dumps(each)).memory_budget_share_of == (8 * 1024 * MiB, 4)  # as the worker process gets it
    assert each.torch_threads == 3  # (16 - 4) // 4: a core per worker stays with its event loop
    assert ServerConfig(workers=4, torch_threads=2).per_worker(1).torch_threads == 2  # set by hand: kept
    assert ServerConfig(workers=16).per_worker(1).torch_threads == 1
    single = ServerConfig(memory_budget_bytes=3 * 1024 * MiB).per_worker(7)
    assert single.memory_budget_bytes == 3 * 1024 * MiB and single.torch_threads == 0  # one process: unchanged
    assert single.memory_budget_share_of is None and config.memory_budget_share_of is None


def test_workers_setting_from_flag_and_environment():
    assert config_mod.load(["--workers", "3"], environ={}).workers == 3
    assert config_mod.load([], environ={"LOSSD_WORKERS": "2"}).workers == 2
    assert config_mod.load([], environ={}).workers == 1
    with pytest.raises(SystemExit, match="--workers must be >= 1"):
        config_mod.load(["--workers", "0"], environ={})
    budget = str(2 * ServerConfig().read_reservation_bytes)  # enough for one worker, not for two
    config_mod.load(["--memory-budget-bytes", budget], environ={})
    with pytest.raises(SystemExit, match="for each of --workers=2"):
        config_mod.load(["--memory-budget-bytes", budget, "--workers", "2"], environ={})


def test_restart_backoff_and_exit_descriptions():
    assert workers.restart_delay(workers.STABLE_S + 1, quick_exits=5) == 0.0
    assert [workers.restart_delay(0.5, n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert workers.describe_exit(-9) == "signal SIGKILL" and workers.describe_exit(2) == "exit status 2"
    restarts = workers.Restarts()
    assert restarts.schedule(0, ran_s=100.0) == 0.0 and restarts.take_due() == [0] and restarts.count == 1
    assert [restarts.schedule(1, ran_s=0.1) for _ in range(3)] == [1.0, 2.0, 4.0]  # quick exits back off
    assert restarts.take_due() == [] and 1 in restarts.due
    assert restarts.schedule(1, ran_s=60.0) == 0.0 and restarts.schedule(1, ran_s=0.1) == 1.0  # a stable run resets it


def test_the_reservation_holds_the_port_for_reuseport_sockets_only():
    with PortReservation("127.0.0.1", 0) as held:
        assert held.port > 0
        with pytest.raises(StartupError, match=f"127.0.0.1:{held.port}.*--port"):
            check_bindable("127.0.0.1", held.port)  # another server's start-up check: refused
        with pytest.raises(StartupError):
            PortReservation("127.0.0.1", held.port)  # a second lossd: refused
        with socket.socket() as worker:  # what gRPC's so_reuseport does in a worker
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", held.port))
            worker.listen(1)
            with socket.create_connection(("127.0.0.1", held.port), timeout=5):
                pass  # the worker's socket listens; the reservation never does
        port = held.port
    check_bindable("127.0.0.1", port)  # released


def _port_in_time_wait() -> int:
    """A loopback port whose server side closed a connection first: that socket waits in TIME_WAIT
    (60 s), as a stopped server's connections do."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            accepted, _ = listener.accept()
            accepted.close()
            assert client.recv(1) == b""
    return port


def test_a_port_a_stopped_server_left_in_time_wait_can_be_reserved_and_is_held():
    port = _port_in_time_wait()
    with PortReservation("127.0.0.1", port) as held:  # was "Address already in use" for 60 s
        assert held.port == port
        with pytest.raises(StartupError):
            check_bindable("127.0.0.1", port)  # still held against a second lossd
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen(1)


class FakeConn:
    def __init__(self) -> None:
        self.sent: list[tuple] = []
        self.closed = False

    def send(self, message: tuple) -> None:
        self.sent.append(message)

    def poll(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def _supervisor(n: int = 2) -> tuple[workers.Supervisor, list[workers.Worker]]:
    sup = workers.Supervisor(ServerConfig(workers=n, drain_s=1, grace_s=2))
    ws = [workers.Worker(i, SimpleNamespace(pid=1000 + i), FakeConn(), time.monotonic()) for i in range(n)]
    sup.workers = {w.index: w for w in ws}
    return sup, ws


def test_health_is_serving_only_while_every_worker_is_warm():
    sup, (a, b) = _supervisor()
    sup.announced = True
    sup._handle(a, ("warm",))
    assert not sup.serving and a.conn.sent == [] and sup.ready_count == 1
    sup._handle(b, ("warm",))
    assert sup.serving and a.conn.sent == b.conn.sent == [("serving", True)]
    del sup.workers[1]  # worker 1 exited: NOT_SERVING on the others until its replacement is warm
    sup._update_health()
    assert not sup.serving and a.conn.sent[-1] == ("serving", False)


def test_signals_relay_stop_then_hurry_to_every_worker():
    sup, (a, b) = _supervisor()
    sup.on_signal(15)
    sup._relay_signals()
    assert sup.stopping and a.conn.sent == b.conn.sent == [("stop",)]
    first_deadline = sup.stop_deadline
    sup._handle(a, ("warm",))
    sup._handle(b, ("warm",))
    assert not sup.serving and a.conn.sent == [("stop",)]  # no SERVING once stopping
    sup.on_signal(15)
    sup._relay_signals()
    assert a.conn.sent[-1] == b.conn.sent[-1] == ("hurry",) and sup.stop_deadline <= first_deadline


@pytest.mark.parametrize("relayed_first", [True, False])
def test_a_workers_own_signal_and_the_relay_of_it_are_one_stop(relayed_first):
    """A group signal reaches a worker directly and through the supervisor, in either order: it
    drains; the next group signal (a second own signal and ``hurry``) hurries."""
    stop = app.StopSignal()
    link = SimpleNamespace(lossd=SimpleNamespace(stop_signal=stop))
    copies = [lambda: workers.SupervisorLink._obey(link, ("stop",)), stop]
    for copy in copies if relayed_first else copies[::-1]:
        copy()
    assert stop.requested.is_set() and not stop.hurry.is_set()
    workers.SupervisorLink._obey(link, ("stop",))  # a repeated order is the same order
    assert not stop.hurry.is_set()
    stop()
    workers.SupervisorLink._obey(link, ("hurry",))
    assert stop.hurry.is_set()


@pytest.mark.parametrize("second", ["own signal", "hurry"])
def test_a_second_stop_from_one_source_hurries(second):
    """A worker signalled twice by hand, or a supervisor signalled twice: the second stop hurries."""
    stop = app.StopSignal()
    link = SimpleNamespace(lossd=SimpleNamespace(stop_signal=stop))
    if second == "own signal":
        stop()
        stop()
    else:
        workers.SupervisorLink._obey(link, ("stop",))
        workers.SupervisorLink._obey(link, ("hurry",))
    assert stop.requested.is_set() and stop.hurry.is_set()


def test_an_error_before_every_worker_listened_fails_the_start():
    sup, (a, b) = _supervisor()
    sup._handle(a, ("listening", 5000, {"version": "x"}))
    assert not sup.announced
    sup._handle(b, ("error", "cannot listen on 127.0.0.1:5000"))
    assert sup.fatal == "cannot listen on 127.0.0.1:5000"
    later, (c, _) = _supervisor()
    later.announced = True
    later._handle(c, ("error", "cannot listen"))
    assert later.fatal is None  # a replacement that cannot start is retried, not fatal


def test_supervisor_collector_reports_workers_restarts_and_build():
    sup, (a, _, _) = _supervisor(3)
    a.warm = True
    sup.restarts.count = 2
    sup.build = {"version": "1", "torch_version": "2", "device": "cpu"}
    registry = CollectorRegistry()
    registry.register(workers.SupervisorCollector(sup))
    text = generate_latest(registry).decode()
    assert "lossd_workers 3.0" in text and "lossd_workers_ready 1.0" in text
    assert "lossd_worker_restarts_total 2.0" in text
    assert 'lossd_build_info{device="cpu",torch_version="2",version="1"} 1.0' in text


# --------------------------------------------------------------------------- a worker that hangs


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.killed = False
        self.exitcode: int | None = None

    def kill(self) -> None:
        self.killed = True
        self.exitcode = -9

    def join(self, timeout: float | None = None) -> None:
        pass


class Clock:
    def __init__(self, monkeypatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(workers.time, "monotonic", lambda: self.now)


def _watched(monkeypatch, stall_s: float = 8.0) -> tuple[Clock, workers.Supervisor, list[workers.Worker]]:
    """A supervisor (on a fake clock) of two listening, warm workers that are SERVING."""
    clock = Clock(monkeypatch)
    sup = workers.Supervisor(ServerConfig(workers=2, drain_s=1, grace_s=2, worker_stall_timeout_s=stall_s))
    ws = [workers.Worker(i, FakeProcess(1000 + i), FakeConn(), clock.now) for i in range(2)]
    sup.workers = {w.index: w for w in ws}
    sup.reservation = SimpleNamespace(port=5000)
    for w in ws:
        sup._handle(w, ("listening", 5000, {}))
        sup._handle(w, ("warm",))
    assert sup.announced
    assert sup.serving
    return clock, sup, ws


def _pings(worker: workers.Worker) -> int:
    return worker.conn.sent.count(("ping",))


def test_a_worker_silent_for_the_stall_timeout_is_killed_health_turns_not_serving_and_it_is_replaced(monkeypatch):
    clock, sup, (a, b) = _watched(monkeypatch, stall_s=8.0)
    for _ in range(3):  # a ping every 2 s (stall / 4); worker 0 answers each, worker 1 none
        sup._check_liveness()
        sup._handle(a, ("pong",))
        clock.now += 2.0
    sup._check_liveness()  # 6 s of silence: not yet
    assert not b.process.killed and sup.serving and _pings(b) == 4
    assert 0 < sup._timeout() <= 2.0  # the supervisor wakes up for the next ping
    sup._handle(a, ("pong",))
    clock.now += 2.0
    sup._check_liveness()  # 8 s: worker 1 is killed, worker 0 is not
    assert b.process.killed and b.stalled and not a.process.killed
    assert not sup.serving and a.conn.sent[-2:] == [("serving", False), ("ping",)] and sup.ready_count == 1
    assert _pings(a) == 5 and _pings(b) == 4  # a killed worker is not pinged
    sup._exited(b)  # its sentinel: the exit path replaces it like any other exit, counted
    assert 1 not in sup.workers and sup.restarts.due == {1: clock.now + workers.RESTART_BACKOFF_S}
    clock.now += workers.RESTART_BACKOFF_S
    assert sup.restarts.take_due() == [1] and sup.restarts.count == 1
    sup._check_liveness()  # the live worker is still fine
    assert not a.process.killed


def test_the_supervisor_wakes_up_when_a_silence_reaches_the_stall_timeout_not_only_to_ping(monkeypatch):
    clock, sup, (a, b) = _watched(monkeypatch, stall_s=8.0)
    sup._check_liveness()  # pings at 1000, next at 1002
    clock.now += 1.0
    sup._handle(a, ("pong",))
    sup._handle(b, ("pong",))  # both answered at 1001
    for now in (1002.0, 1004.0, 1006.0, 1008.0):  # pings every 2 s from now on; worker 1 answers no more
        clock.now = now
        sup._check_liveness()
        sup._handle(a, ("pong",))
    assert sup._timeout() == pytest.approx(1.0)  # its silence reaches 8 s at 1009, before the ping at 1010
    clock.now = 1009.0
    sup._check_liveness()
    assert b.process.killed and not a.process.killed


def test_any_message_is_a_sign_of_life_and_a_starting_worker_gets_four_times_as_long(monkeypatch):
    """A starting worker (importing torch, not listening yet) is not pinged and may stay silent
    STARTING_FACTOR x the timeout; one stopped while starting was never noticed before."""
    clock, sup, (a, b) = _watched(monkeypatch, stall_s=8.0)
    starting = workers.Worker(2, FakeProcess(1002), FakeConn(), clock.now)  # importing torch: not listening yet
    sup.workers[2] = starting
    for _ in range(31):
        sup._check_liveness()
        sup._handle(a, ("pong",))
        sup._handle(b, ("warm",))
        clock.now += 1.0
    sup._check_liveness()
    assert not any(w.process.killed for w in (a, b, starting)) and _pings(starting) == 0
    assert workers.STARTING_FACTOR * 8.0 == 32.0
    clock.now += 1.0
    sup._handle(a, ("pong",))
    sup._handle(b, ("warm",))
    sup._check_liveness()  # 32 s without "listening": killed, the others are not
    assert starting.process.killed and starting.stalled and not a.process.killed and not b.process.killed


def test_a_stopping_supervisor_kills_no_worker_for_being_slow_and_pings_none(monkeypatch):
    """A draining worker is bounded by the stop deadline (drain + grace + margin), not by the stall timeout."""
    clock, sup, (a, b) = _watched(monkeypatch, stall_s=8.0)
    sup.on_signal(15)
    sup._relay_signals()
    sent = [list(a.conn.sent), list(b.conn.sent)]
    clock.now += 9.0  # under the stop deadline (1 + 2 + 15 s), over the stall timeout
    sup._check_liveness()
    sup._enforce_stop_deadline()
    assert not a.process.killed and not b.process.killed and [a.conn.sent, b.conn.sent] == sent
    assert sup._timeout() == pytest.approx(sup.stop_deadline - clock.now)  # no ping timer while stopping


def test_a_supervisor_that_was_itself_stopped_does_not_blame_the_workers(monkeypatch):
    """Ctrl-Z stops the whole process group; on `fg` every worker answers again: none is killed."""
    clock, sup, (a, b) = _watched(monkeypatch, stall_s=8.0)
    sup._check_liveness()
    clock.now += 600.0  # nobody ran, the supervisor included
    sup._check_liveness()
    assert not a.process.killed and not b.process.killed and _pings(a) == 2
    sup._handle(a, ("pong",))
    for _ in range(4):  # worker 1 stays silent after the resume: the timeout counts from there
        clock.now += 2.0
        sup._check_liveness()
        sup._handle(a, ("pong",))
    assert b.process.killed and not a.process.killed


# --------------------------------------------------------------------------- a worker that cannot be started


def _emfile(*args, **kwargs):
    raise OSError(errno.EMFILE, "Too many open files")


def test_a_replacement_that_cannot_be_started_is_retried_after_a_backoff_and_the_supervisor_carries_on(monkeypatch, caplog):
    """Probe 17 F2: a replacement's start raised OSError (EMFILE from the pipe) out of the loop and the
    supervisor exited 1, taking the other worker with it. Now: one line, the slot empty and health
    NOT_SERVING, tried again after the backoff of a quick exit (1 s, 2 s, ...), counted once it starts."""
    clock, sup, (a, b) = _watched(monkeypatch)
    b.process.exitcode = -9
    clock.now += workers.STABLE_S
    sup._exited(b)  # ran long enough: replaced at once
    assert sup.restarts.due == {1: clock.now} and not sup.serving
    real_ctx = sup.ctx
    sup.ctx = SimpleNamespace(Pipe=_emfile)
    for delay in (1.0, 2.0):
        caplog.clear()
        sup._restart_due()
        assert sup.restarts.due == {1: clock.now + delay} and 1 not in sup.workers and sup.restarts.count == 0
        assert not sup.serving and sup.fatal is None
        (record,) = [r for r in caplog.records if "could not start" in r.getMessage()]
        assert record.getMessage() == (
            f"could not start a new worker 1 ([Errno 24] Too many open files): trying again in {delay:.0f}s; NOT_SERVING until it is warm"
        )
        clock.now += delay
    started = []
    sup.ctx = real_ctx
    monkeypatch.setattr(workers, "spawn_worker", lambda ctx, target, index, config: started.append(index) or b)
    sup._restart_due()
    assert started == [1] and sup.workers[1] is b and sup.restarts.due == {} and sup.restarts.count == 1


def test_a_first_worker_that_cannot_be_started_fails_the_start_in_one_line():
    with pytest.raises(StartupError, match=r"^cannot start worker 1: \[Errno 24\] Too many open files$"):
        workers.start_first(lambda index: index and _emfile(), 2)


class FailingStart:
    def __init__(self, **kwargs) -> None:
        self.args = kwargs["args"]

    def start(self) -> None:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")  # fork: no process left


def test_a_worker_whose_process_cannot_start_leaves_no_pipe_open():
    ends = [FakeConn(), FakeConn()]
    ctx = SimpleNamespace(Pipe=lambda: tuple(ends), Process=FailingStart)
    with pytest.raises(OSError, match="Resource temporarily unavailable"):
        workers.spawn_worker(ctx, lambda *a: None, 0, ServerConfig())
    assert [end.closed for end in ends] == [True, True]


# --------------------------------------------------------------------------- a worker's own signal


def test_a_worker_with_a_stop_signal_of_its_own_leaves_its_slot_to_a_replacement(monkeypatch):
    """``kill -TERM <worker pid>``: the worker drains and finishes its calls out of its slot, a new
    worker takes the slot after LEAVING_REPLACE_DELAY_S, and its exit is a stop, not a death."""
    clock, sup, (a, b) = _watched(monkeypatch)
    sup._handle(a, ("leaving",))
    assert sup.workers == {1: b} and sup.leaving == {a.pid: a} and a.leaving
    assert sup.restarts.due == {0: clock.now + workers.LEAVING_REPLACE_DELAY_S}
    assert not sup.serving and b.conn.sent[-1] == ("serving", False) and ("serving", False) not in a.conn.sent
    assert a.gone_by == clock.now + 1 + 2 + workers.STOP_MARGIN_S  # drain + grace + margin, as a stop
    clock.now += workers.LEAVING_REPLACE_DELAY_S
    assert sup.restarts.take_due() == [0]
    a.process.exitcode = 0
    sup._exited(a)
    assert sup.leaving == {} and sup.workers == {1: b} and sup.restarts.due == {} and sup.exit_code == 0


def test_a_leaving_worker_gets_the_supervisors_stop_and_is_killed_past_its_own_deadline(monkeypatch):
    clock, sup, (a, b) = _watched(monkeypatch)
    sup._handle(a, ("leaving",))
    sup._handle(a, ("leaving",))  # said twice: still one replacement
    sup._check_liveness()  # the next ping in 2 s
    assert sup.restarts.due == {0: clock.now + workers.LEAVING_REPLACE_DELAY_S} and sup._timeout() == pytest.approx(0.5)
    clock.now = a.gone_by
    sup._enforce_stop_deadline()
    assert a.process.killed and not b.process.killed and sup.leaving == {} and sup.exit_code == 0
    clock2, sup2, (c, d) = _watched(monkeypatch)
    sup2._handle(c, ("leaving",))
    sup2.on_signal(15)  # the supervisor stops too (a signal to the whole group): no replacement, both told
    sup2._relay_signals()
    sup2._restart_due()
    assert sup2.restarts.due == {} and c.conn.sent[-1] == d.conn.sent[-1] == ("stop",)
    assert c.gone_by == d.gone_by == sup2.stop_deadline


def test_the_supervisors_stop_first_makes_a_workers_leaving_nothing(monkeypatch):
    clock, sup, (a, b) = _watched(monkeypatch)
    sup.on_signal(15)
    sup._relay_signals()
    sup._handle(a, ("leaving",))
    assert sup.workers == {0: a, 1: b} and sup.leaving == {} and sup.restarts.due == {}


# --------------------------------------------------------------------------- metrics directories


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_metrics_directories_of_supervisors_and_workers_that_are_gone_are_removed(tmp_path):
    from lossd_server import multiproc_dir

    dead, me = _dead_pid(), os.getpid()
    gone = tmp_path / f"lossd-metrics-{dead}-ab_c12"
    gone.mkdir()
    (gone / f"counter_{dead}.db").write_bytes(b"x")
    (gone / "counter_archive.db").write_bytes(b"x")  # dead workers' counts (lossd_server.metrics_files): no pid
    draining = tmp_path / f"lossd-metrics-{dead}-zz9"  # its supervisor was killed, a worker (me) still drains
    draining.mkdir()
    (draining / f"histogram_{me}.db").write_bytes(b"x")
    (draining / "histogram_archive.db").write_bytes(b"x")
    live = tmp_path / f"lossd-metrics-{me}-q1"
    live.mkdir()
    others = [tmp_path / "lossd-metrics-abc123", tmp_path / f"lossd-metrics-{dead}-file", tmp_path / f"lossd-metricsX{dead}-a"]
    others[0].mkdir()
    others[1].write_text("not a directory")
    others[2].mkdir()
    assert multiproc_dir.remove_stale(str(tmp_path)) == [str(gone)]
    assert not gone.exists() and draining.exists() and live.exists() and all(p.exists() for p in others)
    fresh = multiproc_dir.create(str(tmp_path))
    assert os.path.basename(fresh).startswith(f"lossd-metrics-{me}-") and os.path.isdir(fresh)


def test_a_stall_timeout_of_0_never_pings_nor_kills(monkeypatch):
    clock, sup, (a, b) = _watched(monkeypatch, stall_s=0.0)
    for _ in range(5):
        clock.now += 100.0
        sup._check_liveness()
    assert not a.process.killed and not b.process.killed and _pings(a) == _pings(b) == 0
    assert sup._timeout() is None


def test_the_workers_event_loop_answers_pings_while_a_thread_computes_and_not_while_it_is_blocked():
    """SupervisorLink reads the pipe on the event loop: an engine thread busy (even holding the GIL
    in Python code) leaves the loop free to answer; a blocked loop answers nothing until it is free."""
    import asyncio
    import multiprocessing
    import threading

    parent, child = multiprocessing.Pipe()
    busy = threading.Event()
    release = threading.Event()

    def compute() -> None:  # pure Python: holds the GIL but for gRPC-style switches
        busy.set()
        while not release.is_set():
            sum(range(1000))

    async def worker() -> tuple[object, bool, object]:
        loop = asyncio.get_running_loop()
        link = workers.SupervisorLink(child, SimpleNamespace(stopping=False))
        job = loop.run_in_executor(None, compute)
        await loop.run_in_executor(None, busy.wait)
        parent.send(("ping",))
        answered = await loop.run_in_executor(None, parent.poll, 30)
        while_computing = parent.recv() if answered else None
        release.set()
        await job
        seen: dict[str, bool] = {}

        def observer() -> None:  # another thread: the loop is blocked while it pings
            assert blocked.wait(30)
            parent.send(("ping",))
            seen["while blocked"] = parent.poll(0.5)
            release.set()

        blocked = threading.Event()
        release.clear()
        watcher = threading.Thread(target=observer)
        watcher.start()
        loop.call_soon(lambda: (blocked.set(), release.wait(60)))  # the loop blocks in this callback
        late = await loop.run_in_executor(None, lambda: parent.recv() if parent.poll(30) else None)
        watcher.join(30)
        answered_while_blocked = seen["while blocked"]
        link.close()
        return while_computing, answered_while_blocked, late

    try:
        while_computing, answered_while_blocked, late = asyncio.run(worker())
    finally:
        release.set()
        parent.close()
    assert while_computing == ("pong",)
    assert not answered_while_blocked and late == ("pong",)
