"""Prometheus collectors (prefix ``lossd_``), all in one place; documented in docs/metrics.md.

RPC metrics come from :class:`RpcMetricsInterceptor` (one server interceptor for every method);
batch metrics from :class:`BatchMetrics`, the batcher's observer. Latency buckets span
sub-millisecond CPU calls to multi-second large requests.

With ``--workers N`` every worker process writes its collectors to prometheus-client's
multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before it starts the
workers) and the supervisor serves their aggregate (:mod:`lossd_server.workers`). Counters and
histograms add up over the workers; every gauge states its aggregation (``multiprocess_mode``,
``livesum``: the sum over the live workers). A gauge read by a function at scrape time cannot
cross processes, so a worker sets those gauges every :data:`GAUGE_REFRESH_S` instead
(:func:`refresh_gauges`).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc
import torch
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

from . import __version__, endings, metrics_http

LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_ROW_BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
#: How often a worker process of ``--workers N`` sets the gauges that one process reads at scrape time.
GAUGE_REFRESH_S = 0.5


class Metrics:
    """Every lossd collector, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def histogram(name: str, doc: str, buckets: tuple, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            """Summed over the live worker processes under --workers N (prometheus-client multiprocess mode)."""
            return Gauge(name, doc, labels, registry=registry, multiprocess_mode="livesum")

        self.requests = Counter("lossd_requests", "RPCs finished, by method and gRPC status code", ["method", "code"], registry=registry)
        self.worker_requests = Counter(
            "lossd_worker_requests", "RPCs finished, by worker process (0 .. workers-1) and method", ["worker", "method"], registry=registry
        )
        self.request_latency = histogram(
            "lossd_request_latency_seconds", "RPC time from handler start to answer, by method", LATENCY_BUCKETS_S, ("method",)
        )
        self.queue_wait = histogram("lossd_queue_wait_seconds", "time a request waited in the batcher queue", LATENCY_BUCKETS_S)
        self.compute = histogram("lossd_compute_seconds", "engine time per executed batch", LATENCY_BUCKETS_S)
        self.batch_requests = histogram("lossd_batch_requests", "requests per executed batch", BATCH_REQUEST_BUCKETS)
        self.batch_rows = histogram("lossd_batch_rows", "rows (loss positions) per executed batch", BATCH_ROW_BUCKETS)
        self.rows = Counter("lossd_rows", "rows (loss positions) of the requests the batcher evaluated to the end", registry=registry)
        self.abandoned = Counter(
            "lossd_abandoned_evaluations",
            "requests whose evaluation stopped between chunks because the caller went away or passed its deadline",
            registry=registry,
        )
        self.queue_pushed_out = Counter(
            "lossd_queue_pushed_out",
            "queued requests answered RESOURCE_EXHAUSTED to make room for a caller below its share of the full queue "
            "(fair_share_by), by the limit that was full",
            ["limit"],
            registry=registry,
        )
        for limit in ("max_queue_requests", "max_queue_bytes"):  # exported at 0 from the start: rate() sees the first one
            self.queue_pushed_out.labels(limit=limit)
        self.reads_yielded = Counter(
            "lossd_memory_reads_yielded",
            "calls that gave their read reservation to calls in line for memory after their client sent nothing for idle_read_yield_s",
            registry=registry,
        )
        self.batch_bytes = Counter(
            "lossd_batch_input_bytes", "input tensor bytes of the requests the batcher evaluated to the end", registry=registry
        )
        self.bytes_received = Counter("lossd_received_bytes", "request message bytes received, by method", ["method"], registry=registry)
        self.in_flight = gauge("lossd_requests_in_flight", "RPCs being handled, by method", ("method",))
        self.queue_depth = gauge("lossd_queue_depth", "requests waiting in the batcher queue")
        self.batches_computing = gauge("lossd_batches_computing", "batches of the batcher being computed on engine threads now")
        self.device_memory = gauge("lossd_device_memory_bytes", "CUDA memory allocated by torch on the serving device (0 on CPU)")
        self.device_memory_reserved = gauge(
            "lossd_device_memory_reserved_bytes", "CUDA memory reserved by torch's caching allocator (0 on CPU)"
        )
        self.memory_budget = gauge("lossd_memory_budget_bytes", "memory_budget_bytes: bytes the server may hold for callers")
        self.memory_held = gauge("lossd_memory_held_bytes", "bytes reserved for callers (messages, tensors, chunks, answers)")
        self.memory_waiting = gauge("lossd_memory_waiting_calls", "reads waiting for the memory budget (flow control)")
        self.process_rss = gauge("lossd_process_rss_bytes", "resident set size of the server process")
        self.build = Info("lossd_build", "lossd build: version, torch version, device", registry=registry)


_METRICS: Metrics | None = None


def get() -> Metrics:
    """The process-wide collectors (default registry), created on first use."""
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class BatchFiguresLike(Protocol):
    requests: int
    rows: int
    bytes: int
    queue_wait_s: list[float]
    compute_s: float
    abandoned: int
    evaluated_rows: int
    evaluated_bytes: int


class BatchMetrics:
    """Batcher observer: ``on_batch`` once per executed batch, ``on_queue_depth`` when it changes,
    ``on_pushed_out`` per request pushed out of a full queue; and the memory budget's: ``on_read_yielded``."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.m = metrics or get()

    def on_batch(self, figures: BatchFiguresLike) -> None:
        m = self.m
        m.batch_requests.observe(figures.requests)
        m.batch_rows.observe(figures.rows)
        m.rows.inc(figures.evaluated_rows)  # not the rows of requests stopped early or failed: they were not evaluated
        m.batch_bytes.inc(figures.evaluated_bytes)
        m.compute.observe(figures.compute_s)
        if figures.abandoned:
            m.abandoned.inc(figures.abandoned)
        for wait in figures.queue_wait_s:
            m.queue_wait.observe(wait)

    def on_queue_depth(self, depth: int) -> None:
        self.m.queue_depth.set(depth)

    def on_pushed_out(self, limit: str) -> None:
        """A queued request was pushed out for a caller below its share (see lossd_server.fair_queue)."""
        self.m.queue_pushed_out.labels(limit=limit).inc()

    def on_read_yielded(self) -> None:
        """The memory budget ended an idle read for calls in line (see lossd_server.budget)."""
        self.m.reads_yielded.inc()


def status_name(context: grpc.aio.ServicerContext, exc: BaseException | None, cut: bool = False) -> str:
    """The status the client receives, as grpc.aio decides it.

    ``context.abort`` sets the code and raises AbortError; a plain return leaves the code unset
    (OK) unless the handler called ``set_code``; any other exception is answered UNKNOWN; a
    cancelled handler was cut by a deadline, cancelled by the client or cut by the server's stop
    (``cut``), which the servicer's rule tells apart (:func:`.endings.over_status`: a cancel just
    before the deadline is the client's deadline).
    """
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int) and code:
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError):
        over = endings.over_status(context.time_remaining(), cancelled=True, cut=cut)
        return over.name if over is not None else "CANCELLED"
    return "UNKNOWN"


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts RPCs by method and final status code, times them and counts received bytes.

    The wrapped handler is built once per method and reused; received bytes are counted in the
    request deserializer (the wire size, without re-serialising the message). ``worker``: the
    index of this worker process under ``--workers N`` (``lossd_worker_requests_total``).
    """

    def __init__(self, metrics: Metrics | None = None, worker: int = 0) -> None:
        self.m = metrics or get()
        self.worker = str(worker)
        self._wrapped: dict[tuple[str, int], Any] = {}
        #: Whether the server's own stop is cutting its calls (set to the server's
        #: CallTracker.cutting once it exists): such calls count UNAVAILABLE, as their clients see them.
        self.server_cutting: Callable[[], bool] = lambda: False

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        key = (handler_call_details.method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._wrap(handler_call_details.method.rsplit("/", 1)[-1], handler)
        return wrapped

    def _wrap(self, method: str, handler: Any) -> Any:
        probe = _MethodProbe(self.m, method, self.worker, lambda: self.server_cutting())
        inner_deserializer = handler.request_deserializer

        def deserialize(data: bytes) -> Any:
            probe.received.inc(len(data))
            return inner_deserializer(data) if inner_deserializer is not None else data

        for kind, make in _HANDLER_KINDS:
            inner = getattr(handler, kind)
            if inner is None:
                continue
            if inspect.isasyncgenfunction(inner):

                async def streaming(request, context, inner=inner):
                    async for response in probe.run_stream(inner(request, context), context):
                        yield response

                return make(streaming, deserialize, handler.response_serializer)
            if kind.startswith("unary_stream"):
                return handler  # a sync generator: not used by lossd

            async def single(request, context, inner=inner):
                return await probe.run(lambda: inner(request, context), context)

            return make(single, deserialize, handler.response_serializer)
        return handler


_HANDLER_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


class _MethodProbe:
    """One method's collectors and the timing around its handler (coroutine or async generator)."""

    def __init__(self, m: Metrics, method: str, worker: str, cutting: Callable[[], bool]) -> None:
        self.m = m
        self.method = method
        self.cutting = cutting
        self.received = m.bytes_received.labels(method)
        self.in_flight = m.in_flight.labels(method)
        self.latency = m.request_latency.labels(method)
        self.by_worker = m.worker_requests.labels(worker, method)

    def _finish(self, start: float, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
        self.in_flight.dec()
        self.m.requests.labels(self.method, status_name(context, exc, exc is not None and self.cutting())).inc()
        self.by_worker.inc()
        self.latency.observe(time.perf_counter() - start)

    async def run(self, call: Callable[[], Any], context) -> Any:
        self.in_flight.inc()
        start = time.perf_counter()
        try:
            result = await call()
        except BaseException as exc:
            self._finish(start, context, exc)
            raise
        self._finish(start, context, None)
        return result

    async def run_stream(self, responses: Any, context) -> Any:
        self.in_flight.inc()
        start = time.perf_counter()
        try:
            async for response in responses:
                yield response
        except BaseException as exc:
            self._finish(start, context, exc)
            raise
        self._finish(start, context, None)


def bind_http(config: Any) -> Any:
    """Serve the default registry on ``metrics_host:metrics_port`` (0: disabled, -1: the OS picks).

    Called before the gRPC server exists, so that a port in use stops the start before anything
    is announced (raises OSError). Returns the HTTP server (bounded: :mod:`lossd_server.metrics_http`),
    or None when disabled.
    """
    if config.metrics_port == 0:
        return None
    disable_created_metrics()
    return metrics_http.serve(config.metrics_host, max(config.metrics_port, 0), REGISTRY)


def start_http(config: Any, server: Any, httpd: Any, metrics: Metrics | None = None) -> int | None:
    """Attach the running LossServer's gauges; returns the metrics port (None when disabled)."""
    if httpd is None:
        return None
    m = metrics or get()
    m.build.info(build_labels(server.device))
    m.memory_budget.set(server.servicer.budget.limit_bytes)
    for gauge, read in gauge_readers(server, m):
        gauge.set_function(read)
    return int(httpd.server_address[1])


def build_labels(device: torch.device) -> dict[str, str]:
    """The labels of ``lossd_build_info``, plain strings (``torch.__version__`` is a str subclass that
    would import torch wherever it is unpickled)."""
    return {"version": str(__version__), "torch_version": str(torch.__version__), "device": str(device)}


def gauge_readers(server: Any, m: Metrics) -> list[tuple[Gauge, Callable[[], float]]]:
    """The gauges that read the running LossServer's state, each with its reader."""
    readers: list[tuple[Gauge, Callable[[], float]]] = [(m.process_rss, rss_bytes)]
    batcher = server.batcher
    if hasattr(batcher, "queue_depth"):
        readers.append((m.queue_depth, lambda: batcher.queue_depth))
    if hasattr(batcher, "batches_computing"):
        readers.append((m.batches_computing, lambda: batcher.batches_computing))
    budget = server.servicer.budget
    readers += [(m.memory_held, lambda: budget.held_bytes), (m.memory_waiting, lambda: budget.waiting)]
    if server.device.type == "cuda":
        device = server.device
        readers.append((m.device_memory, lambda: torch.cuda.memory_allocated(device)))
        readers.append((m.device_memory_reserved, lambda: torch.cuda.memory_reserved(device)))
    return readers


async def refresh_gauges(server: Any, metrics: Metrics | None = None, period_s: float = GAUGE_REFRESH_S) -> None:
    """A worker process of ``--workers N``: set the reader gauges every ``period_s`` until cancelled
    (prometheus-client's multiprocess files hold values, not functions)."""
    m = metrics or get()
    m.memory_budget.set(server.servicer.budget.limit_bytes)
    readers = gauge_readers(server, m)
    while True:
        for gauge, read in readers:
            gauge.set(read())
        await asyncio.sleep(period_s)
