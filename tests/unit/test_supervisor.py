"""--workers N without processes: per-worker settings, the port reservation, the supervisor's decisions."""

from __future__ import annotations

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
    assert each.torch_threads == 3  # (16 - 4) // 4: a core per worker stays with its event loop
    assert ServerConfig(workers=4, torch_threads=2).per_worker(1).torch_threads == 2  # set by hand: kept
    assert ServerConfig(workers=16).per_worker(1).torch_threads == 1
    single = ServerConfig(memory_budget_bytes=3 * 1024 * MiB).per_worker(7)
    assert single.memory_budget_bytes == 3 * 1024 * MiB and single.torch_threads == 0  # one process: unchanged


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
