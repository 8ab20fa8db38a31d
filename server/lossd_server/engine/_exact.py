"""Numeric helpers of :mod:`.kl_div` and :mod:`.compare`: the engine's own, plus the dtype sets and
the exact bfloat16 upcast those two modules use.
"""

from __future__ import annotations

import torch

from .dtypes import itemsize
from .finish import divide
from .results import fsum
from .spec import FLOAT_DTYPES, dtype_name

HALF_DTYPES = (torch.float16, torch.bfloat16)

__all__ = ["FLOAT_DTYPES", "HALF_DTYPES", "divide", "dtype_name", "fsum", "itemsize", "to_compute"]


def to_compute(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``t`` on ``device`` in ``dtype``; bfloat16 -> float32 on CPU as a 16-bit shift of the raw words.

    The shift is exact (bfloat16 is the upper half of a float32, NaN and infinities included)
    and several times faster than torch's CPU conversion kernel.
    """
    t = t.to(device=device)
    if t.dtype == torch.bfloat16 and dtype == torch.float32 and t.device.type == "cpu":
        return (t.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    return t.to(dtype)
