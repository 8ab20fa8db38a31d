"""Per-thread reusable CPU buffers and the bfloat16 -> float32 upcast that fills them."""

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
    """``t.to(dtype)``; bfloat16 -> float32 as a 16-bit shift of the raw words.

    Exact (bfloat16 is the upper half of a float32, NaN and infinities included) and several
    times faster than torch's CPU conversion kernel, which dominated bf16 evaluation. With
    ``reuse`` the result lives in a per-thread scratch buffer that the next reusing call
    overwrites: only for a chunk that is fully consumed before the next one is upcast.
    """
    if t.dtype == torch.bfloat16 and dtype == torch.float32 and t.device.type == "cpu":
        words = t.view(torch.int16)
        if reuse and t.is_contiguous():
            buf = scratch("upcast", t.numel(), torch.int32).view(t.shape)
            buf.copy_(words)
            return buf.bitwise_left_shift_(16).view(torch.float32)
        return (words.to(torch.int32) << 16).view(torch.float32)
    return t.to(dtype)
