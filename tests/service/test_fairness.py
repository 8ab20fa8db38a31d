"""Fairness between callers (``--fair-share-by``) on real servers over loopback: connections that keep
the batcher's queue full of heavy work do not keep another connection's request out.

Before, the queue was one FIFO: 16 connections sending 98 KB kl_div requests of a second or two of
engine each kept it full, and a 5 ms request of another connection was refused RESOURCE_EXHAUSTED at
once (probe 20, exp6: 0 of 38). The flood here is the same trick scaled down: an input of N rows
against a target of one row is broadcast to N x V elements of work for a few hundred KB of request.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import LossClient, LossRequest, ResourceExhaustedError, tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from serverproc import HOG_FLAGS, EngineHog, ServerProcess, start_server

MiB = 1 << 20


def kl_flood_request(rows: int, classes: int) -> tuple[bytes, int]:
    """A kl_div request whose (1, classes) target is broadcast along ``rows`` input rows; its wire
    bytes and its work (the broadcast output's bytes, what max_queue_bytes counts)."""
    msg = pb.EvaluateRequest(options=pb.LossOptions(loss=pb.KL_DIV))
    tensors.to_proto(np.log(np.full((rows, 1), 0.5, np.float32)), msg.input)
    tensors.to_proto(np.full((1, classes), 1.0 / classes, np.float32), msg.target)
    return msg.SerializeToString(), rows * classes * 4


def connection(server: ServerProcess) -> grpc.Channel:
    """A channel with a connection of its own (gRPC shares one between channels to an address by default)."""
    return grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])


def evaluate(channel: grpc.Channel):
    return channel.unary_unary("/lossd.v1.LossService/Evaluate", response_deserializer=pb.EvaluateResponse.FromString)


VICTIM = LossRequest(np.random.default_rng(0).standard_normal((64, 1000), dtype=np.float32), np.random.default_rng(1).integers(0, 1000, 64))
VICTIM_TORCH = F.cross_entropy(torch.from_numpy(VICTIM.input), torch.from_numpy(VICTIM.target))


def victim_in_background(server: ServerProcess, outcome: list) -> threading.Thread:
    """The victim's call (its own connection, a 30 s deadline) on a thread; its result or error lands in ``outcome``."""

    def call() -> None:
        with LossClient(server.address) as client:
            try:
                outcome.append(client.evaluate(VICTIM, timeout_s=30))
            except Exception as exc:  # noqa: BLE001 - the test reports it
                outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def wait_for(what: str, predicate, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s  # a bound, not a measurement: the condition holds within milliseconds
    while not predicate():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


#: Held on the engine by EngineHog: 65536 rows of 256 classes, one row per 32-byte engine chunk (HOG_FLAGS):
#: 64 MiB of work that takes the engine seconds, so that the order the engine takes requests in shows.
HELD_FLOOD, HELD_WORK = kl_flood_request(65536, 256)


def fill_the_queue(server: ServerProcess, channels: list[grpc.Channel]) -> list[grpc.Future]:
    """With the engine held, one heavy request from each flood connection: the queue (3 x their
    work) is full, and a fourth from one of them is refused at once with the words it always had."""
    flood = [evaluate(channel).future(HELD_FLOOD, timeout=120) for channel in channels]
    wait_for("the flood queued", lambda: server.metrics().get("lossd_queue_depth") == len(channels))
    with pytest.raises(grpc.RpcError) as refused:
        evaluate(channels[0])(HELD_FLOOD, timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    queued = len(channels) * HELD_WORK
    assert refused.value.details() == f"queue full: {queued} bytes queued, this request adds {HELD_WORK} (max_queue_bytes={queued})"
    return flood


def test_a_connection_gets_into_a_queue_others_keep_full_and_is_served_before_their_backlog():
    """Three connections fill the queue with heavy work; a fourth's small request pushes the newest of
    them out (that caller gets RESOURCE_EXHAUSTED saying why) and is the next one the engine takes.
    Before: refused RESOURCE_EXHAUSTED at once ("queue full: ... (max_queue_bytes=...)")."""
    server = start_server(*HOG_FLAGS, "--max-queue-bytes", str(3 * HELD_WORK), metrics=True)
    channels = [connection(server) for _ in range(3)]
    try:
        outcome: list = []
        with EngineHog(server):
            flood = fill_the_queue(server, channels)
            victim = victim_in_background(server, outcome)
            wait_for("a flood request pushed out", lambda: any(f.done() for f in flood) or bool(outcome))
            assert outcome == [], outcome  # not refused: it waits for the engine
            (pushed_out,) = [f for f in flood if f.done()]
            assert pushed_out.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "pushed out of the queue for a caller with less than its share (fair_share_by=connection)" in pushed_out.details()
            assert f"max_queue_bytes={3 * HELD_WORK}" in pushed_out.details()
            assert server.metrics()['lossd_queue_pushed_out_total{limit="max_queue_bytes"}'] == 1
            batches = server.metrics()["lossd_batch_requests_count"]
        victim.join(60)  # the hog is cancelled: the engine takes the next request
        (result,) = outcome
        assert not isinstance(result, BaseException), result
        torch.testing.assert_close(torch.as_tensor(result.loss), VICTIM_TORCH)
        # taken before the two flood requests queued ahead of it: only the hog's batch and its own are done
        assert server.metrics()["lossd_batch_requests_count"] == batches + 2
        assert not any(f.done() for f in flood if f is not pushed_out)
    finally:
        for channel in channels:
            channel.close()
        server.stop()


def test_with_fair_share_by_off_a_full_queue_refuses_every_caller_as_before():
    server = start_server(*HOG_FLAGS, "--max-queue-bytes", str(3 * HELD_WORK), "--fair-share-by", "off", metrics=True)
    channels = [connection(server) for _ in range(3)]
    try:
        with EngineHog(server):
            flood = fill_the_queue(server, channels)
            with LossClient(server.address) as client:
                with pytest.raises(ResourceExhaustedError) as refused:
                    client.evaluate(VICTIM, timeout_s=30)
            queued = 3 * HELD_WORK
            assert (
                refused.value.details
                == f"queue full: {queued} bytes queued, this request adds {VICTIM.input.nbytes} (max_queue_bytes={queued})"
            )
            assert not any(f.done() for f in flood)
            assert server.metrics()['lossd_queue_pushed_out_total{limit="max_queue_bytes"}'] == 0  # exported at 0, never counted
    finally:
        for channel in channels:
            channel.close()
        server.stop()


def test_a_small_request_is_answered_while_connections_flood_the_queue_with_heavy_work():
    """Six connections send kl_div requests of about 0.15 s of engine each without pause for about two
    seconds (the queue holds three; the others are refused and send again); another connection's
    64 x 1000 cross_entropy, sent five times meanwhile with a 30 s deadline, is answered each time
    (in about 0.15 s here: it waits for the request being computed)."""
    flood_request, work = kl_flood_request(1024, 16384)  # 2**24 elements, 64 MiB of work
    server = start_server("--compute-threads", "1", "--max-queue-bytes", str(3 * work), metrics=True)
    channels = [connection(server) for _ in range(6)]
    stop = threading.Event()
    codes: dict[str, int] = {}

    def flood(channel: grpc.Channel) -> None:
        call = evaluate(channel)
        deadline = time.monotonic() + 30  # a bound: the test stops it long before
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                call(flood_request, timeout=60)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                time.sleep(0.01)  # refused: again at once (nearly), as a flood does
            codes[code] = codes.get(code, 0) + 1

    threads = [threading.Thread(target=flood, args=(channel,), daemon=True) for channel in channels]
    try:
        for thread in threads:
            thread.start()
        wait_for("the queue full", lambda: codes.get("RESOURCE_EXHAUSTED", 0) > 0)
        results = []
        with LossClient(server.address) as client:
            for _ in range(5):
                results.append(client.evaluate(VICTIM, timeout_s=30))
                time.sleep(0.3)  # the flood goes on meanwhile
        for result in results:
            torch.testing.assert_close(torch.as_tensor(result.loss), VICTIM_TORCH)
    finally:
        stop.set()
        for thread in threads:
            thread.join(90)
        for channel in channels:
            channel.close()
        server.stop()
    assert codes.get("OK", 0) > 0 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
