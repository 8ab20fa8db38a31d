"""Concurrent mixed load, backpressure, deadlines and cancellation against real servers.

Every result is compared with torch computed for that request alone; the server's /metrics
endpoint shows that batches of more than one request really ran.
"""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import AsyncLossClient, DeadlineExceededError, LossClient, LossRequest, ResourceExhaustedError
from serverproc import HOG_FLAGS, EngineHog, ServerProcess, start_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(server: ServerProcess) -> dict[str, float]:
    return server.metrics()


@pytest.fixture
def metrics_server():
    servers: list[ServerProcess] = []

    def start(*flags: str) -> ServerProcess:
        server = start_server("--metrics-port", str(free_port()), *flags)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def mixed_case(i: int, rng: np.random.Generator) -> tuple[LossRequest, object]:
    """A request of one of many shapes / options, and torch's answer for it alone."""
    kind = i % 10
    reduction = ("mean", "sum", "none")[(i // 10) % 3]
    c = (3, 10, 33)[i % 3]
    n = int(rng.integers(1, 40))
    x = torch.from_numpy(rng.standard_normal((n, c)).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, c, n))
    if kind in (1, 4, 7):
        t[rng.random(n) < 0.3] = -100
    if kind == 0:
        return LossRequest(x, t, reduction=reduction), F.cross_entropy(x, t, reduction=reduction)
    if kind == 1:
        w = torch.linspace(0.5, 2.0, c)
        return LossRequest(x, t, weight=w, reduction=reduction), F.cross_entropy(x, t, weight=w, reduction=reduction)
    if kind == 2:
        ls = 0.1
        return LossRequest(x, t, label_smoothing=ls, reduction=reduction), F.cross_entropy(x, t, label_smoothing=ls, reduction=reduction)
    if kind == 3:
        d = int(rng.integers(1, 5))
        x3 = torch.from_numpy(rng.standard_normal((n, c, d)).astype(np.float32))
        t3 = torch.from_numpy(rng.integers(0, c, (n, d)))
        return LossRequest(x3, t3, reduction=reduction), F.cross_entropy(x3, t3, reduction=reduction)
    if kind == 4:
        logp = x.log_softmax(1)
        return LossRequest(logp, t, loss="nll_loss", reduction=reduction), F.nll_loss(logp, t, reduction=reduction)
    if kind == 5:
        y = torch.from_numpy(rng.random((n, c)).astype(np.float32))
        pw = torch.full((c,), 1.5)
        return (
            LossRequest(x, y, loss="binary_cross_entropy_with_logits", pos_weight=pw, reduction=reduction),
            F.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction=reduction),
        )
    if kind == 6:
        x1 = x[0]
        return LossRequest(x1, t[0].clamp(min=0), reduction=reduction), F.cross_entropy(x1, t[0].clamp(min=0), reduction=reduction)
    if kind == 7:
        t2 = t.clone()
        t2[t2 == -100] = 1
        return LossRequest(x, t2, ignore_index=1, reduction=reduction), F.cross_entropy(x, t2, ignore_index=1, reduction=reduction)
    if kind == 8:
        p = torch.softmax(torch.from_numpy(rng.standard_normal((n, c)).astype(np.float32)), 1)
        return LossRequest(x, p, reduction=reduction), F.cross_entropy(x, p, reduction=reduction)
    xd = x.double()
    w = torch.linspace(2.0, 0.5, c, dtype=torch.float64)
    return LossRequest(xd, t, weight=w, reduction=reduction), F.cross_entropy(xd, t, weight=w, reduction=reduction)


def test_500_mixed_requests_64_in_flight_each_equal_to_torch_alone(metrics_server):
    server = metrics_server("--max-wait-ms", "5")
    rng = np.random.default_rng(1234)
    cases = [mixed_case(i, rng) for i in range(520)]

    async def main():
        slots = asyncio.Semaphore(64)
        async with AsyncLossClient(server.address, timeout_s=120) as client:

            async def one(req):
                async with slots:
                    return await client.evaluate(req)

            return await asyncio.gather(*(one(req) for req, _ in cases))

    results = asyncio.run(asyncio.wait_for(main(), 300))
    assert len(results) == len(cases)
    for i, ((_, want), got) in enumerate(zip(cases, results, strict=True)):
        assert got.loss.dtype == want.dtype, i
        torch.testing.assert_close(got.loss, want, msg=lambda m, i=i: f"request {i}: {m}")
    m = scrape(server)
    batches = m["lossd_batch_requests_count"]
    computed = m["lossd_batch_requests_sum"]
    assert computed == len(cases)
    assert batches < len(cases), "no batch held more than one request"
    assert m['lossd_batch_requests_bucket{le="1.0"}'] < batches


def test_full_queue_answers_resource_exhausted_then_recovers(metrics_server):
    server = metrics_server(*HOG_FLAGS, "--max-queue-requests", "4")
    one_row = LossRequest(np.zeros((1, 5), np.float32), np.array([1]))

    async def main():
        async with AsyncLossClient(server.address, timeout_s=60) as client:
            with EngineHog(server):
                held = [asyncio.ensure_future(client.evaluate(one_row)) for _ in range(4)]
                for _ in range(600):  # bounded: the four reach the queue within seconds
                    if scrape(server).get("lossd_queue_depth") == 4:
                        break
                    await asyncio.sleep(0.05)
                assert scrape(server)["lossd_queue_depth"] == 4
                with pytest.raises(ResourceExhaustedError, match="max_queue_requests"):
                    await client.evaluate(one_row)
                for task in held:
                    task.cancel()
                await asyncio.gather(*held, return_exceptions=True)
                for _ in range(600):
                    if scrape(server).get("lossd_queue_depth") == 0:
                        break
                    await asyncio.sleep(0.05)
            x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
            t = np.array([0, 1, 2, 3])
            return await asyncio.gather(*(client.evaluate(LossRequest(x, t)) for _ in range(2)))

    results = asyncio.run(asyncio.wait_for(main(), 120))
    want = F.cross_entropy(torch.from_numpy(np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)), torch.tensor([0, 1, 2, 3]))
    for r in results:
        torch.testing.assert_close(torch.as_tensor(r.loss), want)
    m = scrape(server)
    # the hog (stopped when it was cancelled) and the two good calls; the cancelled calls were never computed
    assert m["lossd_batch_requests_sum"] - m["lossd_abandoned_evaluations_total"] == 2
    assert 'lossd_requests_total{code="RESOURCE_EXHAUSTED",method="Evaluate"}' in m


def test_expired_deadline_is_answered_and_never_computed(metrics_server):
    server = metrics_server(*HOG_FLAGS)
    x = np.ones((2, 3), np.float32)
    with LossClient(server.address) as client:
        with EngineHog(server):
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                client.evaluate(LossRequest(x, np.array([0, 1])), timeout_s=0.3)
            assert time.monotonic() - started < 60
        for _ in range(600):  # bounded: the server notices the expired call
            if scrape(server).get("lossd_queue_depth") == 0:
                break
            time.sleep(0.05)
        got = client.evaluate(LossRequest(np.zeros((4, 3), np.float32), np.array([0, 1, 2, 0])), timeout_s=60)
    assert got.counted == 4
    m = scrape(server)
    assert m["lossd_batch_requests_sum"] - m["lossd_abandoned_evaluations_total"] == 1


def test_stream_deadline_expires_queued_items(metrics_server):
    server = metrics_server(*HOG_FLAGS)
    reqs = [LossRequest(np.ones((1, 3), np.float32), np.array([0])) for _ in range(3)]
    with LossClient(server.address) as client:
        with EngineHog(server):
            with pytest.raises(DeadlineExceededError):
                list(client.evaluate_many(reqs, timeout_s=0.5))
    for _ in range(600):
        if scrape(server).get("lossd_queue_depth") == 0:
            break
        time.sleep(0.05)
    m = scrape(server)
    assert m["lossd_queue_depth"] == 0
    assert m.get("lossd_batch_requests_count", 0) - m.get("lossd_abandoned_evaluations_total", 0) == 0
