"""Work-conserving dynamic batching: a bounded queue of futures, computed off the event loop.

``submit`` queues a validated request for its caller in the :class:`~.fair_queue.FairQueue`
(or answers :class:`QueueFull`; a full queue makes room for a caller below its share by pushing out
the latest requests of the caller holding the most, which are answered QueueFull) and awaits its
future. Each engine worker (``compute_threads`` of them) runs a loop on the event
loop's side: when it is idle and a request arrives, it takes it **at once**; while it computes,
the requests that arrive queue up, and when it is done it takes all of them (in the queue's fair
order: callers in turn by work, each caller's oldest first; up to ``max_batch_rows`` /
``max_batch_bytes`` of work, Plan.work_nbytes: a request that takes a second to compute is not
batched with a 5 ms one of another caller, which would be answered when the batch is done) as the
next batch. No timer ever holds a request back
while a worker is idle: batches grow exactly as much as the load makes them, a single caller
pays no batching delay, and under load one thread hop serves many requests. On the CPU, a
batch of at most ``inline_batch_bytes`` input bytes is computed on the event loop itself: the hop
to an engine thread and back (futures, wake-ups, the GIL changing hands) cost more than such a
batch (measured: 907 -> 737 us of server CPU per 64x1000 call at 64 in flight); the calls that
arrive meanwhile wait in gRPC's transport and form the next batch. ``max_wait_ms=0``
turns batching off (every request is its own batch, still computed off the loop); any positive
value turns it on. Before computing, a worker drops requests whose caller went away or whose
deadline passed; during compute the engine stops between chunks once no caller of the batch is
left (:class:`Abandoned`).

Every future is resolved on every path: with its result, its own error (a failed multi-request
batch is re-run request by request so only the culprit fails), :class:`DeadlineExpired`, or
:class:`BatcherClosed` when the batcher is closed with work still queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from . import batch_engine, engine
from .config import ServerConfig
from .fair_queue import REQUEST_COST_FLOOR_BYTES, FairQueue, caller_key
from .fair_queue import QueueFull as QueueFull  # the batcher's refusal: raised by its queue

if TYPE_CHECKING:
    from .budget import Reservation


class DeadlineExpired(Exception):
    """The request's deadline passed before it was computed; it was never computed."""


class BatcherClosed(Exception):
    """The batcher was closed (server stopping) before the request was computed."""


class Abandoned(Exception):
    """Every caller of a batch went away or passed its deadline: its evaluation stopped early."""


class DeadlinePassed(Abandoned):
    """The caller's deadline passed during evaluation, which stopped early: answered
    DEADLINE_EXCEEDED (the server's clock may see it before the client's timer fires)."""


@dataclass
class BatchFigures:
    requests: int
    rows: int
    bytes: int
    queue_wait_s: list[float]
    compute_s: float
    abandoned: int = 0  # requests whose evaluation stopped early: every caller had gone
    #: rows and input bytes of the requests whose evaluation completed (not stopped early, not failed)
    evaluated_rows: int = 0
    evaluated_bytes: int = 0


class BatchObserver(Protocol):
    def on_batch(self, figures: BatchFigures) -> None: ...

    def on_queue_depth(self, depth: int) -> None: ...

    def on_pushed_out(self, limit: str) -> None: ...


EvaluateFn = Callable[..., Sequence["engine.LossResult | BaseException"]]
#: Who submits: the call's peer, or a function that says it (see caller_key).
Caller = str | Callable[[], str] | None


@dataclass(eq=False)
class _Item:
    job: batch_engine.Job | None
    future: asyncio.Future
    deadline: float | None
    nbytes: int
    rows: int
    work: int = 0  # the plan's work_nbytes: what decides whether it is computed on the event loop
    enqueued: float = field(default_factory=time.perf_counter)
    waiting: bool = False  # in the queue, not yet taken by a worker (set by the FairQueue)
    caller: Hashable = None  # whose share of the queue it counts in (set by the FairQueue)
    abandoned: bool = False  # the caller went away while its batch was computing

    @classmethod
    def of(cls, job: batch_engine.Job, deadline: float | None) -> _Item:
        plan = job.plan
        future = asyncio.get_running_loop().create_future()
        return cls(job, future, deadline, plan.input_nbytes, plan.rows, plan.work_nbytes)


class Batcher:
    """See the module docstring. ``evaluate`` is the batch function (tests inject failures)."""

    def __init__(
        self,
        config: ServerConfig,
        device: torch.device,
        observer: BatchObserver | None = None,
        *,
        evaluate: EvaluateFn = batch_engine.evaluate_batch,
    ) -> None:
        self.config = config
        self.device = device
        self.observer = observer
        self._evaluate = evaluate
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: FairQueue[_Item] = FairQueue(
            config.max_queue_requests, config.max_queue_bytes, config.fair_share_by, cost_floor=REQUEST_COST_FLOOR_BYTES
        )
        self._wake: asyncio.Event | None = None
        self._runners: list[asyncio.Task] = []
        self._computing = 0  # batches on engine threads now
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def queue_depth(self) -> int:  # requests admitted and not yet taken for compute
        return len(self._queue)

    @property
    def batches_computing(self) -> int:  # on engine threads (not a small batch computed on the event loop)
        return self._computing

    async def start(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(torch_threads(self.config))
        threads = max(1, self.config.compute_threads)
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="lossd-engine")
        self._wake = asyncio.Event()
        self._closed = False
        self._runners = [asyncio.ensure_future(self._run()) for _ in range(threads)]

    async def close(self) -> None:
        """Fail whatever is still queued with BatcherClosed, stop the runners and the threads."""
        self._closed = True
        queued = self._queue.clear()
        for item in queued:
            _fail(item.future, BatcherClosed("server is shutting down; request not computed"))
        if queued:
            self._depth_changed()
        del queued
        for task in self._runners:
            task.cancel()
        if self._runners:
            await asyncio.gather(*self._runners, return_exceptions=True)
        self._runners = []
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)

    async def run_in_engine(self, fn: Callable[..., Any], *args: Any, held: Reservation | None = None) -> Any:
        """``fn(*args)`` on an engine thread; ``held`` counts its memory (Reservation.run_in_thread)."""
        if held is not None:
            return await held.run_in_thread(fn, *args, executor=self._executor)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def compute_soon(self, fn: Callable[[], Any], nbytes: int) -> asyncio.Future:
        """``fn()``'s outcome as a future: computed at once on the event loop when it is small
        CPU work (see ``inline_batch_bytes``), else on an engine thread."""
        loop = asyncio.get_running_loop()
        if self.device.type != "cpu" or nbytes > self.config.inline_batch_bytes:
            return loop.run_in_executor(self._executor, fn)
        future = loop.create_future()
        try:
            future.set_result(fn())
        except Exception as exc:  # noqa: BLE001 - delivered through the future, like the executor's
            future.set_exception(exc)
        return future

    # ------------------------------------------------------------------ admission
    async def submit(
        self,
        plan: engine.Plan,
        input: torch.Tensor,
        target: torch.Tensor,
        *,
        deadline: float | None = None,
        sole_call: bool = False,
        caller: Caller = None,
    ) -> engine.LossResult:
        """Queue a validated request and wait for its result (``deadline``: time.monotonic()).
        ``sole_call`` and ``caller``: see :meth:`submit_many`."""
        (outcome,) = await self.submit_many([batch_engine.Job(plan, input, target)], deadline=deadline, sole_call=sole_call, caller=caller)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def submit_many(
        self, jobs: Sequence[batch_engine.Job], *, deadline: float | None = None, sole_call: bool = False, caller: Caller = None
    ) -> list[engine.LossResult | BaseException]:
        """:meth:`submit` for the requests of one message: one outcome per job, in order, a
        request's failure as its exception (only cancellation raises).

        ``sole_call``: the caller knows of no other call in progress. Its CPU requests are then
        computed at once in its task when nothing is queued or computing and they are small
        together (at most ``inline_batch_bytes`` of work, fused where they agree, see
        :mod:`.batch_engine`; 32 items of 2 MiB each were 64 MiB on the event loop): with no one
        to batch with, a runner task only adds latency (837 -> 960 calls/s for one 64x1000 caller
        at a time), and one by one they cost a batch each (16 requests of 8x100 in a message:
        44 -> 25 us of engine time per request). Otherwise each is queued.

        ``caller``: the call's peer (``context.peer()``, or that function, called only when a
        request is queued), whose share of the queue its requests count in (``fair_share_by``).
        """
        if self._closed or self._executor is None:
            return [BatcherClosed("server is not accepting work") for _ in jobs]
        if sole_call and not self._computing and not self._queue and self._inline(sum(j.plan.work_nbytes for j in jobs)):
            return self._compute_now(jobs, deadline)
        key = caller_key(caller, self.config.fair_share_by)
        if len(jobs) == 1:  # no task per request for a unary call
            try:
                return [await self._through_queue(jobs[0], deadline, key)]
            except Exception as exc:  # noqa: BLE001 - the request's outcome
                return [exc]
        return list(await asyncio.gather(*(self._through_queue(job, deadline, key) for job in jobs), return_exceptions=True))

    def _compute_now(self, jobs: Sequence[batch_engine.Job], deadline: float | None) -> list[engine.LossResult | BaseException]:
        if deadline is not None and time.monotonic() >= deadline:
            return [DeadlineExpired("deadline expired before the request was queued") for _ in jobs]
        items = [_Item.of(job, deadline) for job in jobs]
        limit = self.config.inline_batch_bytes if self.config.max_wait_ms > 0 else -1  # batching off: one request a batch
        for batch in _consecutive(items, limit):
            try:
                self._compute_inline(batch)
            except Exception as exc:  # noqa: BLE001 - a broken batch fails its own requests only
                for item in batch:
                    _fail(item.future, exc)
        outcomes = [item.future.exception() or item.future.result() for item in items]
        for item in items:
            item.job = None
        return outcomes

    async def _through_queue(self, job: batch_engine.Job, deadline: float | None, caller: Hashable) -> engine.LossResult:
        """One request through the queue: admitted for ``caller`` (or QueueFull, past
        max_queue_requests or max_queue_bytes of work, Plan.work_nbytes), then computed by a runner."""
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExpired("deadline expired before the request was queued")
        item = _Item.of(job, deadline)
        _answer_pushed_out(self._queue.push(item, caller), self.observer)  # QueueFull: never queued
        self._depth_changed()
        self._wake.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            item.abandoned = True
            raise
        finally:
            if self._queue.remove(item):  # the caller went away before compute: its tensors go now
                self._depth_changed()
                item.job = None

    def _depth_changed(self) -> None:
        if self.observer is not None:
            self.observer.on_queue_depth(len(self._queue))

    # ------------------------------------------------------------------ compute
    def _live_items(self, batch: list[_Item]) -> list[_Item]:
        """The batch's items (taken off the queue) but those whose deadline passed, which expire."""
        self._depth_changed()
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():
                item.job = None
                continue
            if item.deadline is not None and now >= item.deadline:
                _fail(item.future, DeadlineExpired("deadline expired while queued; the request was not computed"))
                item.job = None
                continue
            live.append(item)
        return live

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            cfg = self.config
            items = self._live_items(self._queue.take(cfg.max_batch_rows, cfg.max_batch_bytes, one=cfg.max_wait_ms <= 0))
            if self._queue:
                self._wake.set()  # more than this batch was queued: an idle worker takes the rest
            try:
                if items:
                    await self._compute(items)
            except asyncio.CancelledError:
                for item in items:
                    _fail(item.future, BatcherClosed("server is shutting down; request not completed"))
                raise
            except Exception as exc:  # noqa: BLE001 - a broken batch must never leave a caller hanging
                for item in items:
                    _fail(item.future, exc)
            finally:
                for item in items:
                    item.job = None  # the answer went out: the request's tensors go now
                del items

    def _inline(self, nbytes: int) -> bool:  # a batch of nbytes of work (Plan.work_nbytes) on the event loop?
        return self.device.type == "cpu" and nbytes <= self.config.inline_batch_bytes

    def _compute_inline(self, items: list[_Item]) -> None:
        started = time.perf_counter()
        outcomes, compute_s = self._evaluate_timed([item.job for item in items], [_checkpoint(item) for item in items])
        self._deliver(items, outcomes, compute_s, started)

    async def _compute(self, items: list[_Item]) -> None:
        if self._inline(sum(item.work for item in items)):
            self._compute_inline(items)  # cheaper than the thread hop
            return
        started = time.perf_counter()
        jobs = [item.job for item in items]
        checkpoints = [_checkpoint(item) for item in items]
        self._computing += 1
        try:
            outcomes, compute_s = await asyncio.get_running_loop().run_in_executor(self._executor, self._evaluate_timed, jobs, checkpoints)
        finally:
            self._computing -= 1
        del jobs
        self._deliver(items, outcomes, compute_s, started)

    def _deliver(self, items: list[_Item], outcomes: Sequence, compute_s: float, started: float) -> None:
        """Resolve every item's future with its outcome, and tell the observer about the batch."""
        _resolve(items, outcomes)
        if self.observer is not None:
            self.observer.on_batch(_figures(items, outcomes, compute_s, started))

    def _evaluate_timed(
        self, jobs: list[batch_engine.Job], checkpoints: list[Callable[[], None]]
    ) -> tuple[Sequence[engine.LossResult | BaseException], float]:
        t0 = time.perf_counter()
        outcomes = self._evaluate(jobs, device=self.device, chunk_bytes=self.config.chunk_bytes, checkpoints=checkpoints)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return outcomes, time.perf_counter() - t0


def torch_threads(config: ServerConfig) -> int:
    """Intra-op threads for the engine. torch's default (one per core) lets its OpenMP workers
    fight the event loop and gRPC threads for the cores; on a loaded 2-core machine that made a
    64x1000 cross_entropy ~20x slower on average (measured in benchmarks/)."""
    if config.torch_threads > 0:
        return config.torch_threads
    return max(1, (os.cpu_count() or 1) - 1)


def stop_if_over(gone: bool, deadline: float | None, gone_message: str) -> None:
    """Between engine chunks: Abandoned once the caller is gone, DeadlinePassed once its deadline
    (time.monotonic()) has passed."""
    if gone:
        raise Abandoned(gone_message)
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlinePassed("the deadline passed during evaluation; evaluation stopped")


def _checkpoint(item: _Item) -> Callable[[], None]:
    """Called by the engine between chunks: raises Abandoned once the caller went away or its
    deadline passed."""

    def checkpoint() -> None:
        stop_if_over(item.abandoned, item.deadline, "the caller went away; evaluation stopped")

    return checkpoint


def _resolve(items: list[_Item], outcomes: Sequence) -> None:
    for item, outcome in zip(items, outcomes, strict=True):
        if item.future.done():
            continue
        if isinstance(outcome, BaseException):
            item.future.set_exception(outcome)
        else:
            item.future.set_result(outcome)


def _figures(items: list[_Item], outcomes: Sequence, compute_s: float, started: float) -> BatchFigures:
    evaluated = [item for item, outcome in zip(items, outcomes, strict=True) if not isinstance(outcome, BaseException)]
    return BatchFigures(
        requests=len(items),
        rows=sum(item.rows for item in items),
        bytes=sum(item.nbytes for item in items),
        queue_wait_s=[started - item.enqueued for item in items],
        compute_s=compute_s,
        abandoned=sum(isinstance(outcome, Abandoned) for outcome in outcomes),
        evaluated_rows=sum(item.rows for item in evaluated),
        evaluated_bytes=sum(item.nbytes for item in evaluated),
    )


def _consecutive(items: list[_Item], max_bytes: int) -> Iterator[list[_Item]]:
    """``items`` in order, as runs of at most ``max_bytes`` work bytes (a larger item alone)."""
    start = 0
    while start < len(items):
        stop, nbytes = start + 1, items[start].work
        while stop < len(items) and nbytes + items[stop].work <= max_bytes:
            nbytes += items[stop].work
            stop += 1
        yield items[start:stop]
        start = stop


def _answer_pushed_out(pushed_out: list[tuple[_Item, QueueFull]], observer: BatchObserver | None) -> None:
    """Requests pushed out of the queue for a caller below its share: answered with their error
    (RESOURCE_EXHAUSTED), unless their callers are gone already; their tensors go now."""
    for item, error in pushed_out:
        item.job = None
        if not item.future.done():
            item.future.set_exception(error)
            if observer is not None:
                observer.on_pushed_out(error.limit)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
