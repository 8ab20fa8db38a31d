"""Read-only access to same-host shared-memory tensors (``--allow-client-shm``).

The segment is opened read-only from /dev/shm and mapped without copying; the mapping lives
exactly as long as the tensors that view it, so nothing is kept after the call. The server
never creates, registers or unlinks client segments: their lifetime is the client's.
"""

from __future__ import annotations

import mmap
import os
import re
import warnings

import torch

from .codec import TensorError

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


def read_shared_tensor(field: str, ref, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
    """Map ``ref`` (a SharedMemoryRef) read-only and view it as a tensor; validates bounds."""
    name = ref.name.lstrip("/")
    if not _NAME.match(name) or name in (".", ".."):
        raise TensorError(f"{field}.shm.name", f"invalid segment name {ref.name!r}")
    if ref.length != nbytes:
        raise TensorError(f"{field}.shm.length", f"expected {nbytes} bytes for shape {list(shape)} of {dtype}, got {ref.length}")
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TensorError(f"{field}.shm.name", f"no shared-memory segment named {name!r} on the server's host") from None
    except OSError as exc:
        raise TensorError(f"{field}.shm.name", f"cannot open segment {name!r}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        end = ref.offset + ref.length
        if end > size:
            raise TensorError(f"{field}.shm", f"offset {ref.offset} + length {ref.length} exceeds the segment's {size} bytes")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        start = ref.offset - ref.offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, end - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
    finally:
        os.close(fd)
    view = memoryview(mapping)[ref.offset - start : end - start]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: the engine never writes
        return torch.frombuffer(view, dtype=dtype).view(shape)
