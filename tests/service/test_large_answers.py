"""Large answers leave the event loop to other calls, stop when their call does, and are the same
answers as before.

An answer over --inline-batch-bytes is written as wire bytes on a thread, a slice at a time, its
call checked between slices (lossd_server.answers). The request here is 27 bytes: 2^24 empty
sequences with sequence_stats, answered with 436 MB of per-sequence statistics. protobuf built that
answer in calls that each held the GIL for about half a second, then gRPC serialized it on the event
loop (1.1 s without a health check answered), and a call whose deadline passed meanwhile ran on to
the end (2.4 s of CPU after a 1 s deadline). Real servers on loopback. No duration is asserted: the
server's CPU time is compared with CPU time measured in the same test, on the same machine.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from health_checks import BackgroundHealthChecks
from lossd_client import compare, core
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client.types import LossRequest
from lossd_server.config import machine_memory_bytes
from rpc_outcomes import wait_for_metric
from serverproc import start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.servers import cpu_seconds  # noqa: E402

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/stat"), pytest.mark.slow]
#: One 2^24-sequence call reserves ~3.1 GiB of the memory budget (by default half the machine's).
big_memory = pytest.mark.skipif(machine_memory_bytes() < 8 * 2**30, reason="a 436 MB answer needs a 4 GiB memory budget")

SEQUENCES = 2**24
RAW = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
EVALUATE = "/lossd.v1.LossService/Evaluate"


def empty_sequences(n: int) -> bytes:
    """An Evaluate request of ``n`` empty sequences ((n, 5, 0) logits) asking for their statistics."""
    msg = pb.EvaluateRequest(options=pb.LossOptions(sequence_stats=True))
    msg.input.dtype, msg.target.dtype = pb.FLOAT32, pb.INT64
    msg.input.shape[:], msg.target.shape[:] = [n, 5, 0], [n, 0]
    return msg.SerializeToString()


def settled_cpu(pid: int, quiet_s: float = 0.5, timeout_s: float = 60.0) -> float:
    """The server's CPU seconds once it has stopped working (under 20 ms in ``quiet_s``)."""
    deadline = time.monotonic() + timeout_s
    last = cpu_seconds(pid)
    while True:
        time.sleep(quiet_s)
        now = cpu_seconds(pid)
        if now - last < 0.02 or time.monotonic() > deadline:
            return now
        last = now


@pytest.fixture(scope="module")
def big():
    """A server, and what one 2^24-sequence answer costs it once warm: (its CPU seconds, the
    engine's seconds, the handler's seconds)."""
    server = start_server(metrics=True)
    try:
        data, pid = empty_sequences(SEQUENCES), server.proc.pid
        with grpc.insecure_channel(server.address, options=RAW) as channel:
            evaluate = channel.unary_unary(EVALUATE)
            evaluate(data, timeout=300)  # warm: the allocator's first pages of each size
            before, metrics = settled_cpu(pid), server.metrics()
            evaluate(data, timeout=300)
            whole, after = settled_cpu(pid) - before, server.metrics()
        engine_s, handler_s = (
            after[name] - metrics[name] for name in ("lossd_compute_seconds_sum", 'lossd_request_latency_seconds_sum{method="Evaluate"}')
        )
        yield server, whole, engine_s, handler_s
    finally:
        server.stop()


@big_memory
def test_a_large_answer_leaves_the_event_loop_to_health_checks(big):
    """While the 436 MB answer is built and sent, no health check waits through as much user-mode
    CPU of any one server thread as protobuf takes to serialize that answer (measured here on the
    answer received, best of 3: 0.5-0.9 s on the hosts of this test), nor through one thread
    faulting in the pages of more than one copy of the answer: gRPC serialized the message on the
    event loop (the longest wait took 0.9-1.1 s of server CPU: protobuf's copy, then gRPC's), after
    protobuf had built it in calls that held the GIL (2.3 s of the loop's user-mode CPU in one wait
    when such an answer is built as a message). Now the longest is gRPC's own copy of the bytes.

    One thread, and user mode: the event loop, or a thread holding the GIL, is one thread, and its
    Python runs in user mode. The process's CPU also counts threads that run beside the loop without
    the GIL (torch's, gRPC core's), and kernel time varies with the machine's memory, not with this
    code: gRPC copies the answer into memory of its own on the event loop, 106,000 page faults of
    fresh memory, 0.17-0.22 s of the loop's system time here (a bare grpc.aio server returning 436 MB:
    0.16-0.25 s); a check in CI waited through 0.78 s of the process's CPU against a 0.72 s bound.
    So the copies are counted in page faults, and the CPU in user mode.

    The large call is made by a child process: the health checks' thread shares nothing with the
    client that receives the 436 MB (a check answered while this process's GIL was held by that
    client waited through 1.00 s of server CPU once, in CI, where 0.20-0.27 s is the rule)."""
    server, *_ = big
    with BackgroundHealthChecks(server.address, server.proc.pid, pause_s=0) as probe:
        start = time.monotonic()
        received = subprocess.run([sys.executable, "-c", _LARGE_CALL, server.address], capture_output=True, text=True, timeout=300)
        end = time.monotonic()
    assert received.returncode == 0, received.stderr
    sequences, answer_bytes, serialize_s = received.stdout.split()
    assert int(sequences) == SEQUENCES and probe.statuses == {health_pb2.HealthCheckResponse.SERVING}
    assert len(probe.waits) >= 5, probe.waits
    serialize_s, copy_pages = float(serialize_s), int(answer_bytes) / resource.getpagesize()
    main = server.proc.pid

    def longest(what: str) -> list[tuple]:
        """The 5 checks whose busiest server thread used the most ``what``: (that amount, which
        thread, the process's CPU meanwhile, when the check was sent from the call's start)."""
        rows = []
        for check in probe.checks:
            tid, used = check.busiest(what)
            rows.append(
                (
                    round(used, 2),
                    "event loop" if tid == main else f"thread {tid}",
                    round(check.server_cpu_s, 2),
                    round(check.sent - start, 2),
                )
            )
        return sorted(rows, reverse=True)[:5]

    cpu, faults = longest("user_s"), longest("minor_faults")
    context = f"(the longest waits, of a call of {end - start:.2f}s, in user CPU: {cpu}; in page faults: {faults})"
    assert cpu[0][0] < serialize_s, (
        f"a health check waited through {cpu[0][0]:.2f}s of one server thread's user-mode CPU; serializing the answer takes {serialize_s:.2f}s {context}"
    )
    assert faults[0][0] < 1.5 * copy_pages, (
        f"a health check waited while one server thread faulted in {faults[0][0]} pages; one copy of the answer is {copy_pages:.0f} {context}"
    )


#: A child process's large call (the request of :func:`empty_sequences`); it prints the answer's
#: sequence count, its size in bytes and the CPU seconds protobuf takes to serialize it (best of 3).
_LARGE_CALL = f"""
import sys, time, grpc
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
msg = pb.EvaluateRequest(options=pb.LossOptions(sequence_stats=True))
msg.input.dtype, msg.target.dtype = pb.FLOAT32, pb.INT64
msg.input.shape[:], msg.target.shape[:] = [{SEQUENCES}, 5, 0], [{SEQUENCES}, 0]
with grpc.insecure_channel(sys.argv[1], options={RAW!r}) as channel:
    answer = channel.unary_unary({EVALUATE!r})(msg.SerializeToString(), timeout=300)
response = pb.EvaluateResponse.FromString(answer)

def serialize_cpu():
    start = time.thread_time()
    response.SerializeToString()
    return time.thread_time() - start

print(len(response.sequences.is_greedy), len(answer), min(serialize_cpu() for _ in range(3)))
"""


@big_memory
@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_large_answer_stops_being_built_when_its_call_ends(big, how):
    """A call whose deadline passes (or whose client cancels) while its answer is built costs the
    server little after it: under half the CPU of a whole call. The stop comes after the engine's end,
    while the answer is built: the encoding ran on to its end (3.4-3.6 s of CPU after the stop, of
    4.2 s for a whole call); now it stops at its next slice (0-0.1 s). The server counts the call as
    the client saw it."""
    server, whole, engine_s, handler_s = big
    with grpc.insecure_channel(server.address, options=RAW) as channel:
        ended, stop_s = _stopped_while_the_answer_is_built(server, channel.unary_unary(EVALUATE), how, engine_s, handler_s)
        after = settled_cpu(server.proc.pid) - ended
    assert after < whole / 2, f"{after:.2f}s of server CPU after the call ended (the whole call: {whole:.2f}s; stopped at {stop_s:.2f}s)"


ENGINE_RUNS = "lossd_compute_seconds_count"
ENGINE_SECONDS = "lossd_compute_seconds_sum"
ABANDONED = "lossd_abandoned_evaluations_total"
HANDLER_RUNS = 'lossd_request_latency_seconds_count{method="Evaluate"}'
HANDLER_SECONDS = 'lossd_request_latency_seconds_sum{method="Evaluate"}'
CODES = ("OK", "CANCELLED", "DEADLINE_EXCEEDED")


def _stopped_while_the_answer_is_built(server, evaluate, how: str, engine_s: float, handler_s: float) -> tuple[float, float]:
    """End one call while the server builds its answer, by its deadline or by the client's cancel;
    return the server's CPU seconds when the client saw it end, and the seconds from the call's
    start. The server must have counted the call with the client's code.

    Where the stop was early (it stopped the engine: nothing to learn about the answer) or late (the
    server had answered: the client saw the end while the answer was on the wire) the call is made
    again, 6 times at most. The engine's time for the same call varies by tenths of a second on a
    shared machine (0.54-0.89 s in five calls in a row where the answer took another 0.5 s; CI
    failed when the stop was set from another call's times): a cancel is sent once the server
    counts the call's engine step; a deadline, fixed at the call's start, aims at the middle of the
    answer's time, from the latest answered call's times, kept between the deadlines that came too
    early and too late."""
    pid, data, tries = server.proc.pid, empty_sequences(SEQUENCES), []
    code = grpc.StatusCode.DEADLINE_EXCEEDED if how == "deadline" else grpc.StatusCode.CANCELLED
    too_early, too_late = 0.0, float("inf")
    stop_s = (engine_s + handler_s) / 2
    for _ in range(6):
        settled_cpu(pid)
        before = server.metrics()
        start = time.monotonic()
        if how == "deadline":
            try:
                evaluate(data, timeout=stop_s)
                seen = grpc.StatusCode.OK
            except grpc.RpcError as err:
                seen = err.code()
        else:
            future = evaluate.future(data, timeout=300)
            runs = before.get(ENGINE_RUNS, 0.0)
            wait_for_metric(server, ENGINE_RUNS, lambda v, runs=runs: v > runs, timeout_s=120)
            seen = code if future.cancel() else grpc.StatusCode.OK
            stop_s = time.monotonic() - start
        ended = cpu_seconds(pid)
        step = _call_figures(server, before)
        counted = [name for name in CODES if step[name]]
        assert seen in (code, grpc.StatusCode.OK) and len(counted) == 1, (seen, step)
        if seen == code and counted == [code.name] and not step[ABANDONED]:
            return ended, stop_s
        if seen == code and counted == [code.name]:
            tries.append(f"stopped at {stop_s:.2f}s in the engine ({step[ENGINE_SECONDS]:.2f}s)")
            too_early = stop_s
        else:
            assert counted == ["OK"], f"the client saw {seen.name}, the server counted {counted}"
            tries.append(f"stopped at {stop_s:.2f}s: answered (engine {step[ENGINE_SECONDS]:.2f}s, handler {step[HANDLER_SECONDS]:.2f}s)")
            too_late, engine_s, handler_s = stop_s, step[ENGINE_SECONDS], step[HANDLER_SECONDS]
        stop_s = (engine_s + handler_s) / 2
        if not too_early < stop_s < too_late:
            stop_s = (too_early + too_late) / 2 if too_late < float("inf") else too_early + (handler_s - engine_s) / 2
    pytest.fail("no stop fell while the answer was built: " + "; ".join(tries))


def _call_figures(server, before: dict[str, float]) -> dict[str, float]:
    """The change since ``before`` of the engine's and handler's figures and of the Evaluate calls
    counted by code, once the engine step and the handler of the call made since have been counted
    (the handler's time is counted for every outcome)."""
    for runs in (ENGINE_RUNS, HANDLER_RUNS):
        wait_for_metric(server, runs, lambda v, runs=runs: v > before.get(runs, 0.0), timeout_s=120)
    now = server.metrics()
    names = {name: name for name in (ENGINE_SECONDS, HANDLER_SECONDS, ABANDONED)}
    names.update({code: f'lossd_requests_total{{code="{code}",method="Evaluate"}}' for code in CODES})
    return {key: now.get(name, 0.0) - before.get(name, 0.0) for key, name in names.items()}


def differential_requests():
    """Evaluate requests whose answers take from a few bytes to 16 MB, one an error."""
    rng = np.random.default_rng(0)
    lm = rng.standard_normal((16, 64, 50), dtype=np.float32)
    tokens = rng.integers(0, 50, (16, 64))
    extras = ("target_logprob", "entropy", "target_rank", "argmax_correct")
    yield LossRequest(rng.standard_normal((8, 5), dtype=np.float32), rng.integers(0, 5, 8), id="small")
    yield LossRequest(lm, tokens, reduction="none", class_axis=-1, shift_targets=True, extras=extras, sequence_stats=True, id="lm")
    yield LossRequest(np.empty((300_000, 0, 5), np.float32), np.empty((300_000, 0), np.uint8), class_axis=-1, sequence_stats=True, id="seq")
    kl = (rng.standard_normal((1024, 1)), rng.random((1, 4096)))
    yield LossRequest(kl[0].astype(np.float32), kl[1].astype(np.float32), "kl_div", reduction="none", id="kl")
    yield LossRequest(rng.standard_normal((4, 5), dtype=np.float32), np.array([0, 1, 9, 2]), id="bad")  # class 9 of 5


def answers_of(address: str) -> list[bytes]:
    """Every method's answers to differential_requests, each parsed and written again
    deterministically (protobuf's map order is its own)."""
    requests = [core.build(r)[0] for r in differential_requests()]
    data = [m.SerializeToString() for m in requests]
    cmp = compare.CompareInputs(*np.random.default_rng(1).standard_normal((2, 256, 2000), dtype=np.float32), np.arange(256) % 7, top_k=8)
    out: list[bytes] = []
    with grpc.insecure_channel(address, options=RAW) as ch:

        def unary(method: str, kind, message: bytes) -> None:
            try:
                out.append(kind.FromString(ch.stream_unary(f"/lossd.v1.LossService/{method}")(iter([message]), timeout=120)))
            except grpc.RpcError as err:
                out.append(pb.EvaluateResponse(id=f"{err.code().name}: {err.details()}"))

        for message in data:
            unary("Evaluate", pb.EvaluateResponse, message)
        stream = ch.stream_stream("/lossd.v1.LossService/EvaluateStream")(iter(data), timeout=120)
        out += sorted((pb.EvaluateResponse.FromString(a) for a in stream), key=lambda r: r.id)
        packed = ch.stream_stream("/lossd.v1.LossService/EvaluatePacked")
        batch = pb.EvaluateBatch(requests=requests).SerializeToString()
        out += [pb.EvaluateBatchResults.FromString(a) for a in packed(iter([batch, batch]), timeout=120)]
        for r in list(differential_requests())[:-1]:
            chunks = list(core.chunk_payloads(r, chunk_bytes=1 << 20))
            out.append(pb.EvaluateResponse.FromString(ch.stream_unary("/lossd.v1.LossService/EvaluateChunked")(iter(chunks), timeout=120)))
        unary("Compare", pb.CompareResponse, compare.request(cmp).SerializeToString())
        chunks = list(compare.payloads(cmp, chunk_bytes=1 << 20))
        out.append(pb.CompareResponse.FromString(ch.stream_unary("/lossd.v1.LossService/CompareChunked")(iter(chunks), timeout=120)))
    return [m.SerializeToString(deterministic=True) for m in out]


def test_answers_built_on_a_thread_are_the_messages_protobuf_builds():
    """Every method answers the same whether its answers are built as messages for gRPC to
    serialize (--inline-batch-bytes 1 GiB: every answer small, as before), written as bytes on a
    thread (0: every answer large), or some of each (the default, 1 MiB: an EvaluatePacked
    message of items of both kinds)."""
    servers = [start_server("--inline-batch-bytes", str(n)) for n in (1 << 30, 0, 1 << 20)]
    try:
        messages, *others = (answers_of(s.address) for s in servers)
    finally:
        for s in servers:
            s.stop()
    assert len(messages) == 5 + 5 + 2 + 4 + 2
    for answers in others:
        assert answers == messages
