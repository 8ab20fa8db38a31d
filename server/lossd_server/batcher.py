"""Dynamic batching (placeholder: one request per engine pass; see the batching issue)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass

import torch

from . import engine
from .config import ServerConfig


class QueueFull(Exception):
    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class DeadlineExpired(Exception):
    pass


@dataclass
class BatchFigures:
    requests: int
    rows: int
    bytes: int
    queue_wait_s: list[float]
    compute_s: float


class Batcher:
    def __init__(self, config: ServerConfig, device: torch.device, observer=None) -> None:
        self.config = config
        self.device = device
        self.observer = observer
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._queued = 0
        self._queued_bytes = 0

    @property
    def queue_depth(self) -> int:
        return self._queued

    async def start(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(self.config.compute_threads, thread_name_prefix="lossd-engine")

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def run_in_engine(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, plan: engine.Plan, input: torch.Tensor, target: torch.Tensor, *, deadline: float | None = None) -> engine.LossResult:
        nbytes = plan.input_nbytes
        if self._queued >= self.config.max_queue_requests:
            raise QueueFull("max_queue_requests", f"queue full: {self._queued} requests queued (max_queue_requests={self.config.max_queue_requests})")
        if self._queued_bytes + nbytes > self.config.max_queue_bytes and self._queued:
            raise QueueFull("max_queue_bytes", f"queue full: {self._queued_bytes + nbytes} bytes would be queued (max_queue_bytes={self.config.max_queue_bytes})")
        self._queued += 1
        self._queued_bytes += nbytes
        try:
            return await self.run_in_engine(lambda: engine.run(plan, input, target, device=self.device, chunk_bytes=self.config.chunk_bytes))
        finally:
            self._queued -= 1
            self._queued_bytes -= nbytes
