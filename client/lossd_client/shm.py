"""Same-host shared-memory transport for large tensors (opt-in on both sides).

The client copies a tensor's bytes into a POSIX shared-memory segment and sends only a
reference. Segments are unlinked when the call ends; if the client process dies mid-call,
multiprocessing's resource tracker (a separate process) unlinks them when it notices.
"""

from __future__ import annotations

import contextlib
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from . import tensors
from ._proto.lossd.v1 import loss_pb2 as pb


class SharedMemoryArena(contextlib.AbstractContextManager):
    """Holds the segments of one call; ``close()`` unlinks them all."""

    def __init__(self, min_bytes: int) -> None:
        self.min_bytes = min_bytes
        self._segments: list[shared_memory.SharedMemory] = []

    def place(self, value: Any, out: pb.Tensor) -> bool:
        """Put ``value`` in a new segment and reference it from ``out``; False if it is small."""
        wire, shape, data = tensors.as_wire_bytes(value)
        if data.nbytes < self.min_bytes:
            return False
        segment = shared_memory.SharedMemory(create=True, size=data.nbytes)
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
        while self._segments:
            segment = self._segments.pop()
            with contextlib.suppress(BufferError):
                segment.close()
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()

    def __exit__(self, *exc: object) -> None:
        self.close()
