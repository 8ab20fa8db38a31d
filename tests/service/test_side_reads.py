"""The messages of the methods beside lossd's own (health checks, GetServerInfo, reflection) are read
within a budget, as lossd's are: gRPC's transport takes a whole message of up to its receive limit
before any handler can refuse it, so 20 concurrent 100 MB health checks took an idle server from 249
to 1,015 MiB, counted nowhere. Health checks read within ``--max-health-reads`` of their own (apart
from the memory budget, so a probe never waits behind lossd's calls); GetServerInfo and reflection
within the memory budget. Real servers on loopback, each stopped by its PID.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from rpc_outcomes import outcome, wait_for_metric
from serverproc import start_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")

MiB = 1024 * 1024
RAW = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def serving(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def nothing_until(release: threading.Event) -> Iterator[bytes]:
    """A request stream that sends nothing until ``release`` (at most 60 s), then ends."""
    release.wait(60)
    yield from ()


def test_large_health_check_bodies_are_read_a_few_at_a_time():
    """16 concurrent health checks of 60 MB each (refused unparsed: a health request is a few bytes)
    used to be held all at once by gRPC's transport and their Python copies (+~1.3 GiB at peak);
    with --max-health-reads 1 they are read one at a time (each reserving twice the receive limit,
    2 x 65 MiB), and a probe is answered SERVING after them."""
    server = start_server("--max-message-bytes", str(32 * MiB), "--max-health-reads", "1")
    try:
        assert serving(server.address) == "SERVING"
        time.sleep(0.2)
        baseline = server.status_kib("VmRSS") / 1024
        body = b"\n\xff\xff\xff\x1c" + b"a" * 60_000_000
        with grpc.insecure_channel(server.address, options=RAW) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                outcomes = list(pool.map(lambda _: outcome(check.future(body, timeout=120)), range(16)))
        refused = f"INVALID_ARGUMENT: request: a HealthCheckRequest of {len(body)} bytes, more than the 4096 this server reads"
        assert outcomes == [refused] * 16
        growth = server.status_kib("VmHWM") / 1024 - baseline
        # one read: gRPC's copy and Python's of one 60 MB body, and allocator slack
        assert growth < 2 * 65 + 200, f"peak {growth:.0f} MiB over the server's resident set after warm-up"
        assert serving(server.address) == "SERVING"
    finally:
        server.stop()


def test_a_health_read_that_completes_nothing_gives_way_to_a_probe():
    """Health calls whose clients send nothing hold the only health read (--max-health-reads 1);
    a probe behind them waits in line, and they give their reads up after --idle-read-yield-s
    (RESOURCE_EXHAUSTED naming both settings) instead of holding the probe for the idle timeout."""
    server = start_server("--max-health-reads", "1", "--idle-read-yield-s", "0.5", "--stream-idle-timeout-s", "60")
    release = threading.Event()
    try:
        with grpc.insecure_channel(server.address) as channel:
            check = channel.stream_unary("/grpc.health.v1.Health/Check")
            idle = [check.future(nothing_until(release), timeout=60) for _ in range(2)]
            time.sleep(1.0)  # their reads are posted: one holds the health read, one waits in line
            assert serving(server.address) == "SERVING"
            gave_way = [outcome(f) for f in idle]
        for text in gave_way:
            assert text.startswith("RESOURCE_EXHAUSTED: this call gave way after its client completed no message"), text
            assert "idle_read_yield_s=0.5" in text and "max_health_reads=1" in text, text
    finally:
        release.set()
        server.stop()


def test_get_server_info_reads_within_the_memory_budget():
    """A budget of two reads, held by Evaluate calls whose clients send nothing: GetServerInfo waits
    in line for memory like any of lossd's reads (it was read outside the budget, whatever its size),
    and is answered once an idle call gives way."""
    server = start_server(
        "--max-message-bytes", str(MiB), "--memory-budget-bytes", str(12 * MiB), "--idle-read-yield-s", "3",
        "--stream-idle-timeout-s", "60", metrics=True,
    )  # fmt: skip
    release = threading.Event()
    try:
        with grpc.insecure_channel(server.address) as channel:
            evaluate = channel.stream_unary("/lossd.v1.LossService/Evaluate")
            idle = [evaluate.future(nothing_until(release), timeout=60) for _ in range(2)]
            assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 12 * MiB) == 12 * MiB
            info = channel.unary_unary(
                "/lossd.v1.LossService/GetServerInfo", pb.GetServerInfoRequest.SerializeToString, pb.ServerInfo.FromString
            )
            answer = info.future(pb.GetServerInfoRequest(), timeout=60)
            assert wait_for_metric(server, "lossd_memory_waiting_calls", lambda v: v >= 1 or answer.done()) == 1
            assert answer.result().max_receive_message_bytes == MiB
            release.set()
            assert any(outcome(f).startswith("RESOURCE_EXHAUSTED: this call gave way") for f in idle)
        assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
    finally:
        release.set()
        server.stop()


def test_a_reflection_stream_that_sends_nothing_is_ended_after_the_idle_timeout():
    """Reflection reads its requests as lossd's streams do: one whose client sends nothing is ended
    DEADLINE_EXCEEDED after --stream-idle-timeout-s (it was held until the client left), and a
    request that comes is answered as before."""
    server = start_server("--stream-idle-timeout-s", "1")
    release = threading.Event()
    try:
        with grpc.insecure_channel(server.address) as channel:
            info = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                reflection_pb2.ServerReflectionRequest.SerializeToString,
                reflection_pb2.ServerReflectionResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as idle:
                list(info(nothing_until(release), timeout=30))
            assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert idle.value.details() == "the client completed no ServerReflectionRequest message for stream_idle_timeout_s=1s"
            (reply,) = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
        assert "lossd.v1.LossService" in [s.name for s in reply.list_services_response.service]
    finally:
        release.set()
        server.stop()


def test_health_list_that_the_servicer_lacks_is_unimplemented_without_a_traceback():
    """grpc_health's aio servicer has no List of its own (the generated base raises
    NotImplementedError): every such call logged an ERROR traceback, a log any client could fill."""
    server = start_server()
    try:
        with grpc.insecure_channel(server.address) as channel:
            listing = channel.unary_unary("/grpc.health.v1.Health/List")
            outcomes = {outcome(listing.future(b"", timeout=30)) for _ in range(3)}
        assert len(outcomes) == 1 and outcomes.pop().startswith("UNIMPLEMENTED"), outcomes
        assert serving(server.address) == "SERVING"
    finally:
        server.stop()
    assert "Traceback" not in server.log() and "NotImplementedError" not in server.log()
