"""kl_div test cases and checks against torch.nn.functional.kl_div, shared by the kernel's unit tests
(tests/unit/test_engine_kl_div.py), the engine's (tests/unit/test_kl_engine.py) and the server's
(tests/service/test_kl_div.py).

Values: shape and dtype are torch's; when torch's result is float32 / float64 the per-element
losses ('none') are torch's bit for bit and reductions differ from torch's only by summation order
(bounded by eps * sum of |elements|); half / bfloat16 results (computed in float32) are checked
against torch in float64 within the output dtype's rounding plus float32 error bounds.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from lossd_server.engine import kl_div as kd

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALF = (torch.float16, torch.bfloat16)
REJECTED_DTYPES = (torch.int64, torch.bool, torch.uint8, torch.complex64, torch.float8_e4m3fn)


def torch_kl_div(input: torch.Tensor, target: torch.Tensor, **options: Any) -> tuple[torch.Tensor, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = F.kl_div(input, target, **options)
    return out, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------- strategies
@st.composite
def shapes(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input shape, target shape): mostly broadcastable (dims dropped or set to 1 on either side)."""
    base = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))

    def derive() -> tuple[int, ...]:
        k = draw(st.integers(0, len(base)))
        return tuple(1 if draw(st.integers(0, 3)) == 0 else s for s in base[len(base) - k :])

    if draw(st.integers(0, 9)) == 0:  # anything, often not broadcastable
        return base, tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    a, b = derive(), derive()
    if draw(st.booleans()):
        a = base
    return (a, b) if draw(st.booleans()) else (b, a)


def values(g: torch.Generator, shape: tuple[int, ...], kind: str, special: bool) -> torch.Tensor:
    """float64 values: 'logp' (input), 'prob' or 'logt' (target)."""
    if kind == "prob":
        x = torch.rand(shape, generator=g, dtype=torch.float64)
        x = torch.where(torch.rand(shape, generator=g) < 0.2, 0.0, x)
    else:
        scale = float(torch.empty(()).uniform_(0.5, 6.0, generator=g))
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).clamp(-30, 8)
    if special and x.numel():
        pick = torch.randint(0, 6, shape, generator=g)
        specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.5, 1.0], dtype=torch.float64)
        x = torch.where(torch.rand(shape, generator=g) < 0.15, specials[pick], x)
    return x


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    in_shape, t_shape = draw(shapes())
    odd = draw(st.integers(0, 14)) == 0
    in_dtype = draw(st.sampled_from(REJECTED_DTYPES if odd and draw(st.booleans()) else FLOATS))
    t_dtype = draw(st.sampled_from(REJECTED_DTYPES if odd else FLOATS))
    log_target = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    special = draw(st.integers(0, 4)) == 0
    x = values(g, in_shape, "logp", special)
    t = values(g, t_shape, "logt" if log_target else "prob", special)
    options: dict[str, Any] = {"log_target": log_target}
    reduction = draw(st.sampled_from(["mean", "sum", "none", "none", "batchmean", "batchmean", "elementwise_mean", "avg"]))
    options["reduction"] = reduction
    if draw(st.integers(0, 4)) == 0:
        options["size_average"] = draw(st.sampled_from([None, True, False]))
        options["reduce"] = draw(st.sampled_from([None, True, False]))
    return x.to(in_dtype), t.to(t_dtype), options


# ---------------------------------------------------------------------------- checks
def magnitudes(x: torch.Tensor, t: torch.Tensor, log_target: bool) -> torch.Tensor:
    """float64 bound on the size of each element's terms (for rounding error bounds)."""
    x, t = x.double(), t.double()
    if log_target:
        return torch.exp(t) * (t.abs() + x.abs())
    return torch.xlogy(t, t).abs() + (t * x).abs()


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    """Same NaNs, same infinities, finite values within ``bound`` (all float64)."""
    actual, expected = actual.double(), expected.double()
    assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
    inf = expected.isinf()
    assert torch.equal(actual.isinf(), inf), (actual, expected)
    assert torch.equal(actual[inf], expected[inf])
    fin = expected.isfinite()
    err = (actual - expected).abs()
    bound = bound.expand(expected.shape).nan_to_num(nan=math.inf)
    assert bool((err[fin] <= bound[fin]).all()), (actual, expected, err, bound)


def result_magnitude(plan: kd.KlDivPlan, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Bound on the size of the terms behind each value of the result (float64, result's shape)."""
    mag = magnitudes(x, t, plan.log_target).expand(plan.output_shape)
    if plan.reduction == "none":
        return mag / (plan.batch_divisor or 1)
    total = mag.sum() if mag.numel() else torch.tensor(0.0, dtype=torch.float64)
    return total / (plan.denominator if plan.denominator else 1.0)


def check_values(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, options: dict[str, Any]) -> None:
    """``out`` (what lossd returned for ``F.kl_div(x, t, **options)``) against torch, as the module docstring says."""
    own, _ = torch_kl_div(x, t, **options)
    assert out.dtype == own.dtype and out.shape == own.shape
    plan = kd.plan_kl_div(x.shape, x.dtype, t.shape, t.dtype, **options)
    mag_out = result_magnitude(plan, x, t)
    if out.dtype not in HALF:
        if plan.reduction == "none":
            torch.testing.assert_close(out, own, rtol=0, atol=0, equal_nan=True)  # bit for bit
        else:
            eps = torch.finfo(out.dtype).eps
            assert_within(out, own, 4 * eps * (mag_out + own.double().abs()) + 1e-300)
        return
    # half / bfloat16: computed in float32, rounded once; torch in float64 as the reference
    ref, _ = torch_kl_div(x.double(), t.double(), **options)
    eps_out = torch.finfo(out.dtype).eps
    tiny = torch.finfo(out.dtype).smallest_normal
    bound = eps_out * ref.abs() + 8 * torch.finfo(torch.float32).eps * mag_out + tiny
    assert_within(out, ref.to(out.dtype), 2 * bound)
