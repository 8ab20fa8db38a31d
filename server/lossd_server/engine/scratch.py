"""Per-thread reusable CPU buffers and the half / bfloat16 -> float32 upcast that fills them."""

from __future__ import annotations

import threading

import torch

_SCRATCH = threading.local()


def scratch(name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread CPU buffer of n elements, reused across chunks.

    Fresh multi-megabyte tensors per chunk are mmap'd and page-faulted in every time (the
    server caps glibc's mmap threshold to bound its memory); reusing one buffer avoids that.
    """
    key = (name, dtype)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = buffers[key] = torch.empty(n, dtype=dtype)
    return buf[:n]


def upcast(t: torch.Tensor, dtype: torch.dtype, *, reuse: bool = False) -> torch.Tensor:
    """``t.to(dtype)``; with ``reuse`` (CPU, contiguous) into a per-thread scratch buffer that the
    next reusing call overwrites: only for a chunk that is fully consumed before the next one is
    upcast. A converting copy into a buffer that is already mapped costs a third less than a
    fresh tensor (measured for 4 MiB bfloat16 chunks with torch 2.13: 82 vs 118 us for the 16-bit
    shift this replaced, and every fresh multi-megabyte tensor is page-faulted in again)."""
    if reuse and t.device.type == "cpu" and t.is_contiguous():
        return scratch("upcast", t.numel(), dtype).view(t.shape).copy_(t)
    return t.to(dtype)
