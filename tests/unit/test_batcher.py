"""Batcher and batch engine, driven directly in an event loop.

The batcher is work-conserving: an idle engine worker takes a request at once; requests that
arrive while it computes form the next batch. Tests make that deterministic with a gate: the
engine function blocks on a threading.Event until the test releases it, so what queues up
meanwhile is known exactly; no sleep races a batch.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import grpc
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lossd_server import batch_engine, engine
from lossd_server.batcher import Abandoned, Batcher, BatcherClosed, BatchFigures, DeadlineExpired, DeadlinePassed, QueueFull
from lossd_server.config import ServerConfig
from lossd_server.errors import classify

HUGE_WAIT_MS = 3_600_000.0


class Recorder:
    """Observer + evaluate wrapper that records what was computed; ``gate()`` makes the next
    evaluation block until ``release()``."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[BatchFigures] = []
        self.depths: list[int] = []
        self.pushed_out: list[str] = []
        self.computed: list[list[batch_engine.Job]] = []
        self.fail = fail
        self._gate: threading.Event | None = None
        self.entered = threading.Event()

    def on_batch(self, figures: BatchFigures) -> None:
        self.batches.append(figures)

    def on_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def on_pushed_out(self, limit: str) -> None:
        self.pushed_out.append(limit)

    def gate(self) -> None:
        self._gate = threading.Event()
        self.entered.clear()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    def evaluate(self, jobs, **kwargs):
        self.computed.append(list(jobs))
        gate = self._gate
        self.entered.set()
        if gate is not None and not gate.wait(20):
            raise RuntimeError("the test never released the gate")
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
    """A started batcher; batches are computed on its engine thread unless the test says otherwise
    (the gate blocks the thread that computes: it must not be the event loop)."""
    config.setdefault("inline_batch_bytes", 0)
    batcher = Batcher(ServerConfig(**config), torch.device("cpu"), observer=recorder, evaluate=recorder.evaluate)
    await batcher.start()
    try:
        return await body(batcher)
    finally:
        recorder.release()
        await batcher.close()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def busy(rec: Recorder, b: Batcher, request) -> asyncio.Future:
    """Submit ``request`` with the gate closed and wait until the engine holds it: the worker is busy."""
    rec.gate()
    task = asyncio.ensure_future(b.submit(*request))
    while not rec.entered.is_set():
        await asyncio.sleep(0.001)  # bounded by run()'s 20 s
    return task


def test_an_idle_worker_takes_a_request_at_once_whatever_max_wait_ms():
    rec = Recorder()
    plan, x, t = ce_request(4)

    async def body(b: Batcher):
        return await b.submit(plan, x, t)

    got = run(with_batcher(rec, body, max_wait_ms=HUGE_WAIT_MS))  # a timer would never fire in 20 s
    assert [f.requests for f in rec.batches] == [1]
    torch.testing.assert_close(got.loss, F.cross_entropy(x, t))


def test_requests_arriving_while_busy_form_the_next_batches_up_to_the_row_limit():
    rec = Recorder()
    first = ce_request(4, seed=99)
    reqs = [ce_request(4, seed=i, reduction=("mean", "sum", "none")[i % 3]) for i in range(5)]

    async def body(b: Batcher):
        head = await busy(rec, b, first)
        tasks = [asyncio.ensure_future(b.submit(*r)) for r in reqs]
        await settle()
        assert b.queue_depth == 5 and [f.requests for f in rec.batches] == []
        rec.release()
        return await asyncio.gather(head, *tasks)

    results = run(with_batcher(rec, body, max_wait_ms=1.0, max_batch_rows=12))
    assert [f.requests for f in rec.batches] == [1, 3, 2]
    assert rec.batches[1].rows == 12 and rec.batches[1].bytes == 12 * 7 * 4
    assert len(rec.batches[1].queue_wait_s) == 3 and all(w >= 0 for w in rec.batches[1].queue_wait_s)
    assert rec.batches[1].compute_s > 0
    assert rec.depths[-1] == 0
    for (plan, x, t), got in zip([first, *reqs], results, strict=True):
        torch.testing.assert_close(got.loss, F.cross_entropy(x, t, reduction=plan.spec.reduction))


def test_byte_limit_bounds_the_next_batch():
    rec = Recorder()
    reqs = [ce_request(2, seed=i) for i in range(4)]

    async def body(b: Batcher):
        head = await busy(rec, b, reqs[0])
        tasks = [asyncio.ensure_future(b.submit(*r)) for r in reqs[1:]]
        await settle()
        rec.release()
        return await asyncio.gather(head, *tasks)

    run(with_batcher(rec, body, max_wait_ms=1.0, max_batch_bytes=2 * 2 * 7 * 4))
    assert [f.requests for f in rec.batches] == [1, 2, 1]


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
    torch.testing.assert_close(
        r1.sequences.nll_sum.tolist(), F.cross_entropy(x1.transpose(1, 2), t1, reduction="none").sum(1).double().tolist()
    )
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
        b = Batcher(ServerConfig(max_wait_ms=0, inline_batch_bytes=0), torch.device("cpu"), observer=rec, evaluate=evaluate)
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
        head = await busy(rec, b, ce_request(2, seed=8))
        waiting = [asyncio.ensure_future(b.submit(*ce_request(2, seed=i))) for i in range(2)]
        await settle()
        with pytest.raises(QueueFull) as info:
            await b.submit(*ce_request(2, seed=9))
        assert info.value.limit == "max_queue_requests" and "max_queue_requests=2" in str(info.value)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert b.queue_depth == 0
        rec.release()
        await head
        closer = [asyncio.ensure_future(b.submit(*ce_request(50, seed=i))) for i in range(2)]
        return await asyncio.gather(*closer)

    results = run(with_batcher(rec, body, max_wait_ms=1.0, max_queue_requests=2))
    assert len(results) == 2
    assert sum(len(b) for b in rec.computed) == 3  # the cancelled ones were never computed


def test_queue_bytes_limit():
    rec = Recorder()

    async def body(b: Batcher):
        head = await busy(rec, b, ce_request(1, seed=7))
        first = asyncio.ensure_future(b.submit(*ce_request(4, seed=1)))
        await settle()
        with pytest.raises(QueueFull) as info:
            await b.submit(*ce_request(4, seed=2))
        assert info.value.limit == "max_queue_bytes"
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        oversized = asyncio.ensure_future(b.submit(*ce_request(8, seed=3)))  # alone, an oversized request is still admitted
        await settle()
        rec.release()
        await head
        return await oversized

    run(with_batcher(rec, body, max_wait_ms=1.0, max_queue_bytes=4 * 7 * 4 + 10))


def test_queue_bytes_count_a_requests_work_not_only_its_input():
    """A kl_div target broadcast along the rows: 256 bytes of input, 1 MiB of output to compute."""
    rec = Recorder()
    x, t = torch.randn(64, 1).log_softmax(0), torch.rand(1, 4096)
    heavy = (engine.plan(engine.LossSpec(loss="kl_div", reduction="sum"), x.shape, x.dtype, t), x, t)
    assert heavy[0].input_nbytes == 256 and heavy[0].work_nbytes == 64 * 4096 * 4

    async def body(b: Batcher):
        head = await busy(rec, b, ce_request(1, seed=7))
        first = asyncio.ensure_future(b.submit(*ce_request(4, seed=1)))
        await settle()
        with pytest.raises(QueueFull) as info:
            await b.submit(*heavy)
        rec.release()
        await head
        await first
        return info.value

    refused = run(with_batcher(rec, body, max_wait_ms=1.0, max_queue_bytes=100_000))
    assert refused.limit == "max_queue_bytes"
    assert str(refused) == f"queue full: 112 bytes queued, this request adds {64 * 4096 * 4} (max_queue_bytes=100000)"


def test_cancelled_requests_are_never_computed():
    rec = Recorder()
    reqs = [ce_request(2, seed=i) for i in range(4)]

    async def body(b: Batcher):
        head = await busy(rec, b, reqs[3])
        victim = asyncio.ensure_future(b.submit(*reqs[0]))
        others = [asyncio.ensure_future(b.submit(*r)) for r in reqs[1:3]]
        await settle()
        victim.cancel()
        await asyncio.gather(victim, return_exceptions=True)
        assert victim.cancelled()
        rec.release()
        return await asyncio.gather(head, *others)

    run(with_batcher(rec, body, max_wait_ms=1.0))
    computed = [j for batch in rec.computed for j in batch]
    assert reqs[0][0] not in [j.plan for j in computed] and len(computed) == 3


def test_expired_deadlines_are_dropped_before_compute():
    rec = Recorder()
    reqs = [ce_request(2, seed=i) for i in range(3)]

    async def body(b: Batcher):
        with pytest.raises(DeadlineExpired):
            await b.submit(*reqs[0], deadline=time.monotonic() - 1.0)
        head = await busy(rec, b, reqs[2])
        deadline = time.monotonic() + 0.05
        late = asyncio.ensure_future(b.submit(*reqs[0], deadline=deadline))
        ok = asyncio.ensure_future(b.submit(*reqs[1]))
        await settle()
        while time.monotonic() < deadline + 0.01:  # bounded: 60 ms
            await asyncio.sleep(0.01)
        rec.release()
        with pytest.raises(DeadlineExpired):
            await late
        await head
        return await ok

    run(with_batcher(rec, body, max_wait_ms=1.0))
    computed = [j.plan for batch in rec.computed for j in batch]
    assert computed == [reqs[2][0], reqs[1][0]]


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


def test_close_fails_queued_and_computing_requests_instead_of_leaving_them_hanging():
    rec = Recorder()

    async def body():
        b = Batcher(ServerConfig(max_wait_ms=1.0, inline_batch_bytes=0), torch.device("cpu"), observer=rec, evaluate=rec.evaluate)
        await b.start()
        head = await busy(rec, b, ce_request(2, seed=9))
        tasks = [asyncio.ensure_future(b.submit(*ce_request(2, seed=i))) for i in range(3)]
        await settle()
        closing = asyncio.ensure_future(b.close())
        await settle()
        rec.release()  # the engine thread finishes; its caller was already told
        await closing
        results = await asyncio.gather(head, *tasks, return_exceptions=True)
        assert all(isinstance(r, BatcherClosed) for r in results), results
        with pytest.raises(BatcherClosed):
            await b.submit(*ce_request(2))
        assert b.queue_depth == 0

    run(body())
    assert len(rec.computed) == 1  # only the batch that was already computing


def test_batch_figures_count_rows_and_bytes_only_of_completed_evaluations():
    """lossd_rows_total and lossd_batch_input_bytes_total come from evaluated_rows / evaluated_bytes:
    they counted the rows of requests whose evaluation stopped (caller gone, deadline passed) or
    failed, which were not evaluated (a cancelled million-row request added a million rows)."""
    rec = Recorder()
    compute = rec.evaluate

    def evaluate(jobs, **kwargs):
        outcomes = list(compute(jobs, **kwargs))
        if len(jobs) == 4:
            outcomes[1:] = [Abandoned("the caller went away"), DeadlinePassed("late"), RuntimeError("broken")]
        return outcomes

    rec.evaluate = evaluate
    first = ce_request(2, seed=98)
    reqs = [ce_request(n, seed=n) for n in (3, 4, 5, 6)]

    async def body(b: Batcher):
        head = await busy(rec, b, first)
        tasks = [asyncio.ensure_future(b.submit(*r)) for r in reqs]
        await settle()
        rec.release()
        return await asyncio.gather(head, *tasks, return_exceptions=True)

    results = run(with_batcher(rec, body, max_wait_ms=1.0))
    assert [type(r).__name__ for r in results[2:]] == ["Abandoned", "DeadlinePassed", "RuntimeError"]
    assert [f.requests for f in rec.batches] == [1, 4]
    batch = rec.batches[1]
    assert batch.rows == 3 + 4 + 5 + 6 and batch.bytes == (3 + 4 + 5 + 6) * 7 * 4  # what was computed
    assert batch.abandoned == 2
    assert batch.evaluated_rows == 3 and batch.evaluated_bytes == 3 * 7 * 4  # what was evaluated to the end
    assert rec.batches[0].evaluated_rows == rec.batches[0].rows == 2


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


@st.composite
def fusable_jobs(draw) -> list[batch_engine.Job]:
    """2-6 class-index requests of one loss, C, class weights and label smoothing (what a fused
    group shares), each with its own shape, dtype, reduction, ignore_index and ignored targets."""
    loss = draw(st.sampled_from([engine.CROSS_ENTROPY, engine.NLL]))
    c = draw(st.integers(1, 12))
    weight = draw(st.sampled_from([None, torch.linspace(0.25, 2.0, c)]))
    smoothing = draw(st.sampled_from([0.0, 0.2])) if loss == engine.CROSS_ENTROPY else 0.0
    shared_ignore = draw(st.booleans())
    jobs = []
    for _ in range(draw(st.integers(2, 6))):
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
        lead = draw(st.sampled_from([(), (0,), (1,), (5,), (3, 2)]))  # (C), (N, C), (N, C, d)
        shape = (c,) if lead == () else (lead[0], c, *lead[1:])
        tshape = () if lead == () else (lead[0], *lead[1:])
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        ignore = -100 if shared_ignore else draw(st.sampled_from([-100, 0, 1]))
        t = torch.randint(0, c, tshape, generator=g)
        if t.numel():
            t.view(-1)[0] = ignore if ignore < 0 or ignore < c else 0
        reduction = draw(st.sampled_from(["mean", "sum", "none"] if smoothing == 0.0 else ["sum", "none"]))
        spec = engine.LossSpec(loss=loss, reduction=reduction, ignore_index=ignore, label_smoothing=smoothing)
        plan = engine.plan(spec, x.shape, x.dtype, t, None if weight is None else weight.to(dtype))
        jobs.append(batch_engine.Job(plan, x, t))
    return jobs


@settings(max_examples=int(os.environ.get("LOSSD_HYPOTHESIS_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fusable_jobs())
def test_a_fused_group_gives_every_request_exactly_what_it_gets_alone(jobs):
    """Sharing a batch never changes an answer: loss, numerator, denominator and count are bit
    for bit those of the request evaluated on its own."""
    together = batch_engine.evaluate_batch(jobs)
    for job, got in zip(jobs, together, strict=True):
        (alone,) = batch_engine.evaluate_batch([job])
        assert not isinstance(got, BaseException) and not isinstance(alone, BaseException), (got, alone)
        assert got.loss.dtype == alone.loss.dtype and got.loss.shape == alone.loss.shape
        assert torch.equal(got.loss.nan_to_num(), alone.loss.nan_to_num()) and torch.equal(got.loss.isnan(), alone.loss.isnan())
        assert (got.loss_sum, got.weight_sum, got.counted) == (alone.loss_sum, alone.weight_sum, alone.counted)


def test_checkpoints_stop_only_their_own_job_in_a_mixed_batch():
    class Stop(Exception):
        pass

    def stopped() -> None:
        raise Stop("caller gone")

    big_plan, big_x, big_t = ce_request(300, c=300, seed=1)  # over FUSE_MAX_REQUEST_BYTES: alone
    small = [ce_request(2, seed=i) for i in range(3)]  # fused together
    bce_x = torch.randn(4, 3)
    bce_t = torch.rand(4, 3)
    bce = engine.plan(engine.LossSpec(loss=engine.BCE_WITH_LOGITS), bce_x.shape, bce_x.dtype, bce_t)
    jobs = [batch_engine.Job(big_plan, big_x, big_t), *(batch_engine.Job(*r) for r in small), batch_engine.Job(bce, bce_x, bce_t)]
    checks = [stopped, None, stopped, None, None]
    outcomes = batch_engine.evaluate_batch(jobs, checkpoints=checks)
    assert isinstance(outcomes[0], Stop)
    for (_, x, t), out in zip(small, outcomes[1:4], strict=True):
        torch.testing.assert_close(out.loss, F.cross_entropy(x, t))  # one stopped job does not stop its fused group
    torch.testing.assert_close(outcomes[4].loss, F.binary_cross_entropy_with_logits(bce_x, bce_t))
    outcomes = batch_engine.evaluate_batch(jobs[1:4], checkpoints=[stopped] * 3)
    assert all(isinstance(o, Stop) for o in outcomes)  # a fused group stops when all its callers are gone


@pytest.mark.parametrize("inline_bytes,expect_loop", [(1 << 20, True), (0, False)])
def test_small_batches_are_computed_on_the_event_loop_and_large_ones_on_an_engine_thread(inline_bytes, expect_loop):
    rec = Recorder()
    threads = []

    def evaluate(jobs, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return rec.evaluate(jobs, **kwargs)

    async def body():
        b = Batcher(ServerConfig(inline_batch_bytes=inline_bytes), torch.device("cpu"), observer=rec, evaluate=evaluate)
        await b.start()
        try:
            plan, x, t = ce_request(3)
            return await b.submit(plan, x, t), (x, t)
        finally:
            await b.close()

    got, (x, t) = run(body())
    assert threads == [expect_loop]
    torch.testing.assert_close(got.loss, F.cross_entropy(x, t))


def test_device_memory_exhaustion_splits_a_fused_batch_and_refuses_only_what_never_fits(monkeypatch):
    """The policy behind CUDA out-of-memory errors, driven on the CPU by raising torch's own
    OutOfMemoryError: a fused group that does not fit is tried in halves; a request that does not
    fit even alone is refused (RESOURCE_EXHAUSTED) and the others are answered."""
    small = [ce_request(2, seed=i) for i in range(6)]
    huge_plan, huge_x, huge_t = ce_request(300, c=300, seed=9)  # evaluated alone (over the fusion size)
    real_fused, real_run = batch_engine.evaluate_fused, engine.run
    fused_sizes = []

    def fused(jobs, **kwargs):
        fused_sizes.append(len(jobs))
        if len(jobs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_fused(jobs, **kwargs)

    def run(plan, *args, **kwargs):
        if plan is huge_plan:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(plan, *args, **kwargs)

    monkeypatch.setattr(batch_engine, "evaluate_fused", fused)
    monkeypatch.setattr(batch_engine.engine, "run", run)
    jobs = [batch_engine.Job(huge_plan, huge_x, huge_t), *(batch_engine.Job(*r) for r in small)]
    outcomes = batch_engine.evaluate_batch(jobs)
    assert isinstance(outcomes[0], batch_engine.DeviceMemoryExhausted) and "split it into smaller requests" in str(outcomes[0])
    for (_, x, t), out in zip(small, outcomes[1:], strict=True):
        torch.testing.assert_close(out.loss, F.cross_entropy(x, t))
    assert fused_sizes == [6, 3, 2, 3, 2]  # halves, then halves of halves (a single job is evaluated alone)
    from lossd_server.errors import classify

    assert classify(outcomes[0]).code.name == "RESOURCE_EXHAUSTED"


def test_a_sole_call_is_computed_in_its_own_task_unless_work_is_queued():
    rec = Recorder()
    plan, x, t = ce_request(3)

    async def body(b: Batcher):
        got = await b.submit(plan, x, t, sole_call=True)
        assert rec.depths == []  # never queued
        head = await busy(rec, b, ce_request(20, seed=5))  # 560 bytes: an engine thread is computing it now
        queued = asyncio.ensure_future(b.submit(plan, x, t, sole_call=True))
        await settle()
        assert b.queue_depth == 1  # with work in progress it waits its turn like any request
        rec.release()
        await head
        return got, await queued

    first, second = run(with_batcher(rec, body, max_wait_ms=1.0, inline_batch_bytes=100))  # 3 x 7 fp32 = 84 bytes: inline
    for got in (first, second):
        torch.testing.assert_close(got.loss, F.cross_entropy(x, t))


def test_a_sole_calls_message_small_together_is_computed_at_once_in_its_task():
    """submit_many: the requests of one message of a sole call, nothing queued, at most
    inline_batch_bytes of work together (6 x 84 bytes here), are computed in the caller's task as one
    batch, one outcome per request in order, a failing request failing alone."""
    rec = Recorder()
    requests = [ce_request(3, seed=i) for i in range(5)]
    bad_plan, bad_x, _ = ce_request(3, seed=9)
    jobs = [batch_engine.Job(*r) for r in requests]
    jobs.insert(2, batch_engine.Job(bad_plan, bad_x[:, :2], torch.zeros(3, dtype=torch.long)))  # fewer classes than its plan

    async def body(b: Batcher):
        outcomes = await b.submit_many(jobs, sole_call=True)
        assert rec.depths == []  # never queued
        return outcomes

    outcomes = run(with_batcher(rec, body, inline_batch_bytes=504))
    assert [len(batch) for batch in rec.computed] == [6]
    assert [figures.requests for figures in rec.batches] == [6]
    assert isinstance(outcomes[2], RuntimeError)
    for (_, x, t), got in zip(requests, outcomes[:2] + outcomes[3:], strict=True):
        torch.testing.assert_close(got.loss, F.cross_entropy(x, t))
    rec.computed.clear()
    run(with_batcher(rec, body, inline_batch_bytes=504, max_wait_ms=0))  # batching off: one request a batch
    assert [len(batch) for batch in rec.computed] == [1] * 6


def test_a_sole_calls_message_large_together_is_queued_and_computed_off_the_event_loop():
    """Each request small enough for the event loop, 6 x 84 bytes together more than
    inline_batch_bytes: queued as any message's requests, then computed on an engine thread (32
    items of 1 MiB each used to be computed on the event loop one after another)."""
    rec = Recorder()
    requests = [ce_request(3, seed=i) for i in range(6)]
    threads: list[str] = []

    def evaluate(jobs, **kwargs):
        threads.append(threading.current_thread().name)
        return rec.evaluate(jobs, **kwargs)

    async def body(b: Batcher):
        b._evaluate = evaluate
        return await b.submit_many([batch_engine.Job(*r) for r in requests], sole_call=True)

    outcomes = run(with_batcher(rec, body, max_wait_ms=1.0, inline_batch_bytes=500))
    assert rec.depths and max(rec.depths) >= 1  # queued
    assert threads and all(name.startswith("lossd-engine") for name in threads)
    for (_, x, t), got in zip(requests, outcomes, strict=True):
        torch.testing.assert_close(got.loss, F.cross_entropy(x, t))


def test_a_message_of_a_busy_server_is_queued_request_by_request_and_batched_with_the_rest():
    rec = Recorder()
    requests = [ce_request(3, seed=i) for i in range(4)]

    async def body(b: Batcher):
        head = await busy(rec, b, ce_request(20, seed=5))
        many = asyncio.ensure_future(b.submit_many([batch_engine.Job(*r) for r in requests], sole_call=True))
        await settle()
        assert b.queue_depth == 4  # work in progress: they wait their turn like any request
        rec.release()
        await head
        return await many

    outcomes = run(with_batcher(rec, body, max_wait_ms=1.0, inline_batch_bytes=100))  # 84 bytes each: inline alone
    assert [len(batch) for batch in rec.computed] == [1, 4]
    for (_, x, t), got in zip(requests, outcomes, strict=True):
        torch.testing.assert_close(got.loss, F.cross_entropy(x, t))


def test_submit_many_answers_every_request_of_a_closed_batcher_or_a_passed_deadline():
    rec = Recorder()
    jobs = [batch_engine.Job(*ce_request(3, seed=i)) for i in range(3)]

    async def body(b: Batcher):
        expired = await b.submit_many(jobs, deadline=time.monotonic() - 1, sole_call=True)
        await b.close()
        return expired, await b.submit_many(jobs, sole_call=True)

    expired, closed = run(with_batcher(rec, body, inline_batch_bytes=1 << 20))
    assert all(isinstance(o, DeadlineExpired) for o in expired) and len(expired) == 3
    assert all(isinstance(o, BatcherClosed) for o in closed) and len(closed) == 3
    assert rec.computed == []


def test_a_deadline_passed_during_compute_is_deadline_exceeded_and_a_gone_caller_cancelled():
    """The server's clock may see the deadline before the client's timer fires: its answer
    must then be the status the client's own timer would have given."""
    assert classify(DeadlinePassed("the deadline passed during evaluation")).code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert classify(Abandoned("the caller went away")).code == grpc.StatusCode.CANCELLED


def test_where_a_request_runs_depends_on_its_work_not_its_message():
    """A few KB that broadcast to millions of elements (kl_div), or a few bytes whose answer is
    hundreds of MB (statistics of millions of empty sequences), are computed on an engine thread:
    on the event loop they held health checks for 31 s and 2.5 s."""
    threads = []
    real = batch_engine.evaluate_batch

    def evaluate(jobs, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return real(jobs, **kwargs)

    x = torch.randn(1024, 1)
    t = torch.rand(1, 1024)
    kl = engine.plan(engine.LossSpec(loss="kl_div", reduction="sum"), x.shape, x.dtype, t)
    assert kl.input_nbytes == 4096 and kl.work_nbytes == 1024 * 1024 * 4
    empty = torch.empty(2**20, 0, 5)
    stats = engine.plan(
        engine.LossSpec(class_axis=-1, sequence_stats=True), empty.shape, empty.dtype, torch.empty(2**20, 0, dtype=torch.int64)
    )
    assert stats.input_nbytes == 0 and stats.work_nbytes >= 2**20 * 8
    plan, x3, t3 = ce_request(3)
    assert plan.work_nbytes == plan.input_nbytes

    async def main():
        b = Batcher(ServerConfig(inline_batch_bytes=64 * 1024), torch.device("cpu"), evaluate=evaluate)
        await b.start()
        try:
            got = await b.submit(kl, x, t, sole_call=True)
            await b.submit(plan, x3, t3, sole_call=True)
            return got
        finally:
            await b.close()

    got = run(main())
    torch.testing.assert_close(got.loss, F.kl_div(x, t, reduction="sum"))
    assert threads == [False, True]  # the kl_div on an engine thread, the small request inline


@pytest.mark.parametrize("sequences", [3, 1000])
def test_statistics_of_empty_sequences_fused_in_a_batch_have_one_entry_per_sequence(sequences):
    """[B, 0] targets with sequence_stats, batched together: B zero-token sequences each, as alone
    (the fused path handed them an empty slice of the batch's terms: 0 entries instead of B)."""
    spec = engine.LossSpec(class_axis=-1, sequence_stats=True, extras=("entropy",))
    x, t = torch.empty(sequences, 0, 5), torch.empty(sequences, 0, dtype=torch.int64)
    job = batch_engine.Job(engine.plan(spec, x.shape, x.dtype, t), x, t)
    alone = batch_engine.evaluate_alone(job)
    for fused in batch_engine.evaluate_fused([job, job]):
        for name in ("nll_sum", "tokens", "mean_nll", "perplexity", "is_greedy"):
            got, want = getattr(fused.sequences, name), getattr(alone.sequences, name)
            assert got.shape == (sequences,) and torch.equal(got.nan_to_num(), want.nan_to_num()), name


FLOOD, VICTIM = "ipv4:127.0.0.1:40001", "ipv4:127.0.0.1:40002"


def test_a_full_queue_makes_room_for_another_caller_and_the_callers_take_turns():
    """One connection's requests fill the queue: another connection's request pushes the latest of
    them out (RESOURCE_EXHAUSTED, saying why) instead of being refused, and is computed in its turn,
    not after all of them (16 connections' kl_div flood refused a 5 ms request at once, 0 of 38)."""
    rec = Recorder()
    flood_reqs = [ce_request(2, seed=i) for i in range(4)]
    victim_req = ce_request(2, seed=9)

    async def body(b: Batcher):
        head = await busy(rec, b, ce_request(2, seed=50))
        flood = [asyncio.ensure_future(b.submit(*r, caller=FLOOD)) for r in flood_reqs]
        await settle()
        victim = asyncio.ensure_future(b.submit(*victim_req, caller=lambda: VICTIM))  # as context.peer
        await settle()
        assert flood[3].done() and b.queue_depth == 4
        with pytest.raises(QueueFull) as info:
            flood[3].result()
        assert info.value.limit == "max_queue_requests" and classify(info.value).code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "pushed out of the queue for a caller with less than its share (fair_share_by=connection)" in str(info.value)
        assert rec.pushed_out == ["max_queue_requests"]
        with pytest.raises(QueueFull) as info:  # the flood holds 3 of the 4: over its share, refused as before
            await b.submit(*ce_request(2, seed=10), caller=FLOOD)
        assert str(info.value) == "queue full: 4 requests queued (max_queue_requests=4)"
        rec.release()
        return await asyncio.gather(head, victim, *flood[:3])

    results = run(with_batcher(rec, body, max_wait_ms=0, max_queue_requests=4))
    computed = [batch[0].plan for batch in rec.computed]
    assert computed[1:] == [flood_reqs[0][0], victim_req[0], flood_reqs[1][0], flood_reqs[2][0]]  # in turn, not behind the flood
    for (_, x, t), got in zip([victim_req, *flood_reqs[:3]], results[1:], strict=True):
        torch.testing.assert_close(got.loss, F.cross_entropy(x, t))


def test_with_fair_share_by_off_a_full_queue_refuses_everyone_as_before():
    rec = Recorder()

    async def body(b: Batcher):
        head = await busy(rec, b, ce_request(2, seed=50))
        flood = [asyncio.ensure_future(b.submit(*ce_request(2, seed=i), caller=FLOOD)) for i in range(4)]
        await settle()
        with pytest.raises(QueueFull) as info:
            await b.submit(*ce_request(2, seed=9), caller=VICTIM)
        rec.release()
        await asyncio.gather(head, *flood)
        return info.value

    refused = run(with_batcher(rec, body, max_wait_ms=0, max_queue_requests=4, fair_share_by="off"))
    assert str(refused) == "queue full: 4 requests queued (max_queue_requests=4)" and rec.pushed_out == []
    assert len(rec.computed) == 5


def test_a_request_whose_caller_is_gone_is_pushed_out_without_being_answered_twice():
    """The flood's latest call is cancelled just as the victim's request pushes it out (its task has
    not run its cleanup yet): nothing is set on its cancelled future, nothing counted, and the
    queue's accounts stay right."""
    rec = Recorder()

    async def body(b: Batcher):
        head = await busy(rec, b, ce_request(2, seed=50))
        flood = [asyncio.ensure_future(b.submit(*ce_request(2, seed=i), caller=FLOOD)) for i in range(4)]
        await settle()
        victim = asyncio.ensure_future(b.submit(*ce_request(2, seed=9), caller=VICTIM))  # runs first ...
        flood[3].cancel()  # ... its future is cancelled now, the task's cleanup runs after the victim's push
        await settle()
        assert flood[3].cancelled() and rec.pushed_out == [] and b.queue_depth == 4
        rec.release()
        return await asyncio.gather(head, victim, *flood[:3])

    loop_errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: loop_errors.append(context))
        return await with_batcher(rec, body, max_wait_ms=1.0, max_queue_requests=4)

    assert len(run(main())) == 5
    assert loop_errors == [] and rec.depths[-1] == 0
