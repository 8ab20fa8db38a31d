"""Prometheus metrics: scraped from a real server's /metrics after known requests."""

from __future__ import annotations

import threading
import time
import urllib.request
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from lossd_client import LossClient, LossRequest, core
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from lossd_client.errors import InvalidArgumentError
from lossd_server import metrics as metrics_mod
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from rpc_outcomes import wait_for_metric
from serverproc import HOG_FLAGS, EngineHog, start_server

Samples = dict[tuple[str, frozenset], float]


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_for(port: int, name: str, target: float, before: Samples, **labels: str) -> Samples:
    """Scrape until ``name`` moved by ``target`` (bounded); the caller asserts exact values."""
    for _ in range(50):
        after = scrape(port)
        if delta(before, after, name, **labels) >= target:
            return after
        time.sleep(0.1)
    return after


@pytest.fixture(scope="module")
def mserver():
    proc = start_server("--drain-s", "0", metrics=True)
    try:
        assert proc.metrics_port, proc.log()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def mclient(mserver):
    with LossClient(mserver.address, timeout_s=60) as c:
        yield c


def _ok_request(seed: int) -> LossRequest:
    g = np.random.default_rng(seed)
    return LossRequest(g.standard_normal((10, 7)).astype(np.float32), g.integers(0, 7, 10))


def _bad_request() -> LossRequest:
    return LossRequest(np.zeros((4, 3), np.float32), np.array([0, 1, 2, 3]))


def test_request_counter_latency_and_bytes_move_exactly(mserver, mclient):
    before = scrape(mserver.metrics_port)
    sent = 0
    for seed in range(3):
        req = _ok_request(seed)
        got = mclient.evaluate(req).loss
        want = torch.nn.functional.cross_entropy(torch.from_numpy(req.input), torch.from_numpy(req.target))
        torch.testing.assert_close(torch.from_numpy(np.asarray(got)), want)
        sent += core.build(req)[0].ByteSize()
    for _ in range(2):
        with pytest.raises(InvalidArgumentError):
            mclient.evaluate(_bad_request())
        sent += core.build(_bad_request())[0].ByteSize()
    after = scrape(mserver.metrics_port)

    assert delta(before, after, "lossd_requests_total", method="Evaluate", code="OK") == 3
    assert delta(before, after, "lossd_requests_total", method="Evaluate", code="INVALID_ARGUMENT") == 2
    assert delta(before, after, "lossd_requests_total", method="Evaluate", code="UNKNOWN") == 0
    assert delta(before, after, "lossd_request_latency_seconds_count", method="Evaluate") == 5
    assert delta(before, after, "lossd_request_latency_seconds_bucket", method="Evaluate", le="+Inf") == 5
    assert delta(before, after, "lossd_received_bytes_total", method="Evaluate") == sent
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in after.items()
        if name == "lossd_request_latency_seconds_bucket" and dict(labels).get("method") == "Evaluate"
    )
    assert [le for le, _ in buckets][:2] == [0.0001, 0.00025] and buckets[-1][0] == float("inf")
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:], strict=False))
    assert value(after, "lossd_requests_in_flight", method="Evaluate") == 0


def test_streaming_methods_are_counted_by_status(mserver):
    before = scrape(mserver.metrics_port)
    with grpc.insecure_channel(mserver.address) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        headerless = pb.EvaluateChunk(input_rows=b"\0" * 16)
        with pytest.raises(grpc.RpcError) as info:
            stub.EvaluateChunked(iter([headerless]), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        msg, _ = core.build(_ok_request(7))
        reply = stub.EvaluateChunked(core.chunk_messages(msg, chunk_bytes=64), timeout=30)
        assert reply.counted == 10
        items = [core.build(_ok_request(i))[0] for i in range(4)]
        for i, item in enumerate(items):
            item.id = str(i)
        answers = list(stub.EvaluateStream(iter(items), timeout=30))
        assert sorted(a.id for a in answers) == ["0", "1", "2", "3"]
        stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    after = scrape(mserver.metrics_port)
    assert delta(before, after, "lossd_requests_total", method="EvaluateChunked", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "lossd_requests_total", method="EvaluateChunked", code="OK") == 1
    assert delta(before, after, "lossd_requests_total", method="EvaluateStream", code="OK") == 1
    assert delta(before, after, "lossd_requests_total", method="GetServerInfo", code="OK") == 1
    chunk_bytes = headerless.ByteSize() + sum(c.ByteSize() for c in core.chunk_messages(msg, chunk_bytes=64))
    assert delta(before, after, "lossd_received_bytes_total", method="EvaluateChunked") == chunk_bytes
    assert delta(before, after, "lossd_received_bytes_total", method="EvaluateStream") == sum(i.ByteSize() for i in items)


def test_calls_past_their_deadline_are_counted_deadline_exceeded(mserver):
    """A call whose deadline passes while the server waits for its next message reaches the
    handler as an end of stream ("no message", "0 of N rows"): it used to be counted
    INVALID_ARGUMENT, blaming the client's input for what the client sees as DEADLINE_EXCEEDED."""
    msg, _ = core.build(_ok_request(8))
    chunks = list(core.chunk_messages(msg, chunk_bytes=64))
    before = scrape(mserver.metrics_port)
    with grpc.insecure_channel(mserver.address) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        evaluate = channel.stream_unary("/lossd.v1.LossService/Evaluate", pb.EvaluateRequest.SerializeToString, pb.EvaluateResponse.FromString)

        def late(messages):
            yield from messages[:-1]
            time.sleep(1.0)  # past the call's 0.3 s deadline
            yield messages[-1]

        for rpc, messages in ((stub.EvaluateChunked, chunks), (evaluate, [msg])):
            with pytest.raises(grpc.RpcError) as info:
                rpc(late(messages), timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(mserver.metrics_port, "lossd_requests_total", 1, before, method="Evaluate", code="DEADLINE_EXCEEDED")
    after = wait_for(mserver.metrics_port, "lossd_requests_total", 1, before, method="EvaluateChunked", code="DEADLINE_EXCEEDED")
    for method in ("EvaluateChunked", "Evaluate"):
        assert delta(before, after, "lossd_requests_total", method=method, code="DEADLINE_EXCEEDED") == 1
        assert delta(before, after, "lossd_requests_total", method=method, code="INVALID_ARGUMENT") == 0


def test_calls_the_client_cancels_are_counted_cancelled(mserver):
    """A cancel reaches a waiting read as an end of stream ("no message", "0 of N rows") just
    before gRPC cancels the handler; such calls used to be counted INVALID_ARGUMENT."""
    msg, _ = core.build(_ok_request(9))
    chunks = list(core.chunk_messages(msg, chunk_bytes=64))
    release = threading.Event()

    def stalled(messages):
        yield from messages
        release.wait(30)

    before = scrape(mserver.metrics_port)
    try:
        with grpc.insecure_channel(mserver.address) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            evaluate = channel.stream_unary("/lossd.v1.LossService/Evaluate", pb.EvaluateRequest.SerializeToString, pb.EvaluateResponse.FromString)
            for _ in range(3):
                calls = [stub.EvaluateChunked.future(stalled(chunks[:2]), timeout=30), evaluate.future(stalled([]), timeout=30)]
                time.sleep(0.3)
                for call in calls:
                    call.cancel()
    finally:
        release.set()
    after = wait_for(mserver.metrics_port, "lossd_requests_total", 3, before, method="Evaluate", code="CANCELLED")
    after = wait_for(mserver.metrics_port, "lossd_requests_total", 3, before, method="EvaluateChunked", code="CANCELLED")
    for method in ("EvaluateChunked", "Evaluate"):
        assert delta(before, after, "lossd_requests_total", method=method, code="CANCELLED") == 3
        assert delta(before, after, "lossd_requests_total", method=method, code="INVALID_ARGUMENT") == 0


def test_batch_histograms_move_exactly(mserver, mclient):
    """Sequential requests of 10 rows: one batch each (needs the batcher to call its observer)."""
    before = scrape(mserver.metrics_port)
    for seed in range(3):
        mclient.evaluate(_ok_request(seed))
    after = wait_for(mserver.metrics_port, "lossd_batch_requests_count", 3, before)
    assert delta(before, after, "lossd_batch_requests_count") == 3
    assert delta(before, after, "lossd_batch_requests_bucket", le="1.0") == 3
    assert delta(before, after, "lossd_batch_requests_sum") == 3
    assert delta(before, after, "lossd_batch_rows_bucket", le="1.0") == 0
    assert delta(before, after, "lossd_batch_rows_bucket", le="16.0") == 3
    assert delta(before, after, "lossd_batch_rows_sum") == 30
    assert delta(before, after, "lossd_rows_total") == 30
    assert delta(before, after, "lossd_batch_input_bytes_total") == 3 * 10 * 7 * 4
    assert delta(before, after, "lossd_queue_wait_seconds_count") == 3
    assert delta(before, after, "lossd_compute_seconds_count") == 3
    assert value(after, "lossd_queue_depth") == 0


def test_process_and_build_gauges(mserver, mclient):
    samples = scrape(mserver.metrics_port)
    assert value(samples, "lossd_process_rss_bytes") > 10 * 2**20
    assert value(samples, "lossd_device_memory_bytes") == 0
    assert value(samples, "lossd_build_info", version=mclient.server_info().version, torch_version=torch.__version__, device="cpu") == 1
    assert not any(name.endswith("_created") for name, _ in samples)


def test_batch_observer_contract_with_own_registry():
    m = metrics_mod.Metrics(CollectorRegistry())
    observer = metrics_mod.BatchMetrics(m)
    observer.on_batch(
        SimpleNamespace(
            requests=3,
            rows=300,
            bytes=1200,
            queue_wait_s=[0.0002, 0.003, 0.2],
            compute_s=1.5,
            abandoned=2,
            evaluated_rows=100,
            evaluated_bytes=400,
        )
    )
    observer.on_batch(
        SimpleNamespace(
            requests=1, rows=1, bytes=4, queue_wait_s=[0.00005], compute_s=0.0004, abandoned=0, evaluated_rows=1, evaluated_bytes=4
        )
    )
    observer.on_queue_depth(5)

    def sample(name: str, **labels: str) -> float:
        for metric in (m.batch_requests, m.batch_rows, m.queue_wait, m.compute, m.rows, m.batch_bytes, m.queue_depth, m.abandoned):
            for family in metric.collect():
                for s in family.samples:
                    if s.name == name and s.labels == labels:
                        return s.value
        raise KeyError(name)

    assert sample("lossd_batch_requests_bucket", le="1.0") == 1
    assert sample("lossd_batch_requests_bucket", le="2.0") == 1
    assert sample("lossd_batch_requests_bucket", le="4.0") == 2
    assert sample("lossd_batch_rows_bucket", le="256.0") == 1
    assert sample("lossd_batch_rows_bucket", le="1024.0") == 2
    assert sample("lossd_rows_total") == 101  # the rows of the 2 abandoned requests were not evaluated
    assert sample("lossd_batch_input_bytes_total") == 404
    assert sample("lossd_queue_wait_seconds_bucket", le="0.0001") == 1
    assert sample("lossd_queue_wait_seconds_bucket", le="0.00025") == 2
    assert sample("lossd_queue_wait_seconds_bucket", le="0.005") == 3
    assert sample("lossd_queue_wait_seconds_bucket", le="0.25") == 4
    assert sample("lossd_queue_wait_seconds_count") == 4
    assert sample("lossd_compute_seconds_bucket", le="0.0005") == 1
    assert sample("lossd_compute_seconds_bucket", le="1.0") == 1
    assert sample("lossd_compute_seconds_bucket", le="2.5") == 2
    assert sample("lossd_queue_depth") == 5
    assert sample("lossd_abandoned_evaluations_total") == 2


def test_metrics_port_zero_disables_http(server):
    assert server.metrics_port is None
    assert "metrics on" not in server.log()


def _codes(samples: Samples, method: str) -> dict[str, float]:
    return {
        dict(labels)["code"]: v
        for (name, labels), v in samples.items()
        if name == "lossd_requests_total" and dict(labels)["method"] == method
    }


def _code_deltas(before: Samples, after: Samples, method: str) -> dict[str, float]:
    b, a = _codes(before, method), _codes(after, method)
    return {code: a[code] - b.get(code, 0.0) for code in a if a[code] - b.get(code, 0.0)}


def _wait_counted(port: int, before: Samples, method: str, calls: int) -> dict[str, float]:
    """The codes counted for ``method`` since ``before``, once ``calls`` calls are counted (bounded wait)."""
    for _ in range(100):
        counted = _code_deltas(before, scrape(port), method)
        if sum(counted.values()) >= calls:
            return counted
        time.sleep(0.1)
    return counted


def test_client_deadlines_are_counted_deadline_exceeded_not_cancelled(mserver):
    """The client's deadline reaches the server as a cancel a moment before the server's copy of the
    deadline expires (it starts when the headers were read): such calls were counted CANCELLED, and
    the client saw DEADLINE_EXCEEDED. EvaluateChunked after its header, EvaluateStream after one
    answered item, then the client stalls past its deadline; every call must be counted as the client saw it."""
    msg, _ = core.build(_ok_request(11))
    first_chunk = next(iter(core.chunk_messages(msg, chunk_bytes=64)))
    item = core.build(_ok_request(12))[0]
    release = threading.Event()

    def stalled(first):
        yield first
        release.wait(5)

    calls = 5
    try:
        with grpc.insecure_channel(mserver.address) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            for method, call in (
                ("EvaluateChunked", lambda: stub.EvaluateChunked(stalled(first_chunk), timeout=0.5)),
                ("EvaluateStream", lambda: list(stub.EvaluateStream(stalled(item), timeout=0.5))),
            ):
                before = scrape(mserver.metrics_port)
                for _ in range(calls):
                    with pytest.raises(grpc.RpcError) as info:
                        call()
                    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    release.set()
                    release.clear()
                assert _wait_counted(mserver.metrics_port, before, method, calls) == {"DEADLINE_EXCEEDED": calls}, method
    finally:
        release.set()


def test_cancelled_and_timed_out_streams_are_never_counted_ok(mserver):
    """A cancel reaches a stream's waiting read as a plain end of stream: the stream then ended with
    nothing to answer, its handler returned, and the call was counted OK (the client saw CANCELLED
    or DEADLINE_EXCEEDED). Repeated: the cancel does not always land after the end of stream."""
    release = threading.Event()

    def silent():
        release.wait(5)
        return
        yield

    calls = 8
    try:
        with grpc.insecure_channel(mserver.address) as channel:
            for method in ("EvaluateStream", "EvaluatePacked"):
                rpc = channel.stream_stream(f"/lossd.v1.LossService/{method}")
                for mode in ("CANCELLED", "DEADLINE_EXCEEDED"):
                    before = scrape(mserver.metrics_port)
                    for _ in range(calls):
                        if mode == "CANCELLED":
                            in_flight = f'lossd_requests_in_flight{{method="{method}"}}'
                            assert wait_for_metric(mserver, in_flight, lambda v: v == 0) == 0  # the previous call is over
                            call = rpc(silent(), timeout=30)
                            assert wait_for_metric(mserver, in_flight, lambda v: v >= 1) >= 1  # its handler runs: cancel it
                            call.cancel()
                        else:
                            with pytest.raises(grpc.RpcError) as info:
                                list(rpc(silent(), timeout=0.3))
                            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                        release.set()
                        release.clear()
                    assert _wait_counted(mserver.metrics_port, before, method, calls) == {mode: calls}, (method, mode)
    finally:
        release.set()


def test_calls_refused_past_max_concurrent_calls_are_counted():
    """gRPC's own limit refused calls past --max-concurrent-calls before the metrics interceptor ran:
    the client got RESOURCE_EXHAUSTED and no lossd_* series moved. Health checks, which have slots of
    their own, are answered while lossd's are full, and counted when refused past their own."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = start_server("--max-concurrent-calls", "2", "--stream-idle-timeout-s", "60", "--drain-s", "0", metrics=True)
    release = threading.Event()

    def silent():
        release.wait(30)
        return
        yield

    try:
        with grpc.insecure_channel(server.address) as channel:
            held = [channel.stream_stream("/lossd.v1.LossService/EvaluateStream")(silent(), timeout=60) for _ in range(2)]
            for _ in range(50):
                if value(scrape(server.metrics_port), "lossd_requests_in_flight", method="EvaluateStream") == 2:
                    break
                time.sleep(0.1)
            before = scrape(server.metrics_port)
            info = channel.unary_unary("/lossd.v1.LossService/GetServerInfo")
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(5):
                with pytest.raises(grpc.RpcError) as refused:
                    info(b"", timeout=30)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for _ in range(3):
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
            after = scrape(server.metrics_port)
            assert _code_deltas(before, after, "GetServerInfo") == {"RESOURCE_EXHAUSTED": 5}
            assert _code_deltas(before, after, "Check") == {"OK": 3}
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(2)]
            assert [next(w).status for w in watches] == [health_pb2.HealthCheckResponse.SERVING] * 2  # both hold a slot
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as refused:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _code_deltas(after, scrape(server.metrics_port), "Check") == {"RESOURCE_EXHAUSTED": 3}
            for watch in watches:
                watch.cancel()
            release.set()
            for call in held:
                assert list(call) == []
            # the slots come back
            assert pb.ServerInfo.FromString(info(b"", timeout=30)).version
            final = scrape(server.metrics_port)
            assert _code_deltas(after, final, "GetServerInfo") == {"OK": 1}
            assert _code_deltas(before, final, "EvaluateStream") == {"OK": 2}
    finally:
        release.set()
        assert server.stop() == 0, server.log()


def test_an_abandoned_evaluation_adds_no_rows_or_batch_bytes():
    """A million-row request cancelled mid-compute added its million rows to lossd_rows_total (and its
    bytes to lossd_batch_input_bytes_total): they count evaluated work only; the abandoned request
    is lossd_abandoned_evaluations_total."""
    server = start_server(*HOG_FLAGS, "--drain-s", "0", metrics=True)
    try:
        before = scrape(server.metrics_port)
        with EngineHog(server):
            pass  # the hog is computing: leaving cancels it
        after = wait_for(server.metrics_port, "lossd_abandoned_evaluations_total", 1, before)
        assert delta(before, after, "lossd_abandoned_evaluations_total") == 1
        assert delta(before, after, "lossd_batch_requests_count") == 1
        assert delta(before, after, "lossd_rows_total") == 0
        assert delta(before, after, "lossd_batch_input_bytes_total") == 0
        with LossClient(server.address, timeout_s=60) as client:
            client.evaluate(_ok_request(13))
        after = wait_for(server.metrics_port, "lossd_rows_total", 10, after)
        assert delta(before, after, "lossd_rows_total") == 10
        assert delta(before, after, "lossd_batch_input_bytes_total") == 10 * 7 * 4
    finally:
        assert server.stop() == 0, server.log()
