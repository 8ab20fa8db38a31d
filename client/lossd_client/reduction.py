"""How a reduced loss comes out of lossd's float64 totals where torch's own sums leave the dtype's range.

lossd keeps the numerator (``loss_sum``) and the denominator (``weight_sum``) of a reduction as
float64 totals and rounds their quotient once to the output dtype. torch sums in a dtype of its own
(the accumulation dtype below), so where a total is past that dtype's range torch's total is
±inf and its mean inf, -inf, nan or a zero while the float64 quotient is finite. :func:`quotient`
is that one rule, and :func:`total` gives a zero total torch's sign; both are used by every path
that reduces: the server's reductions
(``lossd_server.engine.finish`` and ``.kl_div``) and the join of a request cut into parts
(:func:`lossd_client.split.join_responses`). No torch: numpy rounds as torch rounds.
"""

from __future__ import annotations

import math

import numpy as np

from . import layout

#: 16-bit float dtypes: lossd accumulates them in float32.
HALF_DTYPES = ("float16", "bfloat16")


def divide(a: float, b: float) -> float:
    """a / b with IEEE semantics for b = 0 (0/0 = nan, x/0 = ±inf)."""
    if b == 0.0:
        return math.nan if a == 0.0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def rounded(value: float, dtype: str) -> float:
    """``value`` rounded to ``dtype`` ('float64', 'float32', 'float16', 'bfloat16') as torch rounds a
    float64 (a 16-bit float through float32), as a Python float; overflow gives ±inf."""
    if dtype == "float64":
        return value
    with np.errstate(over="ignore"):
        f32 = np.array(value, dtype=np.float64).astype(np.float32)
        if dtype == "float16":
            return float(f32.astype(np.float16))
    if dtype == "bfloat16" and not np.isnan(f32):
        bits = int(f32.view(np.uint32))
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # round to nearest even, as torch
        return float(np.array(bits, dtype=np.uint32).view(np.float32))
    return float(f32)


def total(value: float, loss: str, *, class_indices: bool = True) -> float:
    """A reduced total as torch's sum leaves it: a zero is +0.0 (torch's sums start from +0.0,
    whatever the signs of the zeros they add), except that cross_entropy with probabilities returns
    ``-(input * target).sum()``: -0.0 (an empty batch, all-zero targets, products that cancel)."""
    if value != 0.0:
        return value
    return -0.0 if loss == layout.CROSS_ENTROPY and not class_indices else 0.0


#: The largest finite value of each dtype: a total of at most this size rounds to a finite value.
_LARGEST = {"float32": 3.4028234663852886e38, "float16": 65504.0, "bfloat16": 3.3895313892515355e38}


def _within(value: float, dtype: str) -> bool:
    """Whether ``value`` certainly rounds to a finite ``dtype`` value (the per-request case: no
    numpy rounding, which cost 3 us a mean)."""
    return abs(value) <= _LARGEST[dtype] if dtype != "float64" else math.isfinite(value)


def quotient(num: float, den: float, num_dtype: str, den_dtype: str | None = None) -> float:
    """``num / den`` as torch gets it when it sums ``num`` in ``num_dtype`` and ``den`` in ``den_dtype``
    (None: the denominator is a count torch does not round, see :func:`accumulation_dtypes`).

    Where either total rounds to ±inf in its dtype, the quotient of the rounded totals (inf, -inf,
    nan or a signed zero, as torch's division of them); otherwise the float64 quotient, unchanged.
    """
    if _within(num, num_dtype) and (den_dtype is None or _within(den, den_dtype)):
        return divide(num, den)  # every total is finite in its dtype: no rounding to look at
    n = rounded(num, num_dtype)
    d = den if den_dtype is None else rounded(den, den_dtype)
    if math.isinf(n) or math.isinf(d):
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.float64(n) / np.float64(d))  # IEEE, the sign of a zero denominator included
    return divide(num, den)


def accumulation_dtypes(loss: str, dtype: str, reduction: str = "mean", *, class_indices: bool = True) -> tuple[str, str | None]:
    """The dtypes a reduction's numerator and denominator are summed in, for a result in ``dtype``
    (None: the denominator is an element or row count, which torch divides by unrounded): the
    dtype torch sums in for float32 and float64 results, float32 for a 16-bit one, which lossd
    computes as torch does in float32 (see the README: a float16 mean over 70000 tokens is torch's
    float32 mean, not the inf or nan of torch's float16 totals).

    - nll_loss and cross_entropy with class indices: torch's nll kernel sums the losses and the
      total weight in the output dtype (an unweighted total weight is the count cast to it);
    - cross_entropy with probabilities: ``-(input * target).sum()`` in the output dtype, divided by
      the row count;
    - kl_div 'batchmean': the 'sum' in the output dtype, divided by ``input.size(0)``;
    - the rest (binary_cross_entropy_with_logits and kl_div 'mean'): ``at::mean``, divided by the
      element count.
    """
    acc = "float32" if dtype in HALF_DTYPES else dtype
    if loss in (layout.NLL_LOSS, layout.CROSS_ENTROPY) and class_indices:
        return acc, acc
    return acc, None
