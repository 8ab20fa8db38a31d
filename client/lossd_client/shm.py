"""Same-host shared-memory transport for large tensors (opt-in on both sides).

The client copies a tensor's bytes into a POSIX shared-memory segment and sends only a
reference. Segments come from a per-client :class:`SegmentPool` and are reused by later calls
(a fresh multi-hundred-megabyte segment costs a page fault per page on every call); they are
unlinked when the client closes, and multiprocessing's resource tracker (a separate process)
unlinks them if the client process dies, mid-call or not.

Every segment is named ``lossd-<random>`` (mode 0600, as multiprocessing creates it) and starts
with a :data:`HEADER_BYTES` header: :data:`MAGIC`, then a random :data:`TOKEN_BYTES`-byte token
from :mod:`secrets`, then zeros. The tensor bytes follow the header. A reference carries the
token; the server copies the bytes only when the token in the request equals the one in the
segment, so a reference is a capability that only the segment's creator (or whoever it hands
the token to) holds: guessing a name that exists is not enough to read someone else's data.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from . import tensors
from ._proto.lossd.v1 import loss_pb2 as pb

#: Segment names start with this; the server refuses any other name.
NAME_PREFIX = "lossd-"
#: First bytes of every segment (the trailing digit is the header version).
MAGIC = b"LOSSDSM1"
#: Length of the per-segment token (SharedMemoryRef.token).
TOKEN_BYTES = 16
#: Header size: MAGIC, the token, zeros. Tensor bytes start here (64-byte aligned).
HEADER_BYTES = 64


def header(token: bytes) -> bytes:
    """The :data:`HEADER_BYTES` bytes a segment carrying ``token`` starts with."""
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"a segment token has {TOKEN_BYTES} bytes, got {len(token)}")
    return (MAGIC + token).ljust(HEADER_BYTES, b"\0")


@dataclass(eq=False)
class Segment:
    """One lossd segment: its shared memory, its token and how many tensor bytes it holds."""

    shm: shared_memory.SharedMemory
    token: bytes

    @property
    def name(self) -> str:
        return self.shm.name

    @property
    def capacity(self) -> int:
        return self.shm.size - HEADER_BYTES


def create_segment(nbytes: int) -> Segment:
    """A new segment named ``lossd-<random>`` with room for ``nbytes`` after its header."""
    token = secrets.token_bytes(TOKEN_BYTES)
    while True:
        try:
            shm = shared_memory.SharedMemory(NAME_PREFIX + secrets.token_hex(12), create=True, size=HEADER_BYTES + max(1, nbytes))
            break
        except FileExistsError:  # pragma: no cover - 96 random bits
            continue
    shm.buf[:HEADER_BYTES] = header(token)
    return Segment(shm, token)


class SegmentPool:
    """Shared-memory segments of one client: lent to a call, returned, unlinked on close()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Segment] = []
        self._all: list[Segment] = []

    def take(self, nbytes: int) -> Segment:
        """The smallest free segment with room for ``nbytes`` (a new one if none fits)."""
        with self._lock:
            fitting = [s for s in self._free if s.capacity >= nbytes]
            if fitting:
                segment = min(fitting, key=lambda s: s.capacity)
                self._free.remove(segment)
                return segment
        segment = create_segment(nbytes)
        with self._lock:
            self._all.append(segment)
        return segment

    def give_back(self, segment: Segment) -> None:
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
                segment.shm.close()
            with contextlib.suppress(FileNotFoundError):
                segment.shm.unlink()


class SharedMemoryArena(contextlib.AbstractContextManager):
    """The segments of one call; leaving it returns them to the pool (or unlinks them)."""

    def __init__(self, min_bytes: int, pool: SegmentPool | None = None) -> None:
        self.min_bytes = min_bytes
        self._own_pool = pool is None
        self._pool = SegmentPool() if pool is None else pool
        self._segments: list[Segment] = []

    def place(self, value: Any, out: pb.Tensor) -> bool:
        """Copy ``value`` into a segment and reference it from ``out``; False if it is small."""
        wire, shape, data = tensors.as_wire_bytes(value)
        if data.nbytes < self.min_bytes:
            return False
        segment = self._pool.take(data.nbytes)
        self._segments.append(segment)
        np.frombuffer(segment.shm.buf, dtype=np.uint8, count=data.nbytes, offset=HEADER_BYTES)[:] = np.frombuffer(data, dtype=np.uint8)
        out.dtype = wire
        out.shape[:] = shape
        out.shm.name = segment.name.lstrip("/")
        out.shm.offset = HEADER_BYTES
        out.shm.length = data.nbytes
        out.shm.token = segment.token
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
