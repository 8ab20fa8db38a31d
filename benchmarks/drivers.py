"""Load generators. Each returns a :class:`Measurement` (count, wall time, per-request latencies, CPU).

Every driver is bounded by a duration and by a request count. Unary drivers send pre-serialised
EvaluateRequest bytes through a raw ``channel.unary_unary`` (no serializer, no deserializer: the
same bytes and the same client cost for every server, the floor included); the streaming driver
goes through ``AsyncLossClient.evaluate_many`` as a user would.

CPU over the timed span: the benchmark process's ``time.process_time()`` (client CPU) and, when a
``server_cpu`` reader is given, the server process's utime + stime from ``/proc/PID/stat``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import torch
import torch.nn.functional as F
from lossd_client import AsyncLossClient

from .workloads import Workload

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
EVALUATE = "/lossd.v1.LossService/Evaluate"
CpuReader = Callable[[], float]


class CpuClock:
    """CPU seconds of this process (client) and of a server process over a span."""

    def __init__(self, server_cpu: CpuReader | None = None) -> None:
        self._server_cpu = server_cpu
        self._client0 = time.process_time()
        self._server0 = server_cpu() if server_cpu else None

    def read(self) -> tuple[float, float | None]:
        client = time.process_time() - self._client0
        server = self._server_cpu() - self._server0 if self._server_cpu and self._server0 is not None else None
        return client, server


@dataclass
class Measurement:
    count: int
    rows: int
    wall_s: float
    latencies_s: list[float]
    errors: int = 0
    client_cpu_s: float = math.nan
    server_cpu_s: float | None = None

    @property
    def req_per_s(self) -> float:
        return self.count / self.wall_s if self.wall_s else 0.0

    @property
    def calls(self) -> int:
        """Answered calls, errors included (the CPU was spent on them too)."""
        return self.count + self.errors

    @property
    def client_cpu_us(self) -> float:
        return self.client_cpu_s / self.calls * 1e6 if self.calls else math.nan

    @property
    def server_cpu_us(self) -> float | None:
        return self.server_cpu_s / self.calls * 1e6 if self.calls and self.server_cpu_s is not None else None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")


def _torch_call(r, device: torch.device):
    x = torch.as_tensor(r.input).to(device)
    t = torch.as_tensor(r.target).to(device)
    if r.loss == "binary_cross_entropy_with_logits":
        return F.binary_cross_entropy_with_logits(x, t, reduction=r.reduction)
    w = None if r.weight is None else torch.as_tensor(r.weight).to(device)
    if r.loss == "nll_loss":
        return F.nll_loss(x, t, weight=w, ignore_index=r.ignore_index, reduction=r.reduction)
    return F.cross_entropy(x, t, weight=w, ignore_index=r.ignore_index, reduction=r.reduction, label_smoothing=r.label_smoothing)


def in_process(w: Workload, duration_s: float, max_count: int, device: str = "cpu") -> Measurement:
    """(a) torch.nn.functional in this process, one call after another (tensors already in torch)."""
    dev = torch.device(device)
    reqs = [type(r)(**{**r.__dict__, "input": torch.as_tensor(r.input), "target": torch.as_tensor(r.target)}) for r in w.requests]
    lat: list[float] = []
    rows = 0
    clock = CpuClock()
    start = time.perf_counter()
    end = start + duration_s
    i = 0
    while i < max_count and time.perf_counter() < end:
        t0 = time.perf_counter()
        out = _torch_call(reqs[i % len(reqs)], dev)
        if dev.type == "cuda":
            out.cpu()
        lat.append(time.perf_counter() - t0)
        rows += w.rows[i % len(reqs)]
        i += 1
    wall = time.perf_counter() - start
    return Measurement(i, rows, wall, lat, client_cpu_s=clock.read()[0])


async def _unary(address: str, w: Workload, in_flight: int, duration_s: float, max_count: int, server_cpu: CpuReader | None) -> Measurement:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(EVALUATE)  # bytes in, bytes out: nothing (de)serialised per call
        await asyncio.wait_for(channel.channel_ready(), 30)
        payloads = w.payloads
        lat: list[float] = []
        counter = {"next": 0, "rows": 0, "errors": 0}
        clock = CpuClock(server_cpu)
        start = time.perf_counter()
        end = start + duration_s

        async def worker() -> None:
            while counter["next"] < max_count and time.perf_counter() < end:
                i = counter["next"]
                counter["next"] += 1
                k = i % len(payloads)
                t0 = time.perf_counter()
                try:
                    await call(payloads[k], timeout=60)
                except grpc.aio.AioRpcError:
                    counter["errors"] += 1
                    continue
                lat.append(time.perf_counter() - t0)
                counter["rows"] += w.rows[k]

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        wall = time.perf_counter() - start
        client_cpu, server_cpu_s = clock.read()
        return Measurement(len(lat), counter["rows"], wall, lat, counter["errors"], client_cpu, server_cpu_s)


def unary(address: str, w: Workload, in_flight: int, duration_s: float, max_count: int, server_cpu: CpuReader | None = None) -> Measurement:
    """Unary Evaluate calls of pre-serialised requests with ``in_flight`` outstanding at all times."""
    return asyncio.run(_unary(address, w, in_flight, duration_s, max_count, server_cpu))


async def _stream(address: str, w: Workload, window: int, duration_s: float, max_count: int, server_cpu: CpuReader | None) -> Measurement:
    sent: list[float] = []
    lat: list[float] = []
    rows = 0
    errors = 0
    clock = CpuClock(server_cpu)
    start = time.perf_counter()
    end = start + duration_s

    def source():
        i = 0
        while i < max_count and time.perf_counter() < end:
            sent.append(time.perf_counter())
            yield w.requests[i % len(w.requests)]
            i += 1

    async with AsyncLossClient(address, timeout_s=600, max_message_bytes=64 << 20) as client:
        i = 0
        async for result in client.evaluate_many(source(), window=window, return_exceptions=True):
            if isinstance(result, Exception):
                errors += 1
            else:
                lat.append(time.perf_counter() - sent[i])
                rows += w.rows[i % len(w.requests)]
            i += 1
    wall = time.perf_counter() - start
    client_cpu, server_cpu_s = clock.read()
    return Measurement(len(lat), rows, wall, lat, errors, client_cpu, server_cpu_s)


def stream(address: str, w: Workload, window: int, duration_s: float, max_count: int, server_cpu: CpuReader | None = None) -> Measurement:
    """``evaluate_many`` over one EvaluateStream with ``window`` requests in flight."""
    return asyncio.run(_stream(address, w, window, duration_s, max_count, server_cpu))
