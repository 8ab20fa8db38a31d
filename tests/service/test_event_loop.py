"""Work that is heavy for its bytes runs off the event loop, which keeps answering health checks and
other callers meanwhile. Where it runs is decided by its work (``--inline-batch-bytes``), not by the
bytes a caller sent: a 98 KB chunked kl_div whose target is broadcast along its rows makes 512 MiB of
output, about a second of compute, and was computed on the event loop (no health check answered
for 1.1 s per call; 8 such callers held it for 9 s). Real servers on loopback, stopped by their PID.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from health_checks import BackgroundHealthChecks
from lossd_client import LossRequest, core, tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from serverproc import start_server

ROWS, CLASSES = 8192, 16384  # the broadcast output: 2**27 elements, --max-broadcast-elements' default


def kl_chunked_messages() -> list[pb.EvaluateChunk]:
    target = tensors.to_proto(np.full((1, CLASSES), 1.0 / CLASSES, np.float32))
    header = pb.ChunkHeader(input_dtype=pb.FLOAT32, input_shape=[ROWS, 1], target=target, options=pb.LossOptions(loss=pb.KL_DIV))
    rows = np.log(np.full(ROWS, 0.5, np.float32)).tobytes()
    return [pb.EvaluateChunk(header=header), pb.EvaluateChunk(input_rows=rows)]


@pytest.fixture(scope="module")
def server():
    # one torch thread: the computations these tests watch last about as long on a machine of many cores
    proc = start_server("--torch-threads", "1")
    yield proc
    proc.stop()


def packed_answers(server, batch: pb.EvaluateBatch) -> tuple[pb.EvaluateBatchResults, int]:
    """``batch`` sent alone on one EvaluatePacked stream; its answer and the health checks answered
    meanwhile."""
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as channel:
        with BackgroundHealthChecks(server.address) as health:
            call = channel.stream_stream(
                "/lossd.v1.LossService/EvaluatePacked",
                request_serializer=pb.EvaluateBatch.SerializeToString,
                response_deserializer=pb.EvaluateBatchResults.FromString,
            )
            start = time.monotonic()
            (answer,) = list(call(iter([batch]), timeout=120))
            stop = time.monotonic()
    assert not [r.error for r in answer.responses if r.HasField("error")]
    return answer, health.within(start, stop)


def test_a_sole_callers_packed_message_of_many_small_items_lets_health_checks_in_between_its_slices(server):
    """1,024 items of one 512-class row with every extra: each slice of them is computed at once (the
    caller is alone), and the event loop answered nothing else until the whole message was (0.28 s)."""
    rng = np.random.default_rng(0)
    extras = ("target_logprob", "entropy", "target_rank", "argmax_correct")
    requests = [
        core.build(LossRequest(rng.standard_normal((1, 512)).astype(np.float16), np.array([i % 512]), extras=extras, id=str(i)))[0]
        for i in range(1024)
    ]
    answer, answered = packed_answers(server, pb.EvaluateBatch(requests=requests))
    assert len(answer.responses) == 1024
    assert answered >= 3, answered


def test_a_chunked_kl_div_broadcast_along_its_rows_is_computed_off_the_event_loop(server):
    with grpc.insecure_channel(server.address) as channel, BackgroundHealthChecks(server.address) as health:
        call = channel.stream_unary(
            "/lossd.v1.LossService/EvaluateChunked",
            request_serializer=pb.EvaluateChunk.SerializeToString,
            response_deserializer=pb.EvaluateResponse.FromString,
        )
        start = time.monotonic()
        answer = call(iter(kl_chunked_messages()), timeout=120)
        stop = time.monotonic()
    assert answer.counted == ROWS * CLASSES
    # on the event loop, not one health check sent during the computation was answered before it
    # ended; off it, they are answered one after another (about a second of compute)
    assert health.within(start, stop) >= 5, (health.within(start, stop), stop - start)
