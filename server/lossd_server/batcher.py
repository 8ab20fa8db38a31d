"""Dynamic batching: a bounded queue of futures, grouped by compatibility, computed off the loop.

``submit`` admits a validated request (or answers :class:`QueueFull`), adds it to the open batch
of its compatibility key (:func:`batch_engine.batch_key`) and awaits its future. A batch closes
when it reaches ``max_batch_rows`` or ``max_batch_bytes``, or ``max_wait_ms`` after its *first*
request arrived (an ``loop.call_later`` timer; nothing polls). Closed batches wait in a ready
queue for a runner task; a runner drops the requests whose caller went away or whose deadline
passed, then evaluates the rest in a worker thread, so the event loop keeps accepting requests
while a batch computes. Batches closed while every runner was busy are merged with later ready
batches of the same key (up to the same limits) when a runner picks them up. ``max_wait_ms=0``
turns batching off: every request is its own batch, still computed off the loop.

Every future is resolved on every path: with its result, its own error (a failed multi-request
batch is re-run request by request so only the culprit fails), :class:`DeadlineExpired`, or
:class:`BatcherClosed` when the batcher is closed with work still queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from . import batch_engine, engine
from .config import ServerConfig


class QueueFull(Exception):
    """The bounded queue is full; ``limit`` names the setting that was hit."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class DeadlineExpired(Exception):
    """The request's deadline passed before it was computed; it was never computed."""


class BatcherClosed(Exception):
    """The batcher was closed (server stopping) before the request was computed."""


class Abandoned(Exception):
    """Every caller of a batch went away or passed its deadline: its evaluation stopped early."""


@dataclass
class BatchFigures:
    requests: int
    rows: int
    bytes: int
    queue_wait_s: list[float]
    compute_s: float
    abandoned: int = 0  # requests whose evaluation stopped early: every caller had gone


class BatchObserver(Protocol):
    def on_batch(self, figures: BatchFigures) -> None: ...

    def on_queue_depth(self, depth: int) -> None: ...


EvaluateFn = Callable[..., Sequence["engine.LossResult | BaseException"]]


@dataclass(eq=False)
class _Item:
    job: batch_engine.Job
    future: asyncio.Future
    deadline: float | None
    nbytes: int
    rows: int
    enqueued: float = field(default_factory=time.perf_counter)
    waiting: bool = True
    abandoned: bool = False  # the caller went away while its batch was computing
    batch: _Batch | None = None


@dataclass(eq=False)
class _Batch:
    key: batch_engine.BatchKey | None  # None: a request evaluated alone
    items: list[_Item] = field(default_factory=list)
    rows: int = 0
    nbytes: int = 0
    timer: asyncio.TimerHandle | None = None

    def add(self, item: _Item) -> None:
        self.items.append(item)
        self.rows += item.rows
        self.nbytes += item.nbytes
        item.batch = self

    def remove(self, item: _Item) -> None:
        self.items.remove(item)
        self.rows -= item.rows
        self.nbytes -= item.nbytes


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: dict[batch_engine.BatchKey, _Batch] = {}
        self._ready: deque[_Batch] = deque()
        self._wake: asyncio.Event | None = None
        self._runners: list[asyncio.Task] = []
        self._queued = 0
        self._queued_bytes = 0
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def queue_depth(self) -> int:
        """Requests admitted and not yet taken for compute."""
        return self._queued

    @property
    def batching(self) -> bool:
        return self.config.max_wait_ms > 0

    async def start(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(torch_threads(self.config))
        self._loop = asyncio.get_running_loop()
        threads = max(1, self.config.compute_threads)
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="lossd-engine")
        self._wake = asyncio.Event()
        self._closed = False
        self._runners = [asyncio.ensure_future(self._run()) for _ in range(threads)]

    async def close(self) -> None:
        """Fail whatever is still queued with BatcherClosed, stop the runners and the threads."""
        self._closed = True
        pending = list(self._open.values()) + list(self._ready)
        self._open.clear()
        self._ready.clear()
        for batch in pending:
            if batch.timer is not None:
                batch.timer.cancel()
            for item in batch.items:
                self._take(item)
                _fail(item.future, BatcherClosed("server is shutting down; request not computed"))
        for task in self._runners:
            task.cancel()
        if self._runners:
            await asyncio.gather(*self._runners, return_exceptions=True)
        self._runners = []
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)

    async def run_in_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on an engine thread (EvaluateChunked uses it for its row chunks)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ admission
    async def submit(
        self, plan: engine.Plan, input: torch.Tensor, target: torch.Tensor, *, deadline: float | None = None
    ) -> engine.LossResult:
        """Queue a validated request and wait for its result (``deadline``: time.monotonic())."""
        if self._closed or self._executor is None:
            raise BatcherClosed("server is not accepting work")
        nbytes = plan.input_nbytes
        cfg = self.config
        if self._queued >= cfg.max_queue_requests:
            raise QueueFull(
                "max_queue_requests", f"queue full: {self._queued} requests queued (max_queue_requests={cfg.max_queue_requests})"
            )
        if self._queued and self._queued_bytes + nbytes > cfg.max_queue_bytes:
            raise QueueFull(
                "max_queue_bytes",
                f"queue full: {self._queued_bytes} bytes queued, this request adds {nbytes} (max_queue_bytes={cfg.max_queue_bytes})",
            )
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExpired("deadline expired before the request was queued")
        item = _Item(batch_engine.Job(plan, input, target), self._loop.create_future(), deadline, nbytes, plan.rows)
        self._queued += 1
        self._queued_bytes += nbytes
        self._depth_changed()
        self._enqueue(item)
        try:
            return await item.future
        except asyncio.CancelledError:
            item.abandoned = True
            raise
        finally:
            if item.waiting:  # the caller went away (cancelled) before compute
                self._take(item)
                self._forget(item)

    def _forget(self, item: _Item) -> None:
        """Remove a cancelled request from its still-open batch (frees its tensors at once)."""
        batch = item.batch
        if batch is None or self._open.get(batch.key) is not batch:
            return
        batch.remove(item)
        if not batch.items:
            del self._open[batch.key]
            if batch.timer is not None:
                batch.timer.cancel()

    def _enqueue(self, item: _Item) -> None:
        cfg = self.config
        key = batch_engine.batch_key(item.job.plan, cfg.max_batch_bytes) if self.batching else None
        if key is None:
            batch = _Batch(None)
            batch.add(item)
            self._make_ready(batch)
            return
        batch = self._open.get(key)
        if batch is not None and (batch.rows + item.rows > cfg.max_batch_rows or batch.nbytes + item.nbytes > cfg.max_batch_bytes):
            self._close(batch)
            batch = None
        if batch is None:
            batch = _Batch(key)
            self._open[key] = batch
            batch.timer = self._loop.call_later(cfg.max_wait_ms / 1000.0, self._close, batch)
        batch.add(item)
        if batch.rows >= cfg.max_batch_rows or batch.nbytes >= cfg.max_batch_bytes:
            self._close(batch)

    def _close(self, batch: _Batch) -> None:
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        self._make_ready(batch)

    def _make_ready(self, batch: _Batch) -> None:
        self._ready.append(batch)
        self._wake.set()

    def _take(self, item: _Item) -> None:
        if item.waiting:
            item.waiting = False
            self._queued -= 1
            self._queued_bytes -= item.nbytes
            self._depth_changed()

    def _depth_changed(self) -> None:
        if self.observer is not None:
            self.observer.on_queue_depth(self._queued)

    # ------------------------------------------------------------------ compute
    def _next_batch(self) -> _Batch:
        """Pop the oldest ready batch and merge later ready batches of the same key into it."""
        batch = self._ready.popleft()
        if batch.key is None or not self._ready:
            return batch
        cfg = self.config
        keep: deque[_Batch] = deque()
        while self._ready:
            other = self._ready.popleft()
            if (
                other.key == batch.key
                and batch.rows + other.rows <= cfg.max_batch_rows
                and batch.nbytes + other.nbytes <= cfg.max_batch_bytes
            ):
                for item in other.items:
                    batch.add(item)
            else:
                keep.append(other)
        self._ready = keep
        return batch

    def _live_items(self, batch: _Batch) -> list[_Item]:
        """Take the batch's items off the queue; drop cancelled ones and expire late ones."""
        now = time.monotonic()
        live = []
        for item in batch.items:
            self._take(item)
            if item.future.done():
                continue
            if item.deadline is not None and now >= item.deadline:
                _fail(item.future, DeadlineExpired("deadline expired while queued; the request was not computed"))
                continue
            live.append(item)
        return live

    async def _run(self) -> None:
        while True:
            while not self._ready:
                self._wake.clear()
                await self._wake.wait()
            batch = self._next_batch()
            items = self._live_items(batch)
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
                _release(batch)
                del batch, items

    async def _compute(self, items: list[_Item]) -> None:
        started = time.perf_counter()
        jobs = [item.job for item in items]
        outcomes, compute_s = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._evaluate_timed, jobs, _checkpoint(items)
        )
        for item, outcome in zip(items, outcomes, strict=True):
            if item.future.done():
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)
        if self.observer is not None:
            self.observer.on_batch(
                BatchFigures(
                    requests=len(items),
                    rows=sum(item.rows for item in items),
                    bytes=sum(item.nbytes for item in items),
                    queue_wait_s=[started - item.enqueued for item in items],
                    compute_s=compute_s,
                    abandoned=sum(isinstance(outcome, Abandoned) for outcome in outcomes),
                )
            )

    def _evaluate_timed(
        self, jobs: list[batch_engine.Job], checkpoint: Callable[[], None]
    ) -> tuple[Sequence[engine.LossResult | BaseException], float]:
        t0 = time.perf_counter()
        outcomes = self._evaluate(jobs, device=self.device, chunk_bytes=self.config.chunk_bytes, checkpoint=checkpoint)
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


def _checkpoint(items: list[_Item]) -> Callable[[], None]:
    """Called by the engine between chunks: raises Abandoned once no caller of the batch is left."""

    def checkpoint() -> None:
        now = time.monotonic()
        for item in items:
            if not item.abandoned and (item.deadline is None or now < item.deadline):
                return
        raise Abandoned("every caller of this batch went away or passed its deadline; evaluation stopped")

    return checkpoint


def _release(batch: _Batch) -> None:
    """Drop a finished batch's tensors now: _Item <-> _Batch is a reference cycle, and large
    tensors do not trigger the cycle collector, so waiting for it would pin request memory
    (a shared-memory mapping, or the request's bytes) long after the answer went out."""
    for item in batch.items:
        item.batch = None
        item.job = None
    batch.items.clear()


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
