"""Batcher and batch engine, driven directly in an event loop.

Batches are closed deterministically: a huge max_wait_ms plus a row limit (or the timer of a
small max_wait_ms when every request was submitted in the same loop iteration) decides when a
batch runs; no sleep races a batch.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
import torch.nn.functional as F
from lossd_server import batch_engine, engine
from lossd_server.batcher import Batcher, BatcherClosed, BatchFigures, DeadlineExpired, QueueFull
from lossd_server.config import ServerConfig

HUGE_WAIT_MS = 3_600_000.0


class Recorder:
    """Observer + evaluate wrapper that records what was computed."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[BatchFigures] = []
        self.depths: list[int] = []
        self.computed: list[list[batch_engine.Job]] = []
        self.fail = fail

    def on_batch(self, figures: BatchFigures) -> None:
        self.batches.append(figures)

    def on_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def evaluate(self, jobs, **kwargs):
        self.computed.append(list(jobs))
        if self.fail:
            raise RuntimeError("engine exploded")
        return batch_engine.evaluate_batch(jobs, **kwargs)


def ce_request(n: int, c: int = 7, *, seed: int = 0, reduction: str = "mean", **spec_kwargs):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    t = torch.randint(0, c, (n,), generator=g)
    spec = engine.LossSpec(reduction=reduction, **spec_kwargs)
    return engine.plan(spec, x.shape, x.dtype, t), x, t


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def with_batcher(recorder: Recorder, body, **config):
    batcher = Batcher(ServerConfig(**config), torch.device("cpu"), observer=recorder, evaluate=recorder.evaluate)
    await batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.close()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_row_limit_closes_the_batch_and_every_result_is_exact():
    rec = Recorder()
    reqs = [ce_request(4, seed=i, reduction=("mean", "sum", "none")[i % 3]) for i in range(5)]

    async def body(b: Batcher):
        tasks = [asyncio.ensure_future(b.submit(*r)) for r in reqs[:4]]
        await settle()
        assert rec.batches == [] and b.queue_depth == 4
        tasks.append(asyncio.ensure_future(b.submit(*reqs[4])))
        return await asyncio.gather(*tasks)

    results = run(with_batcher(rec, body, max_wait_ms=HUGE_WAIT_MS, max_batch_rows=20))
    assert [f.requests for f in rec.batches] == [5]
    assert rec.batches[0].rows == 20 and rec.batches[0].bytes == 20 * 7 * 4
    assert len(rec.batches[0].queue_wait_s) == 5 and all(w >= 0 for w in rec.batches[0].queue_wait_s)
    assert rec.batches[0].compute_s > 0
    assert rec.depths[-1] == 0
    for (plan, x, t), got in zip(reqs, results, strict=True):
        torch.testing.assert_close(got.loss, F.cross_entropy(x, t, reduction=plan.spec.reduction))


def test_byte_limit_closes_the_batch():
    rec = Recorder()
    reqs = [ce_request(2, seed=i) for i in range(3)]

    async def body(b: Batcher):
        return await asyncio.gather(*(b.submit(*r) for r in reqs))

    run(with_batcher(rec, body, max_wait_ms=HUGE_WAIT_MS, max_batch_bytes=3 * 2 * 7 * 4))
    assert [f.requests for f in rec.batches] == [3]


def test_max_wait_closes_a_batch_started_by_its_first_request():
    rec = Recorder()
    reqs = [ce_request(3, seed=i) for i in range(4)]

    async def body(b: Batcher):
        return await asyncio.gather(*(b.submit(*r) for r in reqs))

    results = run(with_batcher(rec, body, max_wait_ms=20.0))
    assert [f.requests for f in rec.batches] == [4]
    for (_, x, t), got in zip(reqs, results, strict=True):
        torch.testing.assert_close(got.loss, F.cross_entropy(x, t))


def test_incompatible_requests_form_separate_batches_in_the_same_cycle():
    rec = Recorder()
    w = torch.rand(7)
    kinds = [
        {},
        {"loss": engine.NLL},
        {"label_smoothing": 0.1},
        {"weight": w},
        {"c": 5},
    ]
    reqs = []
    for k, kw in enumerate(kinds):
        for i in range(2):
            opts = dict(kw)
            weight = opts.pop("weight", None)
            c = opts.pop("c", 7)
            plan, x, t = ce_request(2, c, seed=10 * k + i, **opts)
            if weight is not None:
                plan = engine.plan(plan.spec, x.shape, x.dtype, t, weight.clone())
            reqs.append((plan, x, t, weight))

    async def body(b: Batcher):
        return await asyncio.gather(*(b.submit(p, x, t) for p, x, t, _ in reqs))

    results = run(with_batcher(rec, body, max_wait_ms=HUGE_WAIT_MS, max_batch_rows=4))
    assert sorted(f.requests for f in rec.batches) == [2] * len(kinds)
    for batch in rec.computed:
        keys = {batch_engine.batch_key(j.plan, 1 << 40) for j in batch}
        assert len(keys) == 1
    for (plan, x, t, weight), got in zip(reqs, results, strict=True):
        spec = plan.spec
        if spec.loss == engine.NLL:
            want = F.nll_loss(x, t)
        else:
            want = F.cross_entropy(x, t, weight=weight, label_smoothing=spec.label_smoothing)
        torch.testing.assert_close(got.loss, want)


def test_options_resolved_per_request_share_a_batch():
    """ignore_index, reduction, extras and sequence stats do not change the per-row maths."""
    rec = Recorder()
    g = torch.Generator().manual_seed(3)
    x1, t1 = torch.randn(2, 3, 5, generator=g), torch.randint(0, 5, (2, 3), generator=g)
    p1 = engine.plan(engine.LossSpec(class_axis=-1, extras=("entropy", "target_rank"), sequence_stats=True), x1.shape, x1.dtype, t1)
    x2, t2 = torch.randn(3, 5, generator=g), torch.tensor([1, 2, 1])
    p2 = engine.plan(engine.LossSpec(ignore_index=1, reduction="sum"), x2.shape, x2.dtype, t2)
    x3, t3 = torch.randn(5, generator=g), torch.tensor(4)
    p3 = engine.plan(engine.LossSpec(reduction="none"), x3.shape, x3.dtype, t3)
    x4, t4 = torch.randn(2, 5, 3, generator=g).to(torch.float16), torch.randint(0, 5, (2, 3), generator=g)
    p4 = engine.plan(engine.LossSpec(reduction="none"), x4.shape, x4.dtype, t4)

    async def body(b: Batcher):
        return await asyncio.gather(b.submit(p1, x1, t1), b.submit(p2, x2, t2), b.submit(p3, x3, t3), b.submit(p4, x4, t4))

    r1, r2, r3, r4 = run(with_batcher(rec, body, max_wait_ms=HUGE_WAIT_MS, max_batch_rows=6 + 3 + 1 + 6))
    assert [f.requests for f in rec.batches] == [4]
    torch.testing.assert_close(r1.loss, F.cross_entropy(x1.transpose(1, 2), t1))
    logp = x1.log_softmax(-1)
    torch.testing.assert_close(r1.extras["entropy"], -(logp.exp() * logp).sum(-1))
    torch.testing.assert_close(r1.sequences.nll_sum, F.cross_entropy(x1.transpose(1, 2), t1, reduction="none").sum(1).double().tolist())
    torch.testing.assert_close(r2.loss, F.cross_entropy(x2, t2, ignore_index=1, reduction="sum"))
    assert r2.counted == 1
    torch.testing.assert_close(r3.loss, F.cross_entropy(x3, t3, reduction="none"))
    want4 = F.cross_entropy(x4.float(), t4, reduction="none").to(torch.float16)
    assert r4.loss.dtype == torch.float16
    torch.testing.assert_close(r4.loss, want4)


def test_batching_off_evaluates_each_request_alone_off_the_loop():
    rec = Recorder()
    reqs = [ce_request(3, seed=i) for i in range(3)]
    threads = []

    def evaluate(jobs, **kwargs):
        import threading

        threads.append(threading.current_thread().name)
        return rec.evaluate(jobs, **kwargs)

    async def body():
        b = Batcher(ServerConfig(max_wait_ms=0), torch.device("cpu"), observer=rec, evaluate=evaluate)
        await b.start()
        try:
            return await asyncio.gather(*(b.submit(*r) for r in reqs))
        finally:
            await b.close()

    run(body())
    assert [f.requests for f in rec.batches] == [1, 1, 1]
    assert all(name.startswith("lossd-engine") for name in threads)


def test_queue_full_names_the_limit_and_recovers():
    rec = Recorder()

    async def body(b: Batcher):
        waiting = [asyncio.ensure_future(b.submit(*ce_request(2, seed=i))) for i in range(2)]
        await settle()
        with pytest.raises(QueueFull) as info:
            await b.submit(*ce_request(2, seed=9))
        assert info.value.limit == "max_queue_requests" and "max_queue_requests=2" in str(info.value)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert b.queue_depth == 0
        assert b._open == {}  # cancelled requests left their batch
        closer = [asyncio.ensure_future(b.submit(*ce_request(50, seed=i))) for i in range(2)]
        return await asyncio.gather(*closer)

    results = run(with_batcher(rec, body, max_wait_ms=HUGE_WAIT_MS, max_batch_rows=100, max_queue_requests=2))
    assert len(results) == 2
    assert sum(len(b) for b in rec.computed) == 2  # the cancelled ones were never computed


def test_queue_bytes_limit():
    rec = Recorder()

    async def body(b: Batcher):
        first = asyncio.ensure_future(b.submit(*ce_request(4, seed=1)))
        await settle()
        with pytest.raises(QueueFull) as info:
            await b.submit(*ce_request(4, seed=2))
        assert info.value.limit == "max_queue_bytes"
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        return await b.submit(*ce_request(8, seed=3))  # alone, an oversized request is still admitted

    run(with_batcher(rec, body, max_wait_ms=HUGE_WAIT_MS, max_batch_rows=8, max_queue_bytes=4 * 7 * 4 + 10))


def test_cancelled_requests_are_never_computed():
    rec = Recorder()
    reqs = [ce_request(2, seed=i) for i in range(3)]

    async def body(b: Batcher):
        victim = asyncio.ensure_future(b.submit(*reqs[0]))
        await settle()
        victim.cancel()
        await asyncio.gather(victim, return_exceptions=True)
        assert victim.cancelled()
        return await asyncio.gather(b.submit(*reqs[1]), b.submit(*reqs[2]))

    run(with_batcher(rec, body, max_wait_ms=HUGE_WAIT_MS, max_batch_rows=4))
    computed = [j for batch in rec.computed for j in batch]
    assert reqs[0][0] not in [j.plan for j in computed] and len(computed) == 2


def test_expired_deadlines_are_dropped_before_compute():
    rec = Recorder()
    reqs = [ce_request(2, seed=i) for i in range(2)]

    async def body(b: Batcher):
        with pytest.raises(DeadlineExpired):
            await b.submit(*reqs[0], deadline=time.monotonic() - 1.0)
        deadline = time.monotonic() + 0.05
        late = asyncio.ensure_future(b.submit(*reqs[0], deadline=deadline))
        await settle()
        while time.monotonic() < deadline + 0.01:  # bounded: 60 ms
            await asyncio.sleep(0.01)
        ok = await b.submit(*reqs[1])  # fills the batch; the late request is in it
        with pytest.raises(DeadlineExpired):
            await late
        return ok

    run(with_batcher(rec, body, max_wait_ms=HUGE_WAIT_MS, max_batch_rows=4))
    computed = [j.plan for batch in rec.computed for j in batch]
    assert computed == [reqs[1][0]]


def test_engine_crash_fails_only_its_batch_and_the_batcher_keeps_serving():
    rec = Recorder(fail=True)

    async def body(b: Batcher):
        results = await asyncio.gather(*(b.submit(*ce_request(2, seed=i)) for i in range(2)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "engine exploded" in str(r) for r in results)
        rec.fail = False
        return await asyncio.gather(*(b.submit(*ce_request(2, seed=i)) for i in range(2)))

    results = run(with_batcher(rec, body, max_wait_ms=HUGE_WAIT_MS, max_batch_rows=4))
    assert len(results) == 2


def test_a_failing_request_fails_alone_inside_a_fused_batch():
    good = [ce_request(3, seed=i) for i in range(3)]
    plan, x, t = ce_request(3, seed=7)
    corrupt = batch_engine.Job(plan, torch.randn(22), t)  # input no longer matches its plan
    jobs = [batch_engine.Job(*good[0]), corrupt, batch_engine.Job(*good[1]), batch_engine.Job(*good[2])]
    outcomes = batch_engine.evaluate_batch(jobs)
    assert isinstance(outcomes[1], Exception)
    for (_, gx, gt), out in zip(good, [outcomes[0], outcomes[2], outcomes[3]], strict=True):
        torch.testing.assert_close(out.loss, F.cross_entropy(gx, gt))


def test_close_fails_queued_requests_instead_of_leaving_them_hanging():
    rec = Recorder()

    async def body():
        b = Batcher(ServerConfig(max_wait_ms=HUGE_WAIT_MS), torch.device("cpu"), observer=rec, evaluate=rec.evaluate)
        await b.start()
        tasks = [asyncio.ensure_future(b.submit(*ce_request(2, seed=i))) for i in range(3)]
        await settle()
        await b.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, BatcherClosed) for r in results)
        with pytest.raises(BatcherClosed):
            await b.submit(*ce_request(2))
        assert b.queue_depth == 0

    run(body())
    assert rec.computed == []


def test_batch_key_compares_weights_by_value():
    x, t = torch.randn(2, 3), torch.tensor([0, 2])
    w = torch.tensor([0.5, 1.0, 2.0])
    a = engine.plan(engine.LossSpec(), x.shape, x.dtype, t, w)
    b = engine.plan(engine.LossSpec(), x.shape, x.dtype, t, w.clone())
    c = engine.plan(engine.LossSpec(), x.shape, x.dtype, t, w * 2)
    big = 1 << 30
    assert batch_engine.batch_key(a, big) == batch_engine.batch_key(b, big) != batch_engine.batch_key(c, big)
    bce = engine.plan(engine.LossSpec(loss=engine.BCE_WITH_LOGITS), x.shape, x.dtype, torch.rand(2, 3))
    assert batch_engine.batch_key(bce, big) is None  # evaluated alone
    assert batch_engine.batch_key(a, 4) is None  # too large to copy into a fused batch
