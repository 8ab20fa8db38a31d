"""Small numeric helpers shared by :mod:`lossd_server.kl_div` and :mod:`lossd_server.compare`.

Kept apart from :mod:`lossd_server.engine` so these modules depend on the engine only for
:class:`~lossd_server.engine.InvalidInput` and the default chunk size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

#: The floating dtypes lossd computes with (the wire carries these four).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def fsum(values: Sequence[float]) -> float:
    """Exactly rounded sum of floats; IEEE semantics (inf - inf = nan, overflow = inf) when not finite."""
    try:
        return math.fsum(values)
    except (ValueError, OverflowError):
        return sum(values, 0.0)


def divide(a: float, b: float) -> float:
    """``a / b`` with IEEE semantics for b = 0 (as torch divides tensors): 0/0 = nan, x/0 = ±inf."""
    if b == 0.0:
        return math.nan if a == 0.0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def to_compute(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``t`` on ``device`` in ``dtype``; bfloat16 -> float32 on CPU as a 16-bit shift of the raw words.

    The shift is exact (bfloat16 is the upper half of a float32, NaN and infinities included)
    and several times faster than torch's CPU conversion kernel.
    """
    t = t.to(device=device)
    if t.dtype == torch.bfloat16 and dtype == torch.float32 and t.device.type == "cpu":
        return (t.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    return t.to(dtype)
