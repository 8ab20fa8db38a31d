"""Lifecycle of a real server process: warm-up gating, drain on SIGTERM, nothing lost."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lossd_client import LossClient, LossRequest, core
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from lossd_server import app
from lossd_server.config import ServerConfig
from serverproc import held_chunks, start_server
from workerprocs import alive, own_ports, owners, stop_everything, wait_for, worker_pids

N_CALLS = 32
ROWS, CLASSES = 4096, 1024  # 16 MiB of float32 logits per call


def _health(channel: grpc.Channel) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_sigterm_with_large_calls_on_the_wire_loses_nothing():
    proc = start_server("--drain-s", "5", "--grace-s", "120")
    try:
        g = np.random.default_rng(0)
        requests = [
            LossRequest(g.standard_normal((ROWS, CLASSES), dtype=np.float32), g.integers(-1, CLASSES, ROWS), ignore_index=-1)
            for _ in range(N_CALLS)
        ]
        messages = [core.build(r)[0] for r in requests]
        assert all(m.ByteSize() >= 16 * 2**20 for m in messages)
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        with grpc.insecure_channel(proc.address, options=options) as channel:
            assert _health(channel) == "SERVING"
            stub = pb_grpc.LossServiceStub(channel)
            # .future() returns once the call and its message are handed to the transport.
            futures = [stub.Evaluate.future(m, timeout=300) for m in messages]
            proc.signal(signal.SIGTERM)
            replies = [f.result() for f in futures]
        assert proc.proc.wait(120) == 0, proc.log()
    finally:
        proc.stop()
    for req, reply in zip(requests, replies, strict=True):
        want = F.cross_entropy(torch.from_numpy(req.input), torch.from_numpy(req.target), ignore_index=-1)
        got = core.parse(reply, as_torch=True).loss
        torch.testing.assert_close(got, want)
    log = proc.log()
    assert "(drain)" in log, log
    assert "stopped" in log, log


def test_health_not_serving_during_drain_while_still_accepting():
    """SIGINT starts the drain (like SIGTERM); a second signal ends it early; exit status 0."""
    proc = start_server("--drain-s", "300", "--grace-s", "30")
    try:
        with LossClient(proc.address, timeout_s=30) as client:
            assert client.health() == "SERVING"
            assert client.health("lossd.v1.LossService") == "SERVING"
            proc.signal(signal.SIGINT)
            status = "SERVING"
            for _ in range(100):
                status = client.health()
                if status != "SERVING":
                    break
                time.sleep(0.05)
            assert status == "NOT_SERVING"
            assert client.health("lossd.v1.LossService") == "NOT_SERVING"
            logits = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
            got = client.cross_entropy(logits, np.array([0, 1, 2, 3, 0]))
            want = F.cross_entropy(torch.from_numpy(logits), torch.tensor([0, 1, 2, 3, 0]))
            torch.testing.assert_close(torch.from_numpy(np.asarray(got)), want)
            assert proc.proc.poll() is None
        proc.signal(signal.SIGTERM)  # a second signal skips what is left of the drain
        assert proc.proc.wait(60) == 0, proc.log()
    finally:
        proc.stop()


def test_after_the_drain_new_calls_go_elsewhere_and_the_stop_does_not_wait_out_the_grace():
    """A client that keeps calling (it does not watch health) kept the server accepting after the
    drain, never quiet, until the grace ended and cut what was in progress then. Now gRPC's
    graceful stop starts when the drain ends: calls already taken finish, new ones are refused
    before the server sees them (UNAVAILABLE; lossd_client replays them elsewhere)."""
    proc = start_server("--drain-s", "0.5", "--grace-s", "120")
    statuses: list[str] = []
    stop = threading.Event()
    message = core.build(LossRequest(np.zeros((8, 10), np.float32), np.arange(8)))[0]

    def keep_calling() -> None:
        options = [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(proc.address, options=options) as channel:
            evaluate = pb_grpc.LossServiceStub(channel).Evaluate
            for _ in range(100_000):
                if stop.is_set():
                    return
                try:
                    evaluate(message, timeout=10)
                    statuses.append("OK")
                except grpc.RpcError as exc:
                    statuses.append(exc.code().name)
                    time.sleep(0.01)

    caller = threading.Thread(target=keep_calling, daemon=True)
    try:
        caller.start()
        wait_for(lambda: len(statuses) >= 20, what="calls before the stop")
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0, proc.log()  # before: drain + the whole 120 s grace
    finally:
        stop.set()
        caller.join(30)
        proc.stop()
    assert set(statuses) <= {"OK", "UNAVAILABLE"}, statuses
    assert "0 call(s) still in progress are cut" in proc.log(), proc.log()


IN_FLIGHT = 32


async def _channel_on(proc, worker: int | None, attempts: int = 40) -> grpc.aio.Channel:
    """A connected grpc.aio channel without retries (transparent ones included), held by worker
    ``worker`` of a ``--workers`` server (None: a one-process server); bounded."""
    options = [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]
    for _ in range(attempts):
        before = own_ports(proc.port)
        channel = grpc.aio.insecure_channel(proc.address, options=options)
        await asyncio.wait_for(channel.channel_ready(), 30)
        if worker is None or owners(proc, own_ports(proc.port) - before) == [worker]:
            return channel
        await channel.close()
    raise AssertionError(f"{attempts} channels did not reach worker {worker}")


async def _stop_under_unary_load(proc, target: int, worker: int | None) -> collections.Counter:
    """IN_FLIGHT raw unary Evaluate calls (pre-serialised, no retries), each sent again as soon as it
    ends, on a connection to ``worker``; SIGTERM to ``target`` once 200 are answered; calls go on
    until ``target`` has exited. Returns the calls' status codes."""
    data = core.build(LossRequest(np.zeros((64, 32), np.float32), np.arange(64) % 32))[0].SerializeToString()
    codes: collections.Counter = collections.Counter()
    channel = await _channel_on(proc, worker)
    evaluate = channel.unary_unary("/lossd.v1.LossService/Evaluate")
    gone = asyncio.Event()

    async def keep_calling() -> None:
        for _ in range(20_000):
            if gone.is_set():
                return
            try:
                await evaluate(data, timeout=30)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                await asyncio.sleep(0.01)

    callers = [asyncio.ensure_future(keep_calling()) for _ in range(IN_FLIGHT)]
    try:
        for _ in range(3000):
            if codes["OK"] >= 200 or all(c.done() for c in callers):
                break
            await asyncio.sleep(0.01)
        os.kill(target, signal.SIGTERM)
        for _ in range(3000):  # at most 60 s
            if not alive(target):
                break
            await asyncio.sleep(0.02)
    finally:
        gone.set()
        await asyncio.wait_for(asyncio.gather(*callers), 60)
        await channel.close()
    return codes


@pytest.mark.parametrize("workers", ["1", "2"])
def test_calls_in_flight_at_a_stop_end_ok_or_unavailable_never_cancelled(workers):
    """gRPC's graceful stop cancels every call its transport received that the event loop had not
    taken yet (they wait in gRPC's core): CANCELLED, which plain gRPC clients do not replay. With 32
    unary calls in flight, each sent again once answered, about 30 ended CANCELLED at every stop of
    one process, 6 to 15 when one worker of two got its own SIGTERM. Now the server takes them
    before it stops: each call is answered, or refused UNAVAILABLE once the server is gone."""
    proc = start_server("--workers", workers, "--drain-s", "0.3", "--grace-s", "120")
    try:
        if workers == "1":
            codes = asyncio.run(_stop_under_unary_load(proc, proc.proc.pid, None))
            assert proc.proc.wait(60) == 0, proc.log()
        else:
            pid = worker_pids(proc.log())[0]
            codes = asyncio.run(_stop_under_unary_load(proc, pid, 0))
            wait_for(lambda: f"worker 0 (pid {pid}) stopped (exit status 0)" in proc.log(), what="worker 0's exit status")
    finally:
        stop_everything(proc)
    assert codes["OK"] >= 200, codes
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes


@pytest.mark.parametrize("stream", ["health-watch", "reflection"])
def test_an_open_stream_that_is_no_lossd_call_does_not_hold_the_stop(stream):
    """A health Watch (what gRPC's client-side health checking keeps open) or a reflection stream
    that sends nothing kept the stop to the end of the grace."""
    proc = start_server("--drain-s", "0.2", "--grace-s", "120")
    seen: list[str] = []
    release = threading.Event()

    def nothing():  # a request stream that sends nothing until the test ends
        release.wait(60)
        yield from ()

    try:
        with grpc.insecure_channel(proc.address) as channel:
            if stream == "health-watch":
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=300)
            else:
                method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
                watch = channel.stream_stream(method)(nothing(), timeout=300)

            def follow() -> None:
                try:
                    for reply in watch:
                        seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                except grpc.RpcError as exc:
                    seen.append(exc.code().name)

            follower = threading.Thread(target=follow, daemon=True)
            follower.start()
            if stream == "health-watch":
                wait_for(lambda: seen == ["SERVING"], what="the first Watch reply")
            proc.signal(signal.SIGTERM)
            assert proc.proc.wait(60) == 0, proc.log()  # before: drain + the whole 120 s grace
            follower.join(30)
    finally:
        release.set()
        proc.stop()
    if stream == "health-watch":
        assert seen[:2] == ["SERVING", "NOT_SERVING"], seen
    assert seen[-1] in ("UNAVAILABLE", "CANCELLED"), seen


def test_a_stopped_server_runs_its_exit_handlers_and_exits_with_its_status(tmp_path):
    """The server ends without the interpreter's teardown (0.5-0.7 s with torch imported, at every
    stop: lossd_server.process_exit), but an exit's handlers still run (atexit: logging's flush,
    multiprocessing's finalizers), its last log line is written, and its status is main()'s."""
    marker, torn_down = tmp_path / "atexit-ran", tmp_path / "torn-down"
    code = (
        f"import atexit, pathlib; atexit.register(pathlib.Path({str(marker)!r}).write_text, 'ran')\n"
        f"class Global:\n    def __del__(self): pathlib.Path({str(torn_down)!r}).write_text('torn down')\n"
        "kept = Global()  # collected by the interpreter's teardown, if it runs\n"
        "from lossd_server.__main__ import run; run()"
    )
    proc = start_server(program=("-c", code))
    assert proc.stop() == 0, proc.log()
    assert marker.read_text() == "ran" and not torn_down.exists()
    assert proc.log().rstrip().endswith("lossd: stopped"), proc.log()[-500:]
    refused = subprocess.run([sys.executable, "-c", code, "--max-batch-rows", "0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--max-batch-rows" in refused.stderr, refused.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_drains_like_sigterm(workers):
    """SIGHUP (the terminal or SSH session that started the server went away) is a stop like
    SIGTERM: the call in flight is answered, exit status 0, no worker left behind. It used to kill
    the process at once (UNAVAILABLE "Stream removed"; a supervisor died and left its workers)."""
    proc = start_server("--workers", workers, "--drain-s", "0.2", "--grace-s", "120", metrics=True)
    release = threading.Event()
    try:
        pids = proc.worker_pids()
        g = np.random.default_rng(3)
        req = LossRequest(g.standard_normal((256, 1024), dtype=np.float32), g.integers(0, 1024, 256), reduction="sum")
        with grpc.insecure_channel(proc.address) as channel:
            future = pb_grpc.LossServiceStub(channel).EvaluateChunked.future(held_chunks(req, release), timeout=300)
            in_flight = 'lossd_requests_in_flight{method="EvaluateChunked"}'
            wait_for(lambda: proc.metrics().get(in_flight) == 1, what="the call in flight")
            proc.signal(signal.SIGHUP)
            wait_for(lambda: proc.log().count("(drain)") == int(workers) or proc.proc.poll() is not None, what="the drain")
            release.set()
            reply = future.result()
        assert proc.proc.wait(60) == 0, proc.log()
    finally:
        release.set()
        proc.stop()
    want = F.cross_entropy(torch.from_numpy(req.input), torch.from_numpy(req.target), reduction="sum")
    torch.testing.assert_close(core.parse(reply, as_torch=True).loss, want)
    assert not any(alive(pid) for pid in pids.values())


def test_a_call_longer_than_the_connection_age_is_not_cut():
    """--max-connection-age-s ages connections out for rebalancing; the calls in progress then get
    --max-connection-age-grace-s (600 s), not --grace-s (here 1 s): a call held 3.5 s on a connection
    aged at 1 s is answered (it used to end UNAVAILABLE "max connection age" at about 2 s)."""
    proc = start_server("--max-connection-age-s", "1", "--grace-s", "1")
    release = threading.Event()
    timer = threading.Timer(3.5, release.set)
    try:
        g = np.random.default_rng(4)
        req = LossRequest(g.standard_normal((256, 1024), dtype=np.float32), g.integers(0, 1024, 256), reduction="sum")
        with grpc.insecure_channel(proc.address) as channel:
            timer.start()
            reply = pb_grpc.LossServiceStub(channel).EvaluateChunked(held_chunks(req, release), timeout=120)
    finally:
        timer.cancel()
        release.set()
        assert proc.stop() == 0, proc.log()
    want = F.cross_entropy(torch.from_numpy(req.input), torch.from_numpy(req.target), reduction="sum")
    torch.testing.assert_close(core.parse(reply, as_torch=True).loss, want)


class _InProcessServer:
    """app.listen() + warm-up on an event loop in a thread, with a warm-up the test releases."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.warm_up_started = threading.Event()
        real_warm_up = app.warm_up

        def gated_warm_up(device: torch.device) -> None:
            self.warm_up_started.set()
            if not self.release.wait(60):
                raise RuntimeError("test never released the warm-up")
            real_warm_up(device)

        monkeypatch.setattr(app, "warm_up", gated_warm_up)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = ServerConfig(port=0, metrics_port=0, drain_s=0.0, grace_s=5.0)
        self.lossd = asyncio.run_coroutine_threadsafe(app.listen(config), self.loop).result(60)
        self.ready = asyncio.run_coroutine_threadsafe(self.lossd.warm_up_and_serve(), self.loop)

    def close(self) -> None:
        self.release.set()
        self.lossd.request_stop()
        try:
            self.ready.result(60)
        finally:
            asyncio.run_coroutine_threadsafe(self.lossd.wait_and_shutdown(), self.loop).result(60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()


def test_not_serving_until_warm_up_ran(monkeypatch):
    server = _InProcessServer(monkeypatch)
    try:
        assert server.warm_up_started.wait(30)
        with LossClient(f"127.0.0.1:{server.lossd.port}", timeout_s=30) as client:
            assert client.health() == "NOT_SERVING"
            assert client.health("lossd.v1.LossService") == "NOT_SERVING"
            server.release.set()
            server.ready.result(60)
            assert client.health() == "SERVING"
            assert client.health("lossd.v1.LossService") == "SERVING"
    finally:
        server.close()


def _catches_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("after_s", [0.0, 0.3, 1.0])
def test_sigterm_while_starting_exits_0(workers, after_s):
    """A stop request at any moment of the start (importing torch, warming up, spawning workers)
    ends the process with status 0, as one while serving does, never death by signal."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lossd_server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--workers", workers]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(1000):  # bounded: until main() has installed its handler (10 s at most)
            if proc.poll() is not None or _catches_sigterm(proc.pid):
                break
            time.sleep(0.01)
        time.sleep(after_s)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        (["--stream-idle-timeout-s", "nan"], {}, "--stream-idle-timeout-s must be > 0"),  # was accepted: every call then failed
        ([], {"LOSSD_LOG_LEVEL": "LOUD"}, "LOSSD_LOG_LEVEL (--log-level) must be DEBUG"),  # was a traceback
        (["--max-concurrent-calls", "99999999999"], {}, "--max-concurrent-calls must be >= 1 and <= 2147483647"),  # was a traceback
        (["--device", "cuda:99"], {}, "--device / LOSSD_DEVICE cuda:99: "),  # found by each worker, told to the supervisor
        # crashed the supervisor (OverflowError from its poll()) right after it started the workers
        (["--worker-stall-timeout-s", "1e7"], {}, "--worker-stall-timeout-s must be 0 (off) or at least 1 and <= 2147483.647"),
        (["--workers", "3000"], {}, "--workers must be >= 1 and <= 256"),  # passed: the supervisor set out to start 3000 interpreters
        (["--host", "a" * 64 + ".example"], {}, "--host must be an IP address or a host name"),  # a UnicodeError traceback, status 1
        (["--metrics-port", "-1"], {"LOSSD_METRICS_HOST": "a" * 300}, "LOSSD_METRICS_HOST (--metrics-host) must be an IP address or a host name"),
    ],
)
def test_a_bad_setting_stops_the_start_with_one_line_naming_it_and_status_2(workers, flags, env, named):
    """With --workers N too: the supervisor's line names the setting (it said "worker 0 exited with exit status 1")."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lossd_server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--workers", workers, *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env={**os.environ, **env})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"lossd-server: error: {named}"), done.stderr
    if "--device" not in flags or workers == "1":  # workers are started (and logged) before one can tell the device is absent
        assert len(lines) == 1, done.stderr


async def _calls_on_a_timer(proc, calls: int, timeout_s: float, sigterm_at: tuple[int, ...]) -> collections.Counter:
    """``calls`` raw Evaluate calls, one every 5 ms whatever the answers (no retries), SIGTERM to
    ``proc`` after the calls numbered ``sigterm_at``; stops sending once it exited. Their codes."""
    data = core.build(LossRequest(np.zeros((8, 4), np.float32), np.arange(8) % 4))[0].SerializeToString()
    codes: collections.Counter = collections.Counter()
    async with grpc.aio.insecure_channel(proc.address, options=[("grpc.enable_retries", 0)]) as channel:
        evaluate = channel.unary_unary("/lossd.v1.LossService/Evaluate")
        await asyncio.wait_for(channel.channel_ready(), 30)

        async def one() -> None:
            try:
                await evaluate(data, timeout=timeout_s)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1

        tasks = []
        for i in range(calls):
            tasks.append(asyncio.ensure_future(one()))
            if i in sigterm_at:
                os.kill(proc.proc.pid, signal.SIGTERM)
            if not alive(proc.proc.pid):
                break
            await asyncio.sleep(0.005)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return codes


def test_a_second_signal_while_answers_are_held_stops_at_once_and_cleanly():
    """A second SIGTERM while the stop holds answers (calls still arriving: they are sent on a
    timer, not once answered) means "stop now": the server exits 0 at once, without a traceback
    (it raised InvalidStateError reading the quiet wait it had just cancelled, and exited 1)."""
    proc = start_server("--drain-s", "0.3", "--grace-s", "60")
    try:
        # 400 calls over 2 s; the second signal 0.35 s after the first: the drain (0.3 s) is over, answers are held
        asyncio.run(_calls_on_a_timer(proc, 400, 30, (40, 40 + 70)))
        assert proc.proc.wait(60) == 0, proc.log()
    finally:
        stop_everything(proc)
    assert "Traceback" not in proc.log(), proc.log()


def test_answers_held_by_a_stop_still_beat_their_deadlines():
    """While a stop holds answers (up to 0.5 s when calls keep arriving on a timer), a call whose
    deadline comes sooner is answered before it: 0.4 s calls ended DEADLINE_EXCEEDED (12-20 a stop
    in probe 12, whose answers were ready)."""
    proc = start_server("--drain-s", "0.3", "--grace-s", "60")
    try:
        codes = asyncio.run(_calls_on_a_timer(proc, 600, 0.4, (40,)))  # 600 calls over 3 s
        assert proc.proc.wait(60) == 0, proc.log()
    finally:
        stop_everything(proc)
    assert "answers held" in proc.log(), proc.log()
    assert codes["OK"] > 40 and codes["DEADLINE_EXCEEDED"] == 0, codes

def test_health_checks_and_server_info_polled_at_a_stop_are_answered_or_unavailable_never_cancelled():
    """Check and GetServerInfo are held at a stop as lossd's calls are, and count as call starts for
    its quiet wait: 16 clients of each polling without retries saw a CANCELLED in about half the
    stops (gRPC's stop cancels the calls its transport holds that the event loop has not taken)."""
    proc = start_server("--drain-s", "0.3", "--grace-s", "60")
    codes: collections.Counter = collections.Counter()

    async def poll() -> None:
        async with grpc.aio.insecure_channel(proc.address, options=[("grpc.enable_retries", 0)]) as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            check = channel.unary_unary("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest.SerializeToString)
            info = channel.unary_unary("/lossd.v1.LossService/GetServerInfo", lambda _: b"")

            async def keep(call, request) -> None:
                for _ in range(20_000):
                    if not alive(proc.proc.pid):
                        return
                    try:
                        await call(request, timeout=30)
                        codes["OK"] += 1
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] += 1
                        await asyncio.sleep(0.01)

            callers = [asyncio.ensure_future(keep(check, health_pb2.HealthCheckRequest())) for _ in range(16)]
            callers += [asyncio.ensure_future(keep(info, None)) for _ in range(16)]
            for _ in range(3000):
                if codes["OK"] >= 400:
                    break
                await asyncio.sleep(0.01)
            os.kill(proc.proc.pid, signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*callers), 90)

    try:
        asyncio.run(poll())
        assert proc.proc.wait(60) == 0, proc.log()
    finally:
        stop_everything(proc)
    assert codes["OK"] >= 400, codes
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes


@pytest.mark.parametrize("workers", ["1", "2"])
def test_stop_signals_that_arrive_as_the_stopped_server_exits_leave_its_exit_status_zero(workers):
    """An orchestrator may signal again while the server exits (a second SIGTERM): once stopped,
    the server (or the supervisor of --workers) ignores stop signals; the loop's close or Python's
    finalization had restored their default action, and one arriving then killed the process (exit
    status -15 instead of 0)."""
    proc = start_server("--workers", workers, "--drain-s", "0", "--grace-s", "5")
    pid = proc.proc.pid
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(120_000):  # the log's "stopped", polled every 0.5 ms (at most 60 s)
            if "INFO lossd: stopped" in proc.log() or "stopped (exit status" in proc.log() or proc.proc.poll() is not None:
                break
            time.sleep(0.0005)
        for _ in range(20_000):  # a signal every 0.5 ms until it has exited (at most 10 s)
            if proc.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            time.sleep(0.0005)
        assert proc.proc.wait(60) == 0, proc.log()
    finally:
        stop_everything(proc)
