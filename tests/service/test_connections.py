"""Connections and the files they hold, against real servers on loopback: an idle connection is
closed (GOAWAY) and its client reconnects on its next call; a connection that never starts
HTTP/2 is closed; the soft limit on open files is raised to the hard one at start-up. Every
wait is bounded; every server is stopped by its PID."""

from __future__ import annotations

import asyncio
import resource
import socket
import sys
import threading
import time

import grpc
import pytest
import torch
import torch.nn.functional as F
from lossd_client import AsyncLossClient, LossClient
from serverproc import start_server
from workerprocs import own_ports, stop_everything, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
GOAWAY = 7


def _read_until_closed(sock: socket.socket, timeout_s: float) -> bytes | None:
    """Everything the server sends until it closes the connection; None if it is still open after
    ``timeout_s``."""
    received = b""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data
    return None


def _frame_types(data: bytes) -> list[int]:
    """The type of each HTTP/2 frame in ``data`` (9-byte headers: length, type, flags, stream)."""
    types, at = [], 0
    while at + 9 <= len(data):
        types.append(data[at + 3])
        at += 9 + int.from_bytes(data[at : at + 3], "big")
    return types


def test_an_idle_connection_is_closed_with_goaway():
    """A client that sends the HTTP/2 preface and SETTINGS and then nothing used to hold its
    connection (and a file) for ever: 300 of them under a 256-file limit refused every new
    connection, health checks included, for as long as they stayed."""
    proc = start_server("--max-connection-idle-s", "1")
    try:
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
            sock.sendall(PREFACE + SETTINGS + SETTINGS_ACK)
            received = _read_until_closed(sock, timeout_s=30)
    finally:
        assert proc.stop() == 0, proc.log()
    assert received is not None, "the idle connection is still open after 30 s"
    assert GOAWAY in _frame_types(received), _frame_types(received)


def test_a_client_keeps_working_across_the_idle_close():
    """The control: the server closes a LossClient's connection once it is idle, and the client's
    next call opens a new one and is answered."""
    proc = start_server("--max-connection-idle-s", "1")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    want = F.cross_entropy(x, t)
    try:
        with LossClient(proc.address) as client:
            torch.testing.assert_close(client.cross_entropy(x, t), want)
            first = own_ports(proc.port)
            assert first, "the client holds no connection to the server"
            wait_for(lambda: not own_ports(proc.port) & first, timeout_s=30, what="the server to close the idle connection")
            torch.testing.assert_close(client.cross_entropy(x, t), want)
            assert own_ports(proc.port) - first, "the second call did not open a new connection"
    finally:
        assert proc.stop() == 0, proc.log()


def test_a_connection_that_never_starts_http2_is_closed():
    """One that sends nothing is closed after the handshake timeout (--handshake-timeout-s, 10 s by
    default; gRPC's default closed it at 60 s), with the idle timeout off so that it is not what
    closes it. The setting is what closes it: at that moment a connection to a server with a 60 s
    handshake timeout, silent as long, is still open."""
    short = start_server("--max-connection-idle-s", "0", "--handshake-timeout-s", "1", "--drain-s", "0")
    long = start_server("--max-connection-idle-s", "0", "--handshake-timeout-s", "60", "--drain-s", "0")
    try:
        with socket.create_connection(("127.0.0.1", long.port), timeout=10) as control:
            with socket.create_connection(("127.0.0.1", short.port), timeout=10) as sock:
                received = _read_until_closed(sock, timeout_s=30)
            control_left_open = _read_until_closed(control, timeout_s=0.01) is None
    finally:
        assert short.stop() == 0, short.log()
        assert long.stop() == 0, long.log()
    assert received is not None, "the silent connection is still open after 30 s (handshake timeout 1 s)"
    assert control_left_open, "the server with a 60 s handshake timeout closed its silent connection as soon"


def _open_files_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) 'Max open files' of a process, from /proc/<pid>/limits."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


LOW_SOFT_LIMIT = 256
HARD_LIMIT = 4096  # the child's hard limit, or the test's own if lower (a number, never unlimited)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_soft_open_files_limit_is_raised_to_the_hard_one(workers):
    """Started with a soft limit of 256 files under a higher hard limit, the server (and with
    --workers, every worker) runs with the hard limit: the soft one is what an attack on
    connections (or plenty of honest clients) runs into first."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = HARD_LIMIT if hard == resource.RLIM_INFINITY else min(hard, HARD_LIMIT)
    if hard <= LOW_SOFT_LIMIT:
        pytest.skip(f"the hard open files limit here ({hard}) leaves nothing to raise")

    # the child lowers its own soft limit, then runs lossd_server (a preexec_fn would fork this
    # process, gRPC threads and all: see lossd_server.spawn.spawn)
    low_soft_limit = (
        "import resource, runpy; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({LOW_SOFT_LIMIT}, {hard})); "
        "runpy.run_module('lossd_server', run_name='__main__', alter_sys=True)"
    )
    proc = start_server("--workers", workers, program=("-c", low_soft_limit))
    try:
        pids = [proc.proc.pid, *proc.worker_pids().values()]
        assert len(pids) == (1 if workers == "1" else 3), proc.log()
        limits = {pid: _open_files_limits(pid) for pid in pids}
    finally:
        assert stop_everything(proc) == 0, proc.log()
    for pid, (soft_now, hard_now) in limits.items():
        assert soft_now == hard_now == hard, (pid, limits, proc.log())
    assert proc.log().count(f"raised from {LOW_SOFT_LIMIT}") == 1, proc.log()


def _silent_calls(channel, count: int, release: threading.Event) -> list:
    """``count`` EvaluateChunked calls on ``channel`` whose client sends nothing until ``release``."""

    def nothing():
        release.wait(60)
        return
        yield b""

    call = channel.stream_unary("/lossd.v1.LossService/EvaluateChunked")
    return [call.future(nothing(), timeout=60) for _ in range(count)]


def _in_flight(server, method: str) -> float:
    return server.metrics().get(f'lossd_requests_in_flight{{method="{method}"}}', 0.0)


def test_calls_past_max_concurrent_calls_are_refused_at_once_and_their_slots_come_back():
    """Each call holds gRPC and Python state before it reads a byte: past --max-concurrent-calls a
    new call is refused RESOURCE_EXHAUSTED instead of being held (80,000 calls that sent nothing
    took a server on a 600 MiB budget to 1,061 MiB)."""
    server = start_server("--max-concurrent-calls", "3", "--stream-idle-timeout-s", "60", metrics=True)
    release = threading.Event()
    try:
        with grpc.insecure_channel(server.address) as channel:
            silent = _silent_calls(channel, 3, release)
            assert wait_for(lambda: _in_flight(server, "EvaluateChunked") == 3, 30)
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary("/lossd.v1.LossService/GetServerInfo")(b"", timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            for call in silent:
                with pytest.raises(grpc.RpcError):
                    call.result(timeout=30)  # no message: INVALID_ARGUMENT
        with LossClient(server.address, timeout_s=60) as client:
            x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
            torch.testing.assert_close(client.cross_entropy(x, y), F.cross_entropy(x, y))
    finally:
        release.set()
        server.stop()


def _check(channel, service: str = "") -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _watch(channel, service: str = ""):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=60)


def test_health_checks_are_answered_while_every_call_slot_is_taken():
    """Health checks have slots of their own: counted with lossd's calls, they were refused
    RESOURCE_EXHAUSTED while --max-concurrent-calls was full, and a gRPC liveness probe restarted a
    pod that was only at its call limit (or whose slots an attacker held), cutting every call."""
    server = start_server("--max-concurrent-calls", "3", "--stream-idle-timeout-s", "60", metrics=True)
    release = threading.Event()
    try:
        with grpc.insecure_channel(server.address) as channel:
            silent = _silent_calls(channel, 3, release)
            assert wait_for(lambda: _in_flight(server, "EvaluateChunked") == 3, 30)
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary("/lossd.v1.LossService/GetServerInfo")(b"", timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == (
                "this server process already serves max_concurrent_calls (3) calls; retry later, or on another replica (--max-concurrent-calls)"
            )
            assert _check(channel) == _check(channel, "lossd.v1.LossService") == "SERVING"
            watch = _watch(channel)
            assert next(watch).status == 1  # SERVING
            watch.cancel()
            with LossClient(server.address, timeout_s=30) as client:
                assert client.health() == "SERVING"
            assert _in_flight(server, "EvaluateChunked") == 3  # still held: the checks took none of them
            release.set()
            for call in silent:
                with pytest.raises(grpc.RpcError):
                    call.result(timeout=30)  # no message: INVALID_ARGUMENT
    finally:
        release.set()
        assert server.stop() == 0, server.log()


def test_a_full_health_pool_refuses_health_checks_and_no_call():
    """The health slots are bounded too (as many as --max-concurrent-calls), or Watch streams would
    hold server state without limit; lossd's calls do not share them."""
    server = start_server("--max-concurrent-calls", "2", "--stream-idle-timeout-s", "60")
    try:
        with grpc.insecure_channel(server.address) as channel:
            watches = [_watch(channel) for _ in range(2)]
            assert [next(w).status for w in watches] == [1, 1]  # both SERVING: both hold a health slot
            with pytest.raises(grpc.RpcError) as refused:
                _check(channel)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "already serves 2 health checks" in refused.value.details(), refused.value.details()
            with pytest.raises(grpc.RpcError) as refused:
                next(_watch(channel))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
            with LossClient(server.address, timeout_s=60) as client:
                assert client.server_info().version
                torch.testing.assert_close(client.cross_entropy(x, y), F.cross_entropy(x, y))
            for watch in watches:
                watch.cancel()

            def answered() -> bool:
                try:
                    return _check(channel) == "SERVING"
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    return False

            assert wait_for(answered, 30, "the health slots to come back")
    finally:
        assert server.stop() == 0, server.log()


def test_thousands_of_concurrent_calls_on_one_connection_all_succeed():
    """No limit per connection: with gRPC's grpc.max_concurrent_streams at 1,000 the server refused
    streams past it (RST_STREAM REFUSED_STREAM: UNAVAILABLE to the client) instead of the client
    queuing them; of 2,500 concurrent chunked calls of one AsyncLossClient, some failed and the rest
    took 69 s instead of 4.5 s. Chunked calls, which the client cannot replay once refused."""
    server = start_server()
    try:
        gen = torch.Generator().manual_seed(3)
        x, y = torch.randn(1600, 10, generator=gen), torch.randint(0, 10, (1600,), generator=gen)  # 64 KB
        want = F.cross_entropy(x, y, reduction="none")

        async def main() -> list:
            async with AsyncLossClient(server.address, timeout_s=120, connections=1, chunked_above_bytes=0) as client:
                calls = (client.cross_entropy(x, y, reduction="none") for _ in range(1_500))
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(main())
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of 1500 failed, first: {failed[0]!r}"
        assert all(torch.equal(r, want) for r in results)
    finally:
        server.stop()
