"""lossd_server.engine.kl_div against torch.nn.functional.kl_div itself.

Accept / reject: the module raises InvalidInput exactly when torch raises, and reports exactly the
warnings torch emits. Values are checked as tests/kl_cases.py says (bit for bit where torch's
result is float32 / float64, within rounding bounds of float64 torch for half / bfloat16).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kl_cases import assert_within, cases, check_values, magnitudes, result_magnitude, torch_kl_div
from lossd_server.engine import InvalidInput
from lossd_server.engine import kl_div as kd
from torch.nn import _reduction

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_case(x: torch.Tensor, t: torch.Tensor, options: dict[str, Any]) -> None:
    try:
        own, warned = torch_kl_div(x, t, **options)
    except Exception:  # noqa: BLE001 - torch rejects: so must the module
        with pytest.raises(InvalidInput):
            kd.evaluate_kl_div(x, t, **options)
        return
    result = kd.evaluate_kl_div(x, t, **options)
    assert list(result.warnings) == warned
    check_values(result.loss, x, t, options)
    # the totals reproduce a reduced result (what combining requests relies on)
    if kd.plan_kl_div(x.shape, x.dtype, t.shape, t.dtype, **options).reduction != "none":
        combined = torch.tensor(kd.divide(result.loss_sum, result.denominator), dtype=torch.float64).to(result.loss.dtype)
        torch.testing.assert_close(result.loss, combined, rtol=0, atol=0, equal_nan=True)
    # tiny chunks: elementwise results identical, sums within float64 rounding
    tiny = kd.evaluate_kl_div(x, t, **options, chunk_bytes=8)
    assert tiny.numel == result.numel == math.prod(torch.broadcast_shapes(x.shape, t.shape))
    assert tiny.denominator == result.denominator
    assert_sums_close(tiny.loss_sum, result.loss_sum, kd.plan_kl_div(x.shape, x.dtype, t.shape, t.dtype, **options), x, t)
    assert_chunked_equal(tiny.loss, result.loss, kd.plan_kl_div(x.shape, x.dtype, t.shape, t.dtype, **options), x, t)


def assert_sums_close(a: float, b: float, plan: kd.KlDivPlan, x: torch.Tensor, t: torch.Tensor) -> None:
    """float64 sums of the same elements in another order: within 64 eps of the sum of magnitudes."""
    scale = float(magnitudes(x, t, plan.log_target).expand(plan.output_shape).sum()) if plan.numel else 0.0
    assert a == pytest.approx(b, rel=0, abs=64 * torch.finfo(torch.float64).eps * scale + 1e-300, nan_ok=True)


def assert_chunked_equal(chunked: torch.Tensor, whole: torch.Tensor, plan: kd.KlDivPlan, x: torch.Tensor, t: torch.Tensor) -> None:
    """Per-element losses identical; reduced values equal up to float64 summation order and the
    output dtype's rounding of that."""
    if plan.reduction == "none":
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0, equal_nan=True)
        return
    eps = torch.finfo(whole.dtype).eps
    subnormal_step = torch.finfo(whole.dtype).smallest_normal * eps
    bound = eps * whole.double().abs() + 64 * torch.finfo(torch.float64).eps * result_magnitude(plan, x, t) + subnormal_step
    assert_within(chunked, whole, bound)


# ---------------------------------------------------------------------------- properties
@SETTINGS
@given(cases())
def test_matches_torch(case: tuple[torch.Tensor, torch.Tensor, dict[str, Any]]) -> None:
    check_case(*case)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.data())
def test_rows_streamed_in_ranges_equal_whole(case: tuple[torch.Tensor, torch.Tensor, dict[str, Any]], data: st.DataObject) -> None:
    x, t, options = case
    try:
        plan = kd.plan_kl_div(x.shape, x.dtype, t.shape, t.dtype, **options)
    except InvalidInput:
        return
    whole = kd.evaluate_kl_div(x, t, **options)
    cuts = sorted(data.draw(st.lists(st.integers(0, plan.rows), max_size=3)))
    bounds = [0, *cuts, plan.rows]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        xi = x[a:b] if plan.input_by_rows else x
        ti = t[a:b] if plan.target_by_rows else t
        if not (plan.input_by_rows or plan.target_by_rows) and (a, b) != (0, plan.rows):
            continue  # a 0-dim output is one row: evaluated whole
        parts.append(kd.evaluate_kl_div_rows(plan, xi, ti, a, chunk_bytes=data.draw(st.sampled_from([4, 64, 1 << 20]))))
    merged = kd.merge_kl_div_partials(parts)
    result = kd.finish_kl_div(plan, merged)
    assert result.numel == whole.numel
    assert_sums_close(result.loss_sum, whole.loss_sum, plan, x, t)
    assert_chunked_equal(result.loss, whole.loss, plan, x, t)


# ---------------------------------------------------------------------------- specific behaviour
@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
def test_legacy_reduction_is_torchs(size_average: bool | None, reduce: bool | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert kd.legacy_reduction(size_average, reduce) == _reduction.legacy_get_string(size_average, reduce)


def test_batchmean_divides_by_the_input_batch_not_the_broadcast_one() -> None:
    x = torch.log_softmax(torch.randn(1, 5, dtype=torch.float64), 1)
    t = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1)
    result = kd.evaluate_kl_div(x, t, reduction="batchmean")
    assert result.denominator == 1.0  # input.size(0), as torch
    torch.testing.assert_close(result.loss, F.kl_div(x, t, reduction="batchmean"))
    scalar = kd.evaluate_kl_div(x[0, 0], t, reduction="batchmean")  # 0-dim input: no division
    assert scalar.denominator == 1.0
    torch.testing.assert_close(scalar.loss, F.kl_div(x[0, 0], t, reduction="batchmean"))


def test_batchmean_beside_legacy_keywords_still_divides() -> None:
    x = torch.randn(3, 4)
    t = torch.rand(3, 4)
    result = kd.evaluate_kl_div(x, t, reduce=False, reduction="batchmean")
    own, _ = torch_kl_div(x, t, reduce=False, reduction="batchmean")
    assert result.loss.shape == (3, 4)
    torch.testing.assert_close(result.loss, own, rtol=0, atol=0)
    assert result.denominator == 3.0


def test_reduction_strings_are_ignored_beside_legacy_keywords_as_torch() -> None:
    x, t = torch.randn(2, 3), torch.rand(2, 3)
    result = kd.evaluate_kl_div(x, t, size_average=False, reduction="no-such-reduction")
    own, warned = torch_kl_div(x, t, size_average=False, reduction="no-such-reduction")
    torch.testing.assert_close(result.loss, own)
    assert list(result.warnings) == warned and warned


def test_warnings_are_torchs() -> None:
    x, t = torch.randn(2, 3), torch.rand(2, 3)
    for options in ({"reduction": "mean"}, {"reduction": "elementwise_mean"}, {"reduction": "batchmean"}, {"reduce": False}):
        _, warned = torch_kl_div(x, t, **options)
        assert list(kd.evaluate_kl_div(x, t, **options).warnings) == warned
    assert kd.plan_kl_div((2, 3), torch.float32, (3,), torch.float32, reduction="sum").warnings == ()


def test_half_inputs_are_accumulated_in_float32() -> None:
    # 4096 equal elements of 1/3 in float16: a float16 running sum would stall far below 1365.33
    t = torch.full((4096,), 0.5, dtype=torch.float16)
    x = torch.full((4096,), math.log(0.5) - 2 / 3, dtype=torch.float16)
    result = kd.evaluate_kl_div(x, t, reduction="sum", chunk_bytes=64)
    elem = float(torch.xlogy(t[0].float(), t[0].float()) - t[0].float() * x[0].float())
    assert result.loss_sum == pytest.approx(4096 * elem, rel=1e-6)
    assert result.loss.dtype == torch.float16


@pytest.mark.parametrize(
    ("input_shape", "target_shape"),
    [((2, 3), (4,)), ((2, 3), (3, 3)), ((5,), (2, 4)), ((2, 0), (2, 2)), ((3, 1, 2), (2, 3))],
)
def test_shape_mismatch_names_target_with_torchs_message(input_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> None:
    with pytest.raises(RuntimeError) as own:
        F.kl_div(torch.zeros(input_shape), torch.zeros(target_shape), reduction="none")
    with pytest.raises(InvalidInput) as exc:
        kd.plan_kl_div(input_shape, torch.float32, target_shape, torch.float32, reduction="none")
    assert exc.value.field == "target"
    assert exc.value.message.startswith(str(own.value).split("\n")[0])


@pytest.mark.parametrize(
    ("input_dtype", "target_dtype", "field"),
    [
        (torch.int64, torch.float32, "input"),
        (torch.float32, torch.int32, "target"),
        (torch.bool, torch.float32, "input"),
        (torch.float32, torch.complex64, "target"),
        (torch.complex128, torch.float64, "input"),
        (torch.float8_e4m3fn, torch.float32, "input"),
        (torch.float16, torch.float8_e5m2, "target"),
    ],
)
def test_rejected_dtypes_name_the_field(input_dtype: torch.dtype, target_dtype: torch.dtype, field: str) -> None:
    with pytest.raises((RuntimeError, NotImplementedError)):
        F.kl_div(torch.zeros(2, dtype=input_dtype), torch.zeros(2, dtype=target_dtype), reduction="sum")
    with pytest.raises(InvalidInput) as exc:
        kd.plan_kl_div((2,), input_dtype, (2,), target_dtype, reduction="sum")
    assert exc.value.field == field


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"reduction": "avg"}, "options.reduction"),
        ({"reduction": None}, "options.reduction"),
        ({"log_target": 1}, "options.log_target"),
        ({"size_average": "yes"}, "options.size_average"),
        ({"reduce": 0}, "options.reduce"),
    ],
)
def test_rejected_options_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        kd.plan_kl_div((2, 3), torch.float32, (2, 3), torch.float32, **options)
    assert exc.value.field == field


def test_chunks_that_do_not_fit_the_plan_are_rejected() -> None:
    plan = kd.plan_kl_div((4, 3), torch.float32, (3,), torch.float32, reduction="sum")
    x, t = torch.zeros(4, 3), torch.zeros(3)
    with pytest.raises(InvalidInput) as exc:
        kd.evaluate_kl_div_rows(plan, x[:2], t, 3)  # rows 3..5 of 4
    assert exc.value.field == "input"
    with pytest.raises(InvalidInput) as exc:
        kd.evaluate_kl_div_rows(plan, x[:2, :2], t)
    assert exc.value.field == "input"
    with pytest.raises(InvalidInput) as exc:
        kd.evaluate_kl_div_rows(plan, x, t[:2])  # broadcast operand travels whole
    assert exc.value.field == "target"
    with pytest.raises(InvalidInput) as exc:
        kd.evaluate_kl_div_rows(plan, x.double(), t)
    assert exc.value.field == "input"
    with pytest.raises(ValueError):
        kd.finish_kl_div(plan, kd.evaluate_kl_div_rows(plan, x[:2], t))  # rows 2..3 missing


def test_large_rows_are_split_within_a_row() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 50, generator=g)
    t = torch.rand(3, 50, generator=g)
    whole = kd.evaluate_kl_div(x, t, reduction="none")
    split = kd.evaluate_kl_div(x, t, reduction="none", chunk_bytes=40)  # 10 elements: less than one row
    torch.testing.assert_close(split.loss, whole.loss, rtol=0, atol=0)
    torch.testing.assert_close(whole.loss, F.kl_div(x, t, reduction="none"), rtol=0, atol=0)
