"""Hostile and heavy input against real servers on loopback: work bounded by bytes, one memory
budget for everything held, nothing kept after a call, SIGTERM that loses nothing, clear
start-up errors. Every loop is bounded in count and time; every server is stopped by its PID.

Peak memory is the server's VmHWM (/proc/PID/status) against its resident set after warm-up:
it must stay within --memory-budget-bytes whatever the load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lossd_client import LossClient, LossdError, LossRequest, core, tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from rpc_outcomes import outcome, trailing_metadata, wait_for_metric
from serverproc import HOG_FLAGS, EngineHog, ServerProcess, start_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")

MiB = 1024 * 1024
BUDGET = 1100 * MiB  # the smallest budget that fits two reads of 64 MiB messages (2 x 516 MiB)
IDLE_S = "3"
#: Calls that must all succeed wait their turn for memory this long; far longer than a turn takes.
PATIENT_WAIT_S = "300"
RAW = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def status_mib(server: ServerProcess, key: str) -> float:
    return server.status_kib(key) / 1024


def health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def request_msg(x: np.ndarray, t: np.ndarray, **options) -> pb.EvaluateRequest:
    msg = pb.EvaluateRequest(options=pb.LossOptions(**options))
    tensors.to_proto(x, msg.input)
    tensors.to_proto(t, msg.target)
    return msg


def a_good_call_still_works(address: str) -> None:
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    t = np.array([0, 1, 2, 3, 0])
    with LossClient(address, timeout_s=60) as client:
        got = client.cross_entropy(x, t)
    assert float(got) == pytest.approx(float(F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t))), rel=1e-6)
    assert health(address) == "SERVING"


def budgeted_server(memory_wait_s: str, *flags: str, budget: int = BUDGET) -> Iterator[tuple[ServerProcess, float]]:
    """A server with a small budget and a short idle timeout; yields (server, baseline RSS MiB)."""
    proc = start_server(
        "--memory-budget-bytes", str(budget), "--stream-idle-timeout-s", IDLE_S, "--max-memory-wait-s", memory_wait_s, *flags, metrics=True
    )
    try:
        a_good_call_still_works(proc.address)
        time.sleep(0.2)
        yield proc, status_mib(proc, "VmRSS")
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def budgeted():
    """Calls wait in line for memory as long as their deadline allows (a turn may take seconds on
    a loaded machine)."""
    yield from budgeted_server(PATIENT_WAIT_S)


def assert_within_budget(server: ServerProcess, baseline_mib: float, budget: int = BUDGET) -> None:
    peak = status_mib(server, "VmHWM")
    assert peak - baseline_mib <= budget / MiB, f"peak {peak:.0f} MiB is {peak - baseline_mib:.0f} MiB over the baseline {baseline_mib:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# 1. work bounded by bytes


ZERO_ELEMENT_CASES = [
    ("bce [2^62, 0]", (2**62, 0), (2**62, 0), np.float32, {"loss": pb.BINARY_CROSS_ENTROPY_WITH_LOGITS}),
    ("cross_entropy (2^34, 5, 0)", (2**34, 5, 0), (2**34, 0), np.int64, {}),
    ("LM logits (2^31, 0, 32000), class_axis=-1", (2**31, 0, 32000), (2**31, 0), np.int64, {"class_axis": -1}),
    ("probabilities (2^40, 7, 0)", (2**40, 7, 0), (2**40, 7, 0), np.float32, {}),
    # no rows of 2^40 classes: torch answers; lossd refused them RESOURCE_EXHAUSTED for the working
    # memory of rows they do not have ("needs 17592169270275 bytes ... split it", probe 13 F4)
    ("cross_entropy (0, 2^40), class_axis=-1", (0, 2**40), (0,), np.int64, {"class_axis": -1}),
    ("cross_entropy (0, 2^40, 3)", (0, 2**40, 3), (0, 3), np.int64, {}),
    ("LM logits (2, 0, 2^40), class_axis=-1", (2, 0, 2**40), (2, 0), np.int64, {"class_axis": -1}),
    ("probabilities (0, 2^40)", (0, 2**40), (0, 2**40), np.float32, {}),
    ("bce (0, 2^40)", (0, 2**40), (0, 2**40), np.float32, {"loss": pb.BINARY_CROSS_ENTROPY_WITH_LOGITS}),
]


@pytest.mark.parametrize("name,in_shape,t_shape,t_dtype,options", ZERO_ELEMENT_CASES, ids=[c[0] for c in ZERO_ELEMENT_CASES])
@pytest.mark.parametrize("reduction", [pb.MEAN, pb.SUM, pb.NONE])
@pytest.mark.parametrize("rpc", ["unary", "chunked"])
def test_zero_element_shapes_with_huge_dims_are_answered_at_once(budgeted, name, in_shape, t_shape, t_dtype, options, reduction, rpc):
    """A few dozen bytes describing 2^62 empty rows: torch's result at once (a 20 s deadline)."""
    server, _ = budgeted
    t_wire = pb.FLOAT32 if t_dtype == np.float32 else pb.INT64
    target = pb.Tensor(dtype=t_wire, shape=t_shape)  # no data: zero elements
    opts = pb.LossOptions(reduction=reduction, **options)
    with grpc.insecure_channel(server.address, options=RAW) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        if rpc == "unary":
            msg = pb.EvaluateRequest(input=pb.Tensor(dtype=pb.FLOAT32, shape=in_shape), target=target, options=opts)
            assert msg.ByteSize() < 100
            reply = stub.Evaluate(msg, timeout=20)
        else:
            header = pb.ChunkHeader(input_dtype=pb.FLOAT32, input_shape=in_shape, target=target, options=opts)
            reply = stub.EvaluateChunked(iter([pb.EvaluateChunk(header=header)]), timeout=20)
    got = core.parse(reply, as_torch=True).loss
    red = {pb.MEAN: "mean", pb.SUM: "sum", pb.NONE: "none"}[reduction]
    bce = options.get("loss") == pb.BINARY_CROSS_ENTROPY_WITH_LOGITS
    if red == "none":  # torch takes seconds to build these empty outputs; their shape and dtype are its rule
        assert got.dtype == torch.float32 and got.numel() == 0
        assert tuple(got.shape) == (in_shape if bce else t_shape[:1] + t_shape[2:] if t_shape == in_shape else t_shape)
    else:
        xt, tt = torch.empty(in_shape), torch.empty(t_shape, dtype=torch.float32 if t_dtype == np.float32 else torch.int64)
        if options.get("class_axis") == -1:
            xt = xt.movedim(-1, 1)
        fn = F.binary_cross_entropy_with_logits if bce else F.cross_entropy
        torch.testing.assert_close(got, fn(xt, tt, reduction=red), equal_nan=True)
    a_good_call_still_works(server.address)


def test_an_answer_over_the_send_limit_is_refused_before_compute():
    server = start_server("--max-send-message-bytes", "65536", metrics=True)
    try:
        rows_before = server.metrics().get("lossd_rows_total", 0.0)
        x = np.zeros((100, 200), np.float32)  # reduction='none' BCE: an 80 KB answer
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Evaluate(request_msg(x, x, loss=pb.BINARY_CROSS_ENTROPY_WITH_LOGITS, reduction=pb.NONE), timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_send_message_bytes" in info.value.details()
            # sequence statistics of 2^34 empty sequences: zero bytes in, 2^34 entries out
            seq = request_msg(np.zeros((2**34, 0, 5), np.float32), np.zeros((2**34, 0), np.int64), class_axis=-1, sequence_stats=True)
            with pytest.raises(grpc.RpcError) as info:
                stub.Evaluate(seq, timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_send_message_bytes" in info.value.details()
        assert server.metrics().get("lossd_rows_total", 0.0) == rows_before, "nothing may be computed"
        a_good_call_still_works(server.address)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def slow_engine():
    """Chunks of one row: a 200k-row request takes the engine seconds, in 200k checkpointed steps."""
    proc = start_server("--chunk-bytes", "32", "--max-wait-ms", "0", metrics=True)
    yield proc
    proc.stop()


def slow_request() -> pb.EvaluateRequest:
    rng = np.random.default_rng(3)
    return request_msg(rng.standard_normal((200_000, 8), dtype=np.float32), rng.integers(0, 8, 200_000))


def test_a_cancelled_call_stops_computing(slow_engine):
    before = slow_engine.metrics().get("lossd_abandoned_evaluations_total", 0.0)
    with grpc.insecure_channel(slow_engine.address, options=RAW) as channel:
        future = pb_grpc.LossServiceStub(channel).Evaluate.future(slow_request(), timeout=120)
        # wait until the engine has it: received, not queued
        wait_for_metric(slow_engine, 'lossd_requests_in_flight{method="Evaluate"}', lambda v: v >= 1)
        wait_for_metric(slow_engine, "lossd_received_bytes_total{method=\"Evaluate\"}", lambda v: v >= 6_400_000)
        wait_for_metric(slow_engine, "lossd_batches_computing", lambda v: v >= 1)
        future.cancel()
    after = wait_for_metric(slow_engine, "lossd_abandoned_evaluations_total", lambda v: v > before)
    assert after == before + 1, "the engine must stop between chunks once the caller went away"
    a_good_call_still_works(slow_engine.address)


def test_a_deadline_passed_during_compute_stops_computing(slow_engine):
    """Either the deadline passes while computing (the engine stops between chunks) or, on a
    slow machine, before compute began (then it is never computed): never computed to the end."""
    before = slow_engine.metrics()
    with grpc.insecure_channel(slow_engine.address, options=RAW) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.LossServiceStub(channel).Evaluate(slow_request(), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for_metric(slow_engine, 'lossd_requests_in_flight{method="Evaluate"}', lambda v: v == 0)
    time.sleep(0.5)
    after = slow_engine.metrics()
    abandoned = after.get("lossd_abandoned_evaluations_total", 0.0) - before.get("lossd_abandoned_evaluations_total", 0.0)
    batches = after.get("lossd_batch_requests_count", 0.0) - before.get("lossd_batch_requests_count", 0.0)
    assert (abandoned, batches) in ((1, 1), (0, 0)), (abandoned, batches)
    a_good_call_still_works(slow_engine.address)


# ---------------------------------------------------------------------------------------------
# 2. one memory budget


def big_unary(rows: int = 512, classes: int = 32000, bad_target: bool = False) -> tuple[pb.EvaluateRequest, torch.Tensor]:
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, classes), dtype=np.float32)
    t = rng.integers(0, classes, rows)
    want = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t))
    if bad_target:
        t[3] = classes + 5
    return request_msg(x, t), want


def test_32_concurrent_large_unary_calls_wait_for_the_budget_and_all_succeed(budgeted):
    server, baseline = budgeted
    msg, want = big_unary()  # 512 x 32000 fp32: 62.5 MiB
    with grpc.insecure_channel(server.address, options=RAW) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        futures = [stub.Evaluate.future(msg, timeout=300) for _ in range(32)]
        replies = [f.result() for f in futures]
    for reply in replies:
        torch.testing.assert_close(core.parse(reply, as_torch=True).loss, want)
    assert_within_budget(server, baseline)
    assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0


@pytest.mark.parametrize("target_dtype, shift, weighted", [(np.uint8, False, False), (np.int64, True, False), (np.uint8, False, True)])
def test_a_queued_request_counts_its_decoded_class_targets(target_dtype, shift, weighted):
    """uint8 class targets are copied to int64 (8x their bytes) and shifted ones copied once more;
    a request waiting in the batcher's queue holds those copies, so they are counted in the budget
    (they were not: ten 60 MB uint8-target requests held 2.7 GiB on a 1 GiB budget)."""
    rows = 1_000_000
    x = np.zeros((1, rows, 1) if shift else (rows, 1), np.float16)
    t = np.zeros((1, rows) if shift else (rows,), target_dtype)
    msg = request_msg(x, t, class_axis=-1 if shift else 1, shift_targets=shift)
    if weighted:  # summing the counted targets' weights gathers and masks them (in float32), and copies the indices
        tensors.to_proto(np.ones(1, np.float16), msg.options.weight)
    server = start_server(*HOG_FLAGS, metrics=True)
    try:
        with EngineHog(server), grpc.insecure_channel(server.address, options=RAW) as channel:
            before = server.metrics()["lossd_memory_held_bytes"]
            queued = channel.unary_unary("/lossd.v1.LossService/Evaluate").future(msg.SerializeToString(), timeout=120)
            depth = 0.0
            for _ in range(600):  # bounded: until it waits in the queue behind the hog
                depth = server.metrics().get("lossd_queue_depth", 0.0)
                if depth == 1:
                    break
                time.sleep(0.05)
            assert depth == 1
            held = server.metrics()["lossd_memory_held_bytes"] - before
            copies = 8 * ((target_dtype != np.int64) + shift) + 1 + (8 + 4 + 4 if weighted else 0)  # int64 copies, mask, weights
            assert held >= x.nbytes + t.nbytes + copies * rows, (held, copies)
            queued.cancel()
        a_good_call_still_works(server.address)
    finally:
        server.stop()

def test_calls_whose_answers_do_not_fit_now_wait_for_them_and_all_succeed():
    """Eight requests whose answers (per-token losses and four extras, ~120 MB each) fit the
    budget only a few at a time: after reading, each waits in line to reserve its answer, as a
    read waits (3 or 4 of 8 used to be refused RESOURCE_EXHAUSTED at once)."""
    server = start_server("--memory-budget-bytes", str(600 * MiB), "--max-message-bytes", str(16 * MiB), metrics=True)
    try:
        baseline = status_mib(server, "VmRSS")
        rng = np.random.default_rng(11)
        x = rng.standard_normal((1 << 20, 2)).astype(np.float32)
        t = rng.integers(0, 2, 1 << 20)
        msg = request_msg(x, t, reduction=pb.NONE, extras=[1, 2, 3, 4])
        with grpc.insecure_channel(server.address, options=RAW) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            futures = [stub.Evaluate.future(msg, timeout=120) for _ in range(8)]
            outcomes = [outcome(f) for f in futures]
        assert outcomes == ["OK"] * 8, outcomes
        assert status_mib(server, "VmHWM") - baseline <= 600, "over the budget"
        assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
    finally:
        server.stop()


#: What reading one message reserves: twice gRPC's receive limit, 2 x (2 x 64 MiB + 1 MiB)
#: (ServerConfig.read_reservation_bytes).
READ = 2 * (2 * 64 * MiB + MiB)
#: Rows of the stalled calls' chunk header: 7,000,000 int64 class indices, a 56 MB message whose
#: targets take 84 MB more to decode (a 140 MB header, held while the call reads its next chunk).
HEADER_ROWS = 7_000_000
#: Two reads and 96 MiB: more than a header message, less than a header message and its decoding.
STALLED_BUDGET = 2 * READ + 96 * MiB


@pytest.fixture
def impatient():
    """A server with STALLED_BUDGET where a call waits at most 1 s for memory and reads never give
    way (idle_read_yield_s 0): a stalled call that holds a read ends by stream_idle_timeout_s
    (3 s) and nothing sooner."""
    yield from budgeted_server("1", "--idle-read-yield-s", "0", budget=STALLED_BUDGET)


def test_stalled_chunked_calls_with_large_headers_are_refused_or_timed_out(impatient):
    """30 calls each send a legal 56 MB class-index header and stall. Whatever the order in which
    they reach the server, the budget (two reads and 96 MiB) decides how each ends:

    * Two read at a time; the others wait in line, refused after max_memory_wait_s (1 s) unless
      served sooner.
    * A header read while calls wait in line shrinks to its 56 MB and its read goes to the next
      in line, which leaves less than decoding the header takes: refused at once.
    * Two headers read with no call in line are both held (140 MB each). The first call's next
      read waits in line until the second header shrinks, and then fits: that call stalls holding
      it, and only stream_idle_timeout_s (3 s) ends it. The second call's next read, in line from
      that moment (and its header's decoding), cannot fit until then: refused after 1 s. (Were
      the first read refused after waiting 1 s for the second header, the second would hold its
      next read and end idle.) Calls in line behind them are refused after 1 s.

    So calls are refused after waiting and calls end idle in every run; a header is refused at
    once where it is read while calls wait. Before, idle reads gave way after idle_read_yield_s
    (2 s) and the budget held two stalled calls and a third header: on a loaded machine the
    stalled calls gave way to the third call's next read before it had waited 1 s, and no call
    was refused after waiting (a CI failure). Giving way has its own test
    (test_calls_whose_clients_send_nothing_give_way_to_calls_in_line)."""
    server, baseline = impatient
    header = pb.ChunkHeader(input_dtype=pb.FLOAT32, input_shape=[HEADER_ROWS, 10])
    tensors.to_proto(np.zeros(HEADER_ROWS, np.int64), header.target)
    first = pb.EvaluateChunk(header=header).SerializeToString()  # serialized once, not by each call
    release = threading.Event()

    def stalled():
        yield first
        release.wait(60)

    with grpc.insecure_channel(server.address, options=RAW) as channel:
        evaluate_chunked = channel.stream_unary("/lossd.v1.LossService/EvaluateChunked")
        futures = [evaluate_chunked.future(stalled(), timeout=60) for _ in range(30)]
        outcomes = [outcome(f) for f in futures]
        release.set()
    refused = [o for o in outcomes if o.startswith("RESOURCE_EXHAUSTED") and "memory_budget_bytes" in o]
    waited = [o for o in refused if " waited " in o]
    assert waited and all("max_memory_wait_s" in o for o in waited), refused
    at_once = [o for o in refused if o not in waited]  # reading a header while calls were in line
    assert all(" needs " in o and " more bytes of server memory" in o for o in at_once), at_once
    idle = [o for o in outcomes if o.startswith("DEADLINE_EXCEEDED") and "stream_idle_timeout_s" in o]
    assert refused and idle and len(refused) + len(idle) == 30, [o for o in outcomes if o not in refused + idle]
    assert_within_budget(server, baseline, STALLED_BUDGET)
    assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
    a_good_call_still_works(server.address)


def test_32_chunked_calls_with_32_mib_chunks_stay_within_the_budget(budgeted):
    server, baseline = budgeted
    rows, classes = 2 * 256, 32768  # two chunks of 256 rows x 32768 fp32 = 32 MiB each
    rng = np.random.default_rng(7)
    x = rng.standard_normal((rows, classes), dtype=np.float32)
    t = rng.integers(0, classes, rows)
    want = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), reduction="sum")
    header = pb.ChunkHeader(input_dtype=pb.FLOAT32, input_shape=[rows, classes], options=pb.LossOptions(reduction=pb.SUM))
    tensors.to_proto(t, header.target)
    half = x.nbytes // 2
    data = x.tobytes()
    messages = [pb.EvaluateChunk(header=header), pb.EvaluateChunk(input_rows=data[:half]), pb.EvaluateChunk(input_rows=data[half:])]
    with grpc.insecure_channel(server.address, options=RAW) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        futures = [stub.EvaluateChunked.future(iter(messages), timeout=120) for _ in range(32)]
        replies = [f.result() for f in futures]
    for reply in replies:
        torch.testing.assert_close(core.parse(reply, as_torch=True).loss, want, rtol=1e-5, atol=1e-2)
    assert_within_budget(server, baseline)


def test_a_chunked_call_waiting_for_its_next_chunk_holds_no_chunk_it_has_computed(budgeted):
    """Hold-and-wait is how calls deadlock over one budget: 32 calls that kept their computed
    chunks while waiting in line to read the next one filled it and waited for each other."""
    server, _ = budgeted
    rows, classes = 2 * 256, 32768  # two chunks of 32 MiB
    x = np.random.default_rng(8).standard_normal((rows, classes), dtype=np.float32)
    header = pb.ChunkHeader(input_dtype=pb.FLOAT32, input_shape=[rows, classes], options=pb.LossOptions(reduction=pb.SUM))
    tensors.to_proto(np.zeros(rows, np.int64), header.target)
    data = x.tobytes()
    half = len(data) // 2
    first_chunk_sent, go_on = threading.Event(), threading.Event()

    def messages():
        yield pb.EvaluateChunk(header=header)
        yield pb.EvaluateChunk(input_rows=data[:half])
        first_chunk_sent.set()
        go_on.wait(30)
        yield pb.EvaluateChunk(input_rows=data[half:])

    read_reservation = 2 * (2 * 64 * MiB + MiB)  # what the pending read of the second chunk holds
    received = 'lossd_received_bytes_total{method="EvaluateChunked"}'
    before = server.metrics().get(received, 0.0)
    with grpc.insecure_channel(server.address, options=RAW) as channel:
        future = pb_grpc.LossServiceStub(channel).EvaluateChunked.future(messages(), timeout=60)
        first_chunk_sent.wait(30)
        wait_for_metric(server, received, lambda v: v >= before + half, timeout_s=1.0)  # the server has read it
        # within the idle timeout (3 s): the first chunk is computed and its 32 MiB released
        held = wait_for_metric(server, "lossd_memory_held_bytes", lambda v: 0 < v < read_reservation + 4 * MiB, timeout_s=1.5)
        go_on.set()
        future.result()
    assert 0 < held < read_reservation + 4 * MiB, f"{held} bytes held while waiting for the second chunk"


#: Chunk headers whose reservation (answer and working bytes, ~8 MB) fits a 12 MiB budget but
#: leaves less than one read (6 MiB) free: CE with class probabilities and reduction NONE, and a
#: comparison of 7 classes with top_k=7.
SELF_WAITING_HEADERS = {
    "EvaluateChunked": pb.EvaluateChunk(
        header=pb.ChunkHeader(
            input_dtype=pb.FLOAT32, input_shape=[400_000, 2], target=pb.Tensor(dtype=pb.FLOAT32, shape=[400_000, 2]),
            options=pb.LossOptions(reduction=pb.NONE),
        )
    ),
    "CompareChunked": pb.CompareChunk(
        header=pb.CompareHeader(
            reference_dtype=pb.FLOAT32, reference_shape=[9_000, 7], candidate_dtype=pb.FLOAT32, candidate_shape=[9_000, 7],
            options=pb.CompareOptions(top_k=7),
        )
    ),
}  # fmt: skip


@pytest.mark.parametrize("rpc", sorted(SELF_WAITING_HEADERS))
def test_a_chunked_header_that_leaves_no_room_for_one_read_is_refused_at_once(rpc):
    """A header that, with one read, can never fit the budget: the call could never read its next
    chunk, which would wait for bytes only the call itself holds. Before, it waited
    max_memory_wait_s (60 s by default) and was then told the bytes were "held for other calls",
    while every other call that needed memory waited behind it (a good Evaluate missed its 20 s
    deadline). Now it is refused at once, naming the numbers and the settings, and the others go on."""
    server = two_reads_server(max_memory_wait_s="10", idle_read_yield_s="2")
    release = threading.Event()

    def held_open():
        yield SELF_WAITING_HEADERS[rpc].SerializeToString()
        release.wait(60)  # the client would send rows next

    try:
        with grpc.insecure_channel(server.address) as channel:
            refused = outcome(channel.stream_unary(f"/lossd.v1.LossService/{rpc}").future(held_open(), timeout=60))
            assert refused.startswith("RESOURCE_EXHAUSTED") and "could never end" in refused, refused
            assert "memory_budget_bytes=12582912" in refused and "max_message_bytes" in refused, refused
            a_good_call_still_works(server.address)  # the refused call's client still holds its stream open
        release.set()
        assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
    finally:
        release.set()
        server.stop()


@pytest.mark.parametrize("method", ["EvaluateStream", "EvaluatePacked"])
def test_streams_cancelled_mid_way_give_back_every_byte(budgeted, method):
    """Streams cancelled while their messages are read and answered, round after round: the
    answers not yet started when a stream ends held their messages' bytes, which nothing gave
    back (found leaking 131 MB in 10 rounds of 8 streams)."""
    server, _ = budgeted
    x = np.random.default_rng(5).standard_normal((2048, 1000)).astype(np.float32)  # 8 MB per request
    item = request_msg(x, np.random.default_rng(6).integers(0, 1000, 2048))
    message = pb.EvaluateBatch(requests=[item]) if method == "EvaluatePacked" else item
    delays = np.random.default_rng(7).uniform(0.05, 0.6, size=8)

    async def rounds() -> None:
        async with grpc.aio.insecure_channel(server.address, options=RAW) as channel:
            rpc = getattr(pb_grpc.LossServiceStub(channel), method)
            for delay in delays:

                async def messages():
                    for _ in range(20):
                        yield message
                    await asyncio.sleep(30)

                calls = [rpc(messages()) for _ in range(6)]
                await asyncio.sleep(float(delay))
                for call in calls:
                    call.cancel()

    asyncio.run(rounds())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(v for k, v in server.metrics().items() if k.startswith("lossd_requests_in_flight")):
        time.sleep(0.05)
    assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
    a_good_call_still_works(server.address)


@pytest.mark.parametrize("method", ["EvaluateStream", "EvaluatePacked"])
def test_a_stream_whose_first_answer_is_not_read_in_time_ends_with_its_status(budgeted, method):
    """An answer far beyond the client's HTTP/2 window, not read for longer than the idle timeout:
    the server ends the call, and the client, reading on, gets that status. The write the timeout
    cut had carried the response headers too, and gRPC then refused the status batch: the client
    got the answer and waited for the end of its own deadline (for ever without one)."""
    server, _ = budgeted
    msg = request_msg(np.ones((2048, 1), np.float32), np.ones((1, 2048), np.float32), loss=pb.KL_DIV, reduction=pb.NONE)  # 16 MiB answer
    message = pb.EvaluateBatch(requests=[msg]) if method == "EvaluatePacked" else msg
    ended = f'lossd_requests_total{{code="DEADLINE_EXCEEDED",method="{method}"}}'
    before = server.metrics().get(ended, 0.0)
    with grpc.insecure_channel(server.address, options=RAW) as channel:
        call = getattr(pb_grpc.LossServiceStub(channel), method)(iter([message]), timeout=60)
        wait_for_metric(server, ended, lambda v: v > before)  # read nothing until the idle timeout ended the call
        with pytest.raises(grpc.RpcError) as raised:
            for _ in call:
                pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "read no answer" in raised.value.details(), raised.value
    assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
    a_good_call_still_works(server.address)


def test_a_stream_whose_client_stops_reading_is_paused_then_ended(budgeted):
    server, baseline = budgeted
    x = np.random.default_rng(1).standard_normal((256, 1024)).astype(np.float32)  # 1 MiB in, 1 MiB answer
    msg = request_msg(x, x, loss=pb.BINARY_CROSS_ENTROPY_WITH_LOGITS, reduction=pb.NONE)
    sent = 0

    def requests():
        nonlocal sent
        for _ in range(5000):
            sent += 1
            yield msg

    ended = 'lossd_requests_total{code="DEADLINE_EXCEEDED",method="EvaluateStream"}'
    before = server.metrics().get(ended, 0.0)
    with grpc.insecure_channel(server.address, options=RAW) as channel:
        call = pb_grpc.LossServiceStub(channel).EvaluateStream(requests(), timeout=120)
        wait_for_metric(server, ended, lambda v: v > before)  # read nothing until the idle timeout ended the call
        codes = []
        try:
            for _ in call:
                pass
        except grpc.RpcError as err:
            codes.append((err.code(), err.details()))
    assert codes and codes[0][0] == grpc.StatusCode.DEADLINE_EXCEEDED and "read no answer" in codes[0][1], codes
    assert sent < 5000, "the server must stop reading a stream whose answers are not read"
    assert_within_budget(server, baseline)
    assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
    a_good_call_still_works(server.address)


def test_clients_that_leave_without_reading_their_answers_are_no_error_in_the_log():
    """Streams whose clients read none of their 4 MiB answers, ended by the idle timeout (the status
    held behind the unread answers), then cancelled: gRPC logged each as ``ERROR grpc._cython.cygrpc:
    ExecuteBatchError raised in core by servicer method [...]`` with a traceback (8 of 8 in a probe),
    an ordinary departure read as a server failure. Now one DEBUG line each (the server logs at DEBUG
    here to show them), and no ERROR."""
    n = 1024
    msg = request_msg(np.zeros((n, 1), np.float32), np.full((1, n), 1 / n, np.float32), loss=pb.KL_DIV, reduction=pb.NONE)
    stop = threading.Event()

    def requests():
        yield from [msg] * 4
        stop.wait(60)

    not_reading = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536), *RAW]
    ended = 'lossd_requests_total{code="DEADLINE_EXCEEDED",method="EvaluateStream"}'
    server = start_server("--stream-idle-timeout-s", "2", "--log-level", "DEBUG", metrics=True)
    try:
        with grpc.insecure_channel(server.address, options=not_reading) as channel:
            calls = [pb_grpc.LossServiceStub(channel).EvaluateStream(requests(), timeout=60) for _ in range(4)]
            assert wait_for_metric(server, ended, lambda v: v == 4) == 4, server.log()  # each status held behind its answers
            for call in calls:
                call.cancel()
            stop.set()
            # an answer is let go when its call's task ends, after gRPC's log line for it
            assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
        a_good_call_still_works(server.address)
        # the log comes through a pipe and the stop exits at once: gRPC's lines are waited for
        # before it (a CI run's log had none of them at the stop; why is not known)
        deadline = time.monotonic() + 10
        while "ExecuteBatchError raised in core" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        assert server.stop() == 0, server.log()
    deadline = time.monotonic() + 30
    while "lossd: stopped" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)  # the last lines of the log, still on their way from the pipe
    lines = server.log().splitlines()
    assert not [line for line in lines if " ERROR " in line or line.startswith("Traceback")], server.log()
    departed = [line for line in lines if "ExecuteBatchError raised in core" in line]
    assert departed and all(" DEBUG " in line and "its client left" in line for line in departed), server.log()


def test_a_chunked_call_that_sends_nothing_more_ends_naming_the_idle_timeout(budgeted):
    server, _ = budgeted
    header = pb.ChunkHeader(input_dtype=pb.FLOAT32, input_shape=[4, 3])
    tensors.to_proto(np.array([0, 1, 2, 0]), header.target)
    release = threading.Event()

    def stalled():
        yield pb.EvaluateChunk(header=header)
        release.wait(30)

    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.LossServiceStub(channel).EvaluateChunked(stalled(), timeout=30)
        release.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream_idle_timeout_s" in info.value.details()


def two_reads_server(*, max_memory_wait_s: str, idle_read_yield_s: str) -> ServerProcess:
    """--max-message-bytes 1 MiB: a read reserves 2 x (2 MiB + 1 MiB); the budget holds two reads."""
    return start_server(
        "--max-message-bytes", str(MiB), "--memory-budget-bytes", str(12 * MiB), "--stream-idle-timeout-s", "60",
        "--max-memory-wait-s", max_memory_wait_s, "--idle-read-yield-s", idle_read_yield_s, metrics=True,
    )  # fmt: skip


def nothing_until(release: threading.Event) -> Iterator[pb.EvaluateRequest]:
    """A client's request stream that sends nothing until ``release`` (at most 60 s), then ends."""
    release.wait(60)
    yield from ()


@pytest.mark.parametrize(("yield_s", "wait_s"), [("0.5", "6"), ("0", "2")], ids=["idle-reads-give-way", "turned-off"])
def test_calls_whose_clients_send_nothing_give_way_to_calls_in_line(yield_s, wait_s):
    """Four calls whose clients send nothing (two EvaluateStream, two Evaluate) hold both read
    reservations the budget has and wait in line for more; a good call behind them is answered
    once the idle ones give way (idle_read_yield_s 0.5 s, well within max_memory_wait_s 6 s).
    Turned off, it waits max_memory_wait_s (2 s) and is refused: the idle calls would have held the
    server for stream_idle_timeout_s."""
    server = two_reads_server(max_memory_wait_s=wait_s, idle_read_yield_s=yield_s)
    release = threading.Event()
    nothing = functools.partial(nothing_until, release)
    try:
        with grpc.insecure_channel(server.address) as channel, concurrent.futures.ThreadPoolExecutor(4) as pool:
            stub = pb_grpc.LossServiceStub(channel)
            evaluate_stream_unary = channel.stream_unary(
                "/lossd.v1.LossService/Evaluate", pb.EvaluateRequest.SerializeToString, pb.EvaluateResponse.FromString
            )
            idle = [pool.submit(lambda: list(stub.EvaluateStream(nothing(), timeout=60))) for _ in range(2)]
            idle += [evaluate_stream_unary.future(nothing(), timeout=60) for _ in range(2)]
            wait_for_metric(server, "lossd_memory_waiting_calls", lambda v: v == 2)
            x = np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32)
            t = np.array([0, 1, 2, 3, 4, 0])

            def good_call() -> str:
                try:
                    with LossClient(server.address, timeout_s=30) as client:
                        client.cross_entropy(x, t)
                    return "OK"
                except LossdError as err:
                    return f"{err.code.name}: {err}"

            good = pool.submit(good_call).result()
            release.set()
            idle_outcomes = [outcome(f) for f in idle]
        gave_way = [o for o in idle_outcomes if o.startswith("RESOURCE_EXHAUSTED") and f"idle_read_yield_s={yield_s}" in o]
        # a call that gave way says so in its trailing metadata (a client may send its message again); no other call does
        marked = [trailing_metadata(f).get("lossd-gave-way") == "idle_read_yield_s" for f in idle]
        assert marked == [o in gave_way for o in idle_outcomes], (marked, idle_outcomes)
        yielded = server.metrics().get("lossd_memory_reads_yielded_total", 0)
        if yield_s == "0":
            assert good.startswith("RESOURCE_EXHAUSTED") and "max_memory_wait_s" in good, good
            assert not gave_way and yielded == 0, idle_outcomes
        else:
            assert good == "OK", good
            # the two idle calls holding the reads give way to the good call; since callers take turns
            # by connection, the good call (its own connection) goes before the other two idle calls,
            # which then end with the client before or after giving way in turn
            assert len(gave_way) >= 2 and yielded == len(gave_way), (yielded, idle_outcomes)
            assert all("memory_budget_bytes=12582912" in o for o in gave_way), gave_way
        ended_by_client = [o for o in idle_outcomes if o not in gave_way]
        assert all(o == "OK" or "carried no EvaluateRequest" in o or "waited" in o for o in ended_by_client), idle_outcomes
        assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
        a_good_call_still_works(server.address)
    finally:
        release.set()
        server.stop()


def test_streams_whose_clients_read_no_answers_give_way_too():
    """Four streams each send one item (a 4 MB answer) and never read the answer: their next
    reads held their reservations as streams waiting for answers, and a good call behind them
    waited stream_idle_timeout_s (25 s, then DEADLINE_EXCEEDED). An answer computed and left
    unread is the client's idleness, not the server's."""
    server = start_server("--memory-budget-bytes", str(300 * MiB), "--max-message-bytes", str(16 * MiB), metrics=True)
    x = np.zeros((1_000_000, 2), np.float16)
    item = request_msg(x, np.zeros(1_000_000, np.int64), reduction=pb.NONE)

    async def attack_then_call() -> str:
        # a small receive window (no BDP probing) and a connection each: an unread answer stays unsent
        options = [*RAW, ("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(server.address, options=options) for _ in range(4)]
        try:
            streams = [pb_grpc.LossServiceStub(ch).EvaluateStream(timeout=120) for ch in channels]
            for stream in streams:
                await stream.write(item)  # and never read
            await asyncio.sleep(1.0)
            async with grpc.aio.insecure_channel(server.address) as channel:
                good = request_msg(np.zeros((5, 4), np.float32), np.array([0, 1, 2, 3, 0]))
                try:
                    await pb_grpc.LossServiceStub(channel).Evaluate(good, timeout=25)
                    return "OK"
                except grpc.RpcError as err:
                    return f"{err.code().name}: {err.details()}"
        finally:
            for ch in channels:
                await ch.close()

    try:
        assert asyncio.run(attack_then_call()) == "OK"
        assert server.metrics().get("lossd_memory_reads_yielded_total", 0) >= 1
        assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
        a_good_call_still_works(server.address)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# 3. nothing kept after a call


def test_failed_large_requests_leave_nothing_behind():
    server = start_server("--max-message-bytes", str(80 * MiB))
    try:
        bad, _ = big_unary(rows=960, bad_target=True)  # 117 MiB: over the limit
        invalid, _ = big_unary(rows=640, bad_target=True)  # 78 MiB: decoded, then INVALID_ARGUMENT
        codes = set()
        with grpc.insecure_channel(server.address, options=RAW) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            rss = []
            for i in range(24):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Evaluate(bad if i % 2 else invalid, timeout=60)
                codes.add(info.value.code())
                del info
                if i == 1:
                    rss.append(status_mib(server, "VmRSS"))
            rss.append(status_mib(server, "VmRSS"))
        assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
        # before the fix every failure kept its request (24 x ~100 MiB); allow a few chunks of slack
        assert rss[-1] - rss[0] <= 64, f"RSS grew from {rss[0]:.0f} to {rss[-1]:.0f} MiB over 22 failed requests"
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# 4. SIGTERM loses no call on the wire


@pytest.mark.parametrize("delay_s", [0.0, 0.3, 1.0, 2.0, 3.0])
def test_sigterm_with_32_large_calls_on_the_wire_answers_every_one(delay_s):
    msg, want = big_unary()  # 62.5 MiB, like the 512 x 32000 fp32
    server = start_server("--drain-s", "0.5", "--grace-s", "120")
    try:
        with grpc.insecure_channel(server.address, options=RAW) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            futures = [stub.Evaluate.future(msg, timeout=300) for _ in range(32)]
            time.sleep(delay_s)
            server.signal(signal.SIGTERM)
            outcomes = [outcome(f) for f in futures]
            replies = [f.result() for f in futures if not f.exception()]
        assert outcomes == ["OK"] * 32, outcomes
        for reply in replies:
            torch.testing.assert_close(core.parse(reply, as_torch=True).loss, want)
        assert server.proc.wait(120) == 0, server.log()
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# 6. every client mistake on every RPC is INVALID_ARGUMENT


def chunked_outcome(address: str, messages: list[pb.EvaluateChunk]) -> grpc.RpcError | pb.EvaluateResponse:
    with grpc.insecure_channel(address, options=RAW) as channel:
        try:
            return pb_grpc.LossServiceStub(channel).EvaluateChunked(iter(messages), timeout=30)
        except grpc.RpcError as err:
            return err


def header_msg(input_shape, target: np.ndarray, keep_data: bool = True, **options) -> pb.EvaluateChunk:
    header = pb.ChunkHeader(input_dtype=pb.FLOAT32, input_shape=input_shape, options=pb.LossOptions(**options))
    tensors.to_proto(target, header.target)
    if not keep_data:
        header.target.data = b""
    return pb.EvaluateChunk(header=header)


CHUNKED_MISTAKES = [
    ("probability target with data in the header", [header_msg([4, 3], np.full((4, 3), 0.25, np.float32))], "header.target.data"),
    (
        "BCE target with data in the header",
        [header_msg([4, 3], np.zeros((4, 3), np.float32), loss=pb.BINARY_CROSS_ENTROPY_WITH_LOGITS)],
        "header.target.data",
    ),
    (
        "streamed target whose byte size overflows",  # shaped like the input, so it would stream 2^65 bytes
        [pb.EvaluateChunk(header=pb.ChunkHeader(input_dtype=pb.FLOAT32, input_shape=[2**59, 2], target=pb.Tensor(dtype=pb.FLOAT64, shape=[2**59, 2])))],
        "header.target.shape",
    ),
    (
        "empty weight whose strides overflow",  # no elements, yet torch cannot stride [0, 2, 2^62]
        [header_msg([4, 3], np.array([0, 1, 2, 0]), weight=pb.Tensor(dtype=pb.FLOAT32, shape=[0, 2, 2**62]))],
        "options.weight.shape",
    ),
    (
        "empty input whose strides overflow",
        [pb.EvaluateChunk(header=pb.ChunkHeader(input_dtype=pb.FLOAT32, input_shape=[0, 2**40, 2**40], target=pb.Tensor(dtype=pb.INT64, shape=[0, 2**40])))],
        "header.input_shape",
    ),
    ("no header", [pb.EvaluateChunk(input_rows=b"\0" * 12)], "header"),
    ("a second header", [header_msg([4, 3], np.array([0, 1, 2, 0])), header_msg([4, 3], np.array([0, 1, 2, 0]))], "header"),
    ("rows that are not whole", [header_msg([4, 3], np.array([0, 1, 2, 0])), pb.EvaluateChunk(input_rows=b"\0" * 5)], "input_rows"),
    ("missing rows", [header_msg([4, 3], np.array([0, 1, 2, 0])), pb.EvaluateChunk(input_rows=b"\0" * 12)], "input_rows"),
    ("target out of range", [header_msg([4, 3], np.array([0, 1, 9, 0]))], "target"),
    ("an empty first message", [pb.EvaluateChunk()], "header"),
]


@pytest.mark.parametrize("name,messages,field", CHUNKED_MISTAKES, ids=[c[0] for c in CHUNKED_MISTAKES])
def test_chunked_mistakes_are_invalid_argument_naming_the_field(server, name, messages, field):
    got = chunked_outcome(server.address, messages)
    assert isinstance(got, grpc.RpcError), got
    assert got.code() == grpc.StatusCode.INVALID_ARGUMENT, got.details()
    assert field in got.details(), got.details()
    assert health(server.address) == "SERVING"


def test_zero_classes_with_shift_and_rank_extras_agree_on_unary_and_chunked(server):
    t = np.full((2, 4), -100)
    x = np.zeros((2, 4, 0), np.float32)
    options = dict(class_axis=-1, shift_targets=True, reduction=pb.NONE, extras=[pb.TARGET_RANK, pb.ARGMAX_CORRECT], sequence_stats=True)
    with grpc.insecure_channel(server.address) as channel:
        unary = pb_grpc.LossServiceStub(channel).Evaluate(request_msg(x, t, **options), timeout=30)
    chunked = chunked_outcome(server.address, [header_msg([2, 4, 0], t, **options)])
    assert isinstance(chunked, pb.EvaluateResponse)
    chunked.id = unary.id
    assert chunked == unary


# ---------------------------------------------------------------------------------------------
# 7. a clear start-up error


def taken_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


@pytest.mark.parametrize("which", ["metrics", "grpc"])
def test_a_port_in_use_stops_the_start_with_one_line_and_status_2(which):
    with taken_port() as s:
        port = s.getsockname()[1]
        flags = ["--metrics-port", str(port)] if which == "metrics" else ["--port", str(port), "--metrics-port", "0"]
        if which == "metrics":
            flags += ["--port", "0"]
        done = subprocess.run([sys.executable, "-m", "lossd_server", "--host", "127.0.0.1", *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "listening" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(port) in lines[0] and ("--metrics-port" if which == "metrics" else "--port") in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# 8. a mixed soak, 64 in flight


@pytest.fixture(scope="module")
def soaked():
    """A budgeted server whose idle limits are far above what this test's client can promise: 64
    threads of one Python process on two shared cores, where a chunked call's sender once completed
    no chunk for 2 s (the CI run of 86916d5): its read gave way, RESOURCE_EXHAUSTED, as
    --idle-read-yield-s says it should (tested on its own: tests/unit/test_budget.py, and the
    stalled calls above)."""
    yield from budgeted_server(PATIENT_WAIT_S, "--idle-read-yield-s", "30", "--stream-idle-timeout-s", "60")


def test_mixed_soak_loses_nothing_and_stays_within_the_budget(soaked):
    """Unary, streams, chunked and failing requests together, 64 in flight, bounded in count."""
    server, baseline = soaked
    rng = np.random.default_rng(11)
    pool = []
    for i in range(12):
        n, c = int(rng.integers(1, 64)), int(rng.choice([5, 100, 1000]))
        x = torch.from_numpy(rng.standard_normal((n, c)).astype(np.float32))
        t = torch.from_numpy(rng.integers(0, c, n))
        red = ("mean", "sum", "none")[i % 3]
        pool.append((LossRequest(x, t, reduction=red, label_smoothing=0.1 * (i % 2)), F.cross_entropy(x, t, reduction=red, label_smoothing=0.1 * (i % 2))))
    big_x = torch.from_numpy(rng.standard_normal((160, 32000)).astype(np.float32))  # 20 MB: EvaluateChunked
    big_t = torch.from_numpy(rng.integers(0, 32000, 160))
    big = (LossRequest(big_x, big_t, reduction="sum"), F.cross_entropy(big_x, big_t, reduction="sum"))
    bad = LossRequest(torch.zeros(3, 4), torch.tensor([0, 9, 1]))
    counts = {"unary": 0, "stream_items": 0, "chunked": 0, "failing": 0}
    lock = threading.Lock()

    def check(got, want):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)

    def worker(k: int) -> None:
        with LossClient(server.address, timeout_s=300) as client:
            for j in range(30):
                kind = (k + j) % 8
                if kind == 0:
                    results = list(client.evaluate_many([r for r, _ in pool], window=16))
                    for res, (_, want) in zip(results, pool, strict=True):
                        check(res.loss, want)
                    with lock:
                        counts["stream_items"] += len(pool)
                elif kind == 1 and k % 4 == 0:
                    check(client.evaluate(big[0]).loss, big[1])
                    with lock:
                        counts["chunked"] += 1
                elif kind == 2:
                    from lossd_client import InvalidArgumentError

                    with pytest.raises(InvalidArgumentError, match="target"):
                        client.evaluate(bad)
                    with lock:
                        counts["failing"] += 1
                else:
                    req, want = pool[(k * 7 + j) % len(pool)]
                    check(client.evaluate(req).loss, want)
                    with lock:
                        counts["unary"] += 1

    with concurrent.futures.ThreadPoolExecutor(64) as pool_exec:
        for f in [pool_exec.submit(worker, k) for k in range(64)]:
            f.result(timeout=600)
    assert counts["chunked"] >= 8 and counts["failing"] >= 64 and counts["stream_items"] >= 64 * len(pool) and counts["unary"] > 300, counts
    assert_within_budget(server, baseline)
    assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
    print(f"soak: {counts}; peak {status_mib(server, 'VmHWM') - baseline:.0f} MiB over baseline, budget {BUDGET // MiB} MiB")


@pytest.mark.parametrize("allowed", [False, True], ids=["refused-by-default", "allowed"])
def test_compressed_requests_are_refused_unless_allowed(allowed):
    """A gzip request of a few KB can decompress to a whole max_message_bytes read ("zip bombs":
    60 of them stalled a good call for 29 s): refused UNIMPLEMENTED before anything is
    decompressed, unless --allow-compressed-requests; the server keeps serving either way."""
    x = np.zeros((512, 1000), np.float32)  # 2 MB of zeros: ~2 KB compressed
    msg = request_msg(x, np.zeros(512, np.int64))
    with start_server(*(["--allow-compressed-requests"] if allowed else [])) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        if allowed:
            got = stub.Evaluate(msg, timeout=60, compression=grpc.Compression.Gzip)
            assert np.frombuffer(got.loss.data, np.float32)[0] == pytest.approx(float(np.log(1000)), rel=1e-6)
        else:
            with pytest.raises(grpc.RpcError) as info:
                stub.Evaluate(msg, timeout=60, compression=grpc.Compression.Gzip)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "gzip" in info.value.details()
        assert np.frombuffer(stub.Evaluate(msg, timeout=60).loss.data, np.float32)[0] == pytest.approx(float(np.log(1000)), rel=1e-6)
        assert health(server.address) == "SERVING"


def test_answers_the_client_does_not_read_stay_counted_until_grpc_lets_them_go():
    """gRPC sends a returned answer at the client's pace and keeps it until then. Four 40 KB
    kl_div requests with 64 MiB answers, from clients that never read them (their HTTP/2 receive
    windows stay at 64 KiB), held 4 x ~200 MiB with nothing counted before; now each answer stays
    counted until the call ends, so the server's memory stays within its budget and later calls
    wait in line, or are refused, instead."""
    x, t = np.zeros((4096, 1), np.float32), np.full((1, 4096), 1 / 4096, np.float32)
    data = request_msg(x, t, loss=pb.KL_DIV, reduction=pb.NONE).SerializeToString()
    answer = 4096 * 4096 * 4
    budget = 700 * MiB
    not_reading = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536), *RAW]
    with start_server("--memory-budget-bytes", str(budget), "--max-memory-wait-s", "2", metrics=True) as server:
        base = status_mib(server, "VmRSS")
        channels = [grpc.insecure_channel(server.address, options=not_reading) for _ in range(4)]
        try:
            # a unary method called as response-streaming: the answer is there, never read
            calls = [ch.unary_stream("/lossd.v1.LossService/Evaluate", request_serializer=None)(data, timeout=120) for ch in channels]
            held = wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v >= 2 * 3 * answer)
            assert held >= 2 * 3 * answer  # two answers fit the budget: both counted, unsent
            time.sleep(3)  # the others wait in line for their answers' bytes, or are refused
            assert server.metrics()["lossd_memory_held_bytes"] >= 2 * 3 * answer  # still counted while unsent
            assert status_mib(server, "VmHWM") - base <= budget / MiB
            answered = [len(next(c, b"")) > answer for c in calls]  # reading lets the waiting calls go on
            codes = [c.code() for c in calls]
            assert sum(answered) >= 2 and set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        finally:
            for ch in channels:
                ch.close()
        assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
        a_good_call_still_works(server.address)


def test_callers_in_line_for_memory_take_turns_by_connection():
    """Thirty calls whose client sends nothing, all on one connection, wait in line for the two
    read reservations the budget has; a good call on another connection is served at the next
    turn (after idle calls give way, idle_read_yield_s 1 s), not behind all of them (14 s, past its
    max_memory_wait_s of 8 s: refused before the callers took turns)."""
    server = two_reads_server(max_memory_wait_s="8", idle_read_yield_s="1")
    release = threading.Event()
    nothing = functools.partial(nothing_until, release)
    try:
        with grpc.insecure_channel(server.address) as channel:
            evaluate_stream_unary = channel.stream_unary("/lossd.v1.LossService/Evaluate", pb.EvaluateRequest.SerializeToString)
            idle = [evaluate_stream_unary.future(nothing(), timeout=60) for _ in range(30)]
            assert wait_for_metric(server, "lossd_memory_waiting_calls", lambda v: v == 28) == 28
            x, t = np.zeros((2, 3), np.float32), np.array([0, 1])
            with LossClient(server.address, timeout_s=30) as client:  # its own connection
                assert float(client.cross_entropy(x, t)) == pytest.approx(float(np.log(3)), rel=1e-6)
            release.set()
            outcomes = [outcome(f) for f in idle]
        assert all(o.startswith("RESOURCE_EXHAUSTED") or "carried no EvaluateRequest" in o for o in outcomes), outcomes
        assert wait_for_metric(server, "lossd_memory_held_bytes", lambda v: v == 0) == 0
    finally:
        release.set()
        server.stop()


UNARY_REQUEST_METHODS = [
    ("/lossd.v1.LossService/GetServerInfo", "stream_unary", "GetServerInfoRequest"),
    ("/grpc.health.v1.Health/Check", "stream_unary", "HealthCheckRequest"),
    ("/grpc.health.v1.Health/Watch", "stream_stream", "HealthCheckRequest"),
]


@pytest.mark.parametrize(("method", "kind", "what"), UNARY_REQUEST_METHODS)
def test_unary_request_calls_without_a_message_are_answered_not_left_open(budgeted, method, kind, what):
    """A client that half-closes a unary-request call without a message is answered INVALID_ARGUMENT
    (gRPC's own unary handling never answered it: 20,000 such calls stayed open and held 370 MiB),
    and one that sends nothing is ended after stream_idle_timeout_s, as lossd's own methods are."""
    server, _ = budgeted
    with grpc.insecure_channel(server.address) as channel:
        call = getattr(channel, kind)(method)
        with pytest.raises(grpc.RpcError) as closed:
            result = call(iter(()), timeout=30)
            if kind == "stream_stream":
                list(result)
        assert closed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert closed.value.details() == f"request: the call carried no {what} message"
        release = threading.Event()

        def nothing() -> Iterator[bytes]:
            release.wait(30)
            return
            yield b""

        try:
            with pytest.raises(grpc.RpcError) as idle:
                result = call(nothing(), timeout=30)
                if kind == "stream_stream":
                    list(result)
        finally:
            release.set()
        assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert idle.value.details() == f"the client completed no {what} message for stream_idle_timeout_s={float(IDLE_S):g}s"
    a_good_call_still_works(server.address)
