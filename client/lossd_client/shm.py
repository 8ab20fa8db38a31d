"""Same-host shared-memory transport for large tensors (opt-in on both sides).

The client copies a tensor's bytes into a POSIX shared-memory segment and sends only a
reference. Segments come from a per-client :class:`SegmentPool` and are reused by later calls
(a fresh multi-hundred-megabyte segment costs a page fault per page on every call); they are
unlinked when the client closes, and multiprocessing's resource tracker (a separate process)
unlinks them if the client process dies, mid-call or not.
"""

from __future__ import annotations

import contextlib
import threading
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from . import tensors
from ._proto.lossd.v1 import loss_pb2 as pb


class SegmentPool:
    """Shared-memory segments of one client: lent to a call, returned, unlinked on close()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[shared_memory.SharedMemory] = []
        self._all: list[shared_memory.SharedMemory] = []

    def take(self, nbytes: int) -> shared_memory.SharedMemory:
        """The smallest free segment of at least ``nbytes`` (a new one if none fits)."""
        with self._lock:
            fitting = [s for s in self._free if s.size >= nbytes]
            if fitting:
                segment = min(fitting, key=lambda s: s.size)
                self._free.remove(segment)
                return segment
        segment = shared_memory.SharedMemory(create=True, size=max(1, nbytes))
        with self._lock:
            self._all.append(segment)
        return segment

    def give_back(self, segment: shared_memory.SharedMemory) -> None:
        with self._lock:
            if segment in self._all:
                self._free.append(segment)

    @property
    def names(self) -> list[str]:
        with self._lock:
            return [s.name for s in self._all]

    def close(self) -> None:
        with self._lock:
            segments, self._all, self._free = self._all, [], []
        for segment in segments:
            with contextlib.suppress(BufferError):
                segment.close()
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()


class SharedMemoryArena(contextlib.AbstractContextManager):
    """The segments of one call; leaving it returns them to the pool (or unlinks them)."""

    def __init__(self, min_bytes: int, pool: SegmentPool | None = None) -> None:
        self.min_bytes = min_bytes
        self._own_pool = pool is None
        self._pool = SegmentPool() if pool is None else pool
        self._segments: list[shared_memory.SharedMemory] = []

    def place(self, value: Any, out: pb.Tensor) -> bool:
        """Copy ``value`` into a segment and reference it from ``out``; False if it is small."""
        wire, shape, data = tensors.as_wire_bytes(value)
        if data.nbytes < self.min_bytes:
            return False
        segment = self._pool.take(data.nbytes)
        self._segments.append(segment)
        np.frombuffer(segment.buf, dtype=np.uint8, count=data.nbytes)[:] = np.frombuffer(data, dtype=np.uint8)
        out.dtype = wire
        out.shape[:] = shape
        out.shm.name = segment.name.lstrip("/")
        out.shm.offset = 0
        out.shm.length = data.nbytes
        return True

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._segments]

    def close(self) -> None:
        segments, self._segments = self._segments, []
        for segment in segments:
            self._pool.give_back(segment)
        if self._own_pool:
            self._pool.close()

    def __exit__(self, *exc: object) -> None:
        self.close()
