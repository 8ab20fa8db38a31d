"""Load generators. Each returns a :class:`Measurement` (count, wall time, per-request latencies).

Every driver is bounded by a duration and by a request count. Unary drivers send pre-built
EvaluateRequest messages through a plain aio stub (the same client cost for every server);
the streaming driver goes through ``AsyncLossClient.evaluate_many`` as a user would.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import numpy as np
import torch
import torch.nn.functional as F
from lossd_client import AsyncLossClient
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc

from .workloads import Workload

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass
class Measurement:
    count: int
    rows: int
    wall_s: float
    latencies_s: list[float]
    errors: int = 0

    @property
    def req_per_s(self) -> float:
        return self.count / self.wall_s if self.wall_s else 0.0

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
    return Measurement(i, rows, time.perf_counter() - start, lat)


async def _unary(address: str, w: Workload, in_flight: int, duration_s: float, max_count: int) -> Measurement:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        lat: list[float] = []
        counter = {"next": 0, "rows": 0, "errors": 0}
        start = time.perf_counter()
        end = start + duration_s

        async def worker() -> None:
            while counter["next"] < max_count and time.perf_counter() < end:
                i = counter["next"]
                counter["next"] += 1
                k = i % len(w.messages)
                t0 = time.perf_counter()
                try:
                    await stub.Evaluate(w.messages[k], timeout=60)
                except grpc.aio.AioRpcError:
                    counter["errors"] += 1
                    continue
                lat.append(time.perf_counter() - t0)
                counter["rows"] += w.rows[k]

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return Measurement(len(lat), counter["rows"], time.perf_counter() - start, lat, counter["errors"])


def unary(address: str, w: Workload, in_flight: int, duration_s: float, max_count: int) -> Measurement:
    """Unary Evaluate calls with ``in_flight`` outstanding at all times."""
    return asyncio.run(_unary(address, w, in_flight, duration_s, max_count))


async def _stream(address: str, w: Workload, window: int, duration_s: float, max_count: int) -> Measurement:
    sent: list[float] = []
    lat: list[float] = []
    rows = 0
    errors = 0
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
    return Measurement(len(lat), rows, time.perf_counter() - start, lat, errors)


def stream(address: str, w: Workload, window: int, duration_s: float, max_count: int) -> Measurement:
    """``evaluate_many`` over one EvaluateStream with ``window`` requests in flight."""
    return asyncio.run(_stream(address, w, window, duration_s, max_count))
