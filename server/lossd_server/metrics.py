"""Prometheus collectors (prefix ``lossd_``), all in one place.

RPC metrics come from :class:`RpcMetricsInterceptor`; batch metrics from :class:`BatchMetrics`,
the batcher's observer. Buckets span sub-millisecond CPU calls to multi-second large requests.
"""

from __future__ import annotations

import os
import time

import grpc
import torch
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from . import __version__

LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
BATCH_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_ROW_BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter("lossd_requests", "RPCs handled, by method and gRPC status code", ["method", "code"], registry=registry)
        self.request_latency = Histogram("lossd_request_latency_seconds", "RPC latency from handler start to answer", ["method"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.queue_wait = Histogram("lossd_queue_wait_seconds", "time a request waited in the batcher queue", buckets=LATENCY_BUCKETS_S, registry=registry)
        self.compute = Histogram("lossd_compute_seconds", "engine time per executed batch", buckets=LATENCY_BUCKETS_S, registry=registry)
        self.batch_requests = Histogram("lossd_batch_requests", "requests per executed batch", buckets=BATCH_REQUEST_BUCKETS, registry=registry)
        self.batch_rows = Histogram("lossd_batch_rows", "rows (positions) per executed batch", buckets=BATCH_ROW_BUCKETS, registry=registry)
        self.rows = Counter("lossd_rows", "rows (positions) evaluated", registry=registry)
        self.bytes_received = Counter("lossd_received_bytes", "request payload bytes received", ["method"], registry=registry)
        self.queue_depth = Gauge("lossd_queue_depth", "requests waiting in the batcher queue", registry=registry)
        self.device_memory = Gauge("lossd_device_memory_bytes", "CUDA memory allocated by the engine (0 on CPU)", registry=registry)
        self.process_rss = Gauge("lossd_process_rss_bytes", "resident set size of the server process", registry=registry)
        self.build = Info("lossd_build", "lossd build information", registry=registry)


_METRICS: Metrics | None = None


def get() -> Metrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class BatchMetrics:
    """Batcher observer: one call per executed batch."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.m = metrics or get()

    def on_batch(self, figures) -> None:
        m = self.m
        m.batch_requests.observe(figures.requests)
        m.batch_rows.observe(figures.rows)
        m.rows.inc(figures.rows)
        m.compute.observe(figures.compute_s)
        for wait in figures.queue_wait_s:
            m.queue_wait.observe(wait)

    def on_queue_depth(self, depth: int) -> None:
        self.m.queue_depth.set(depth)


def _method_name(handler_call_details) -> str:
    return handler_call_details.method.rsplit("/", 1)[-1]


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts RPCs by method and status code and times them. Wraps every handler kind."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.m = metrics or get()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = _method_name(handler_call_details)
        m = self.m

        def finish(start: float, context) -> None:
            code = context.code() if hasattr(context, "code") else None
            name = code.name if isinstance(code, grpc.StatusCode) else "OK"
            if code is None or code == 0:
                name = "OK"
            m.requests.labels(method, name).inc()
            m.request_latency.labels(method).observe(time.perf_counter() - start)

        def count_bytes(message) -> None:
            m.bytes_received.labels(method).inc(message.ByteSize())

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                start = time.perf_counter()
                count_bytes(request)
                try:
                    return await inner(request, context)
                except BaseException:
                    if context.code() is None:
                        context.set_code(grpc.StatusCode.CANCELLED)
                    raise
                finally:
                    finish(start, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(request_iterator, context):
                start = time.perf_counter()

                async def counted():
                    async for message in request_iterator:
                        count_bytes(message)
                        yield message

                try:
                    return await inner_su(counted(), context)
                finally:
                    finish(start, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def stream_stream(request_iterator, context):
                start = time.perf_counter()

                async def counted():
                    async for message in request_iterator:
                        count_bytes(message)
                        yield message

                try:
                    async for response in inner_ss(counted(), context):
                        yield response
                finally:
                    finish(start, context)

            return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer, handler.response_serializer)
        return handler


def start_http(config, server) -> int | None:
    """Serve /metrics on config.metrics_host:metrics_port (0 disables); returns the bound port."""
    if config.metrics_port == 0:
        return None
    m = get()
    m.build.info({"version": __version__, "torch_version": torch.__version__, "device": str(server.device)})

    m.process_rss.set_function(rss_bytes)
    m.queue_depth.set_function(lambda: server.batcher.queue_depth)
    if server.device.type == "cuda":
        m.device_memory.set_function(lambda: torch.cuda.memory_allocated(server.device))
    httpd, _thread = start_http_server(config.metrics_port, addr=config.metrics_host)
    return httpd.server_address[1]
