"""lossd_server.engine.compare against an independent float64 torch computation.

Per token: KL(reference || candidate) as ``F.kl_div(log_softmax(cand), log_softmax(ref),
log_target=True, reduction='none').sum(-1)`` in float64 (terms where the reference probability is
exactly 0 counted as 0), the target's probability as a gather of ``softmax`` in float64, NLL as a
gather of float64 ``log_softmax``, argmax agreement with numpy's argmax (first maximum, NaN first).
Half / bfloat16 logits are upcast exactly, so the float64 reference sees the same values; the
module computes in float32 (float64 when either model is float64), hence float32 tolerances.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lossd_client.compare_stats import summarize
from lossd_server.engine import InvalidInput
from lossd_server.engine import compare as cmp

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------- strategies
@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    v = draw(st.integers(1, 8))
    lead = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=2)))
    shape = (*lead, v)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.5, 3.0, 10.0]))
    ref = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    cand = ref + torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 5.0]))
    if draw(st.booleans()):  # ties: few distinct logit values
        ref, cand = ref.round(), cand.round()
    special = draw(st.sampled_from(["none", "none", "masked", "ref_only", "cand_only", "nan"]))
    if ref.numel() and special != "none":
        mask = torch.rand(shape, generator=g) < 0.3
        if special == "nan":
            ref = torch.where(mask & (torch.rand(shape, generator=g) < 0.3), math.nan, ref)
        else:
            if special in ("masked", "ref_only"):
                ref = ref.masked_fill(mask, -math.inf)
            if special in ("masked", "cand_only"):
                cand = cand.masked_fill(mask, -math.inf)
    case: dict[str, Any] = {
        "reference": ref.to(draw(st.sampled_from(FLOATS))),
        "candidate": cand.to(draw(st.sampled_from(FLOATS))),
        "target": None,
        "ignore_index": -100,
        "shift_targets": False,
    }
    if draw(st.integers(0, 3)) > 0:
        ignore_index = draw(st.sampled_from([-100, -1, 0, v - 1, v + 3]))
        target = torch.randint(0, v, lead, generator=g)
        if target.numel() and draw(st.booleans()):
            target = torch.where(torch.rand(lead, generator=g) < 0.3, ignore_index, target)
        case["target"] = target.to(draw(st.sampled_from([torch.int64, torch.int64, torch.int32])))
        case["ignore_index"] = ignore_index
        case["shift_targets"] = len(lead) > 0 and draw(st.booleans())
    return case


# ---------------------------------------------------------------------------- reference
def reference_values(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    ref = case["reference"].double()
    cand = case["candidate"].double()
    lr = torch.log_softmax(ref, -1)
    lc = torch.log_softmax(cand, -1)
    terms = F.kl_div(lc, lr, log_target=True, reduction="none")
    terms = terms.masked_fill(lr == -math.inf, 0.0)  # 0 log 0 = 0
    kl = terms.sum(-1)
    ra = np.argmax(ref.numpy(), axis=-1)
    ca = np.argmax(cand.numpy(), axis=-1)
    agree = torch.from_numpy(np.asarray(ra == ca))
    out = {"kl": kl, "argmax_agree": agree}
    lead = ref.shape[:-1]
    target = case["target"]
    if target is None:
        out["counted"] = torch.ones(lead, dtype=torch.bool)
    else:
        t = target.to(torch.int64)
        if case["shift_targets"]:
            t = torch.cat([t[..., 1:], torch.full((*lead[:-1], 1), case["ignore_index"])], -1) if t.shape[-1] else t
        counted = t != case["ignore_index"]
        tc = torch.where(counted, t, 0).unsqueeze(-1)
        p_ref = torch.softmax(ref, -1).gather(-1, tc).squeeze(-1) if ref.numel() else torch.zeros(lead, dtype=torch.float64)
        p_cand = torch.softmax(cand, -1).gather(-1, tc).squeeze(-1) if cand.numel() else torch.zeros(lead, dtype=torch.float64)
        out.update(
            counted=counted,
            p_ref=p_ref,
            p_cand=p_cand,
            delta_p=p_cand - p_ref,
            nll_ref=-lr.gather(-1, tc).squeeze(-1) if ref.numel() else torch.zeros(lead, dtype=torch.float64),
            nll_cand=-lc.gather(-1, tc).squeeze(-1) if cand.numel() else torch.zeros(lead, dtype=torch.float64),
        )
    counted = out["counted"]
    for name, value in out.items():
        if name != "counted":
            out[name] = torch.where(counted, value, torch.zeros((), dtype=value.dtype))
    return out


TOLERANCES = {
    "kl": (1e-5, 4e-7),
    "p_ref": (1e-6, 1e-7),
    "p_cand": (1e-6, 1e-7),
    "delta_p": (1e-6, 2e-7),
    "nll_ref": (1e-6, 4e-7),
    "nll_cand": (1e-6, 4e-7),
}


def assert_matches_reference(result: cmp.CompareResult, case: dict[str, Any]) -> None:
    expected = reference_values(case)
    float64 = torch.float64 in (case["reference"].dtype, case["candidate"].dtype)
    compute = torch.float64 if float64 else torch.float32
    lead = tuple(case["reference"].shape[:-1])
    assert torch.equal(result.counted, expected["counted"])
    assert torch.equal(result.argmax_agree, expected["argmax_agree"])
    names = ["kl"] + ([] if case["target"] is None else list(cmp.TARGET_OUTPUTS))
    for name in cmp.TARGET_OUTPUTS:
        assert (getattr(result, name) is None) == (case["target"] is None)
    for name in names:
        actual = getattr(result, name)
        assert actual.dtype == compute and tuple(actual.shape) == lead, name
        rtol, atol = (1e-10, 1e-12) if float64 else TOLERANCES[name]
        torch.testing.assert_close(actual.double(), expected[name], rtol=rtol, atol=atol, equal_nan=True, msg=name)


def assert_totals_are_sums_of_dense(result: cmp.CompareResult) -> None:
    t = result.totals
    mask = result.counted.reshape(-1)
    assert t.tokens == int(mask.sum())
    assert t.argmax_agree == int(result.argmax_agree.sum())
    kl = result.kl.reshape(-1).double()[mask]

    def close(a: float, b: torch.Tensor) -> None:
        """``a`` is a float64 sum of ``b`` in some order (the dense values rounded once more): within (n + 1) eps of the sum of |b|."""
        scale = math.fsum(b.abs().tolist())
        assert a == pytest.approx(math.fsum(b.tolist()), rel=0, abs=(b.numel() + 1) * 2.3e-16 * scale + 1e-300, nan_ok=True)

    close(t.sum_kl, kl)
    close(t.sum_kl2, kl * kl)
    if result.nll_ref is None:
        assert (t.sum_nll_ref, t.sum_nll_cand, t.sum_delta_p, t.sum_delta_p4) == (0.0, 0.0, 0.0, 0.0)
        return
    a = result.nll_ref.reshape(-1).double()[mask]
    b = result.nll_cand.reshape(-1).double()[mask]
    d = result.delta_p.reshape(-1).double()[mask]
    close(t.sum_nll_ref, a)
    close(t.sum_nll_ref2, a * a)
    close(t.sum_nll_cand, b)
    close(t.sum_nll_cand2, b * b)
    close(t.sum_nll_ref_nll_cand, a * b)
    close(t.sum_delta_p, d)
    close(t.sum_delta_p2, d * d)
    close(t.sum_delta_p4, d**4)


def run(case: dict[str, Any], **kwargs: Any) -> cmp.CompareResult:
    return cmp.compare(
        case["reference"],
        case["candidate"],
        case["target"],
        ignore_index=case["ignore_index"],
        shift_targets=case["shift_targets"],
        **kwargs,
    )


def assert_same_result(a: cmp.CompareResult, b: cmp.CompareResult) -> None:
    for name in ("kl", "argmax_agree", "counted", *cmp.TARGET_OUTPUTS):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert a.totals.tokens == b.totals.tokens and a.totals.argmax_agree == b.totals.argmax_agree
    assert_totals_close(a.totals, b.totals)


def assert_totals_close(a: cmp.CompareTotals, b: cmp.CompareTotals) -> None:
    """Equal up to float64 summation order: within 1e-12 of a bound on the sum of magnitudes
    (for a plain sum, sqrt(n * sum of squares) >= sum |x| by Cauchy-Schwarz)."""
    n = b.tokens
    scales = {
        "sum_kl": math.sqrt(n * b.sum_kl2),
        "sum_nll_ref": math.sqrt(n * b.sum_nll_ref2),
        "sum_nll_cand": math.sqrt(n * b.sum_nll_cand2),
        "sum_nll_ref_nll_cand": math.sqrt(b.sum_nll_ref2 * b.sum_nll_cand2),
        "sum_delta_p": math.sqrt(n * b.sum_delta_p2),
    }
    for f in dataclasses.fields(cmp.CompareTotals):
        if f.name in ("tokens", "argmax_agree"):
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not math.isfinite(y):
            assert x == y or (math.isnan(x) and math.isnan(y)), f.name
        else:
            assert abs(x - y) <= 1e-12 * scales.get(f.name, abs(y)) + 1e-300, f.name


# ---------------------------------------------------------------------------- properties
@SETTINGS
@given(cases())
def test_per_token_values_match_float64_torch(case: dict[str, Any]) -> None:
    before = (case["reference"].clone(), case["candidate"].clone())
    result = run(case)
    for x, y in zip(before, (case["reference"], case["candidate"]), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)  # inputs untouched
    assert_matches_reference(result, case)
    assert_totals_are_sums_of_dense(result)


@SETTINGS
@given(cases(), st.data())
def test_row_chunks_merged_equal_unchunked(case: dict[str, Any], data: st.DataObject) -> None:
    whole = run(case)
    assert_same_result(run(case, chunk_bytes=1), whole)  # one row per internal chunk
    plan = cmp.plan_compare(
        case["reference"].shape,
        case["reference"].dtype,
        case["candidate"].shape,
        case["candidate"].dtype,
        case["target"],
        ignore_index=case["ignore_index"],
        shift_targets=case["shift_targets"],
    )
    ref, cand = plan.row_view(case["reference"]), plan.row_view(case["candidate"])
    cuts = sorted(data.draw(st.lists(st.integers(0, plan.rows), max_size=4)))
    bounds = [0, *cuts, plan.rows]
    parts = [
        cmp.compare_rows(plan, ref[a:b], cand[a:b], a, chunk_bytes=data.draw(st.sampled_from([1, 100, 1 << 20])))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    assert_same_result(cmp.finish_compare(plan, cmp.merge_compare_partials(parts)), whole)
    # totals of separate requests combine to the totals of one
    combined = cmp.combine_totals([p.totals for p in parts])
    assert (combined.tokens, combined.argmax_agree) == (whole.totals.tokens, whole.totals.argmax_agree)
    assert_totals_close(combined, whole.totals)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 9), st.lists(st.integers(0, 3), max_size=2), st.sampled_from(FLOATS), st.integers(0, 2**31 - 1), st.data())
def test_top_k_ids_and_logprobs(v: int, lead: list[int], dtype: torch.dtype, seed: int, data: st.DataObject) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((*lead, v), generator=g, dtype=torch.float64) * 3
    kind = data.draw(st.sampled_from(["plain", "ties", "inf", "nan"]))
    if kind == "ties":
        x = x.round()
    elif kind in ("inf", "nan") and x.numel():
        x = torch.where(torch.rand(x.shape, generator=g) < 0.3, -math.inf if kind == "inf" else math.nan, x)
    x = x.to(dtype)
    k = data.draw(st.integers(0, v))
    out = cmp.top_k(x, k, max_k=v + 2, chunk_bytes=data.draw(st.sampled_from([1, 1 << 20])))
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.ids.shape == (*lead, k) and out.ids.dtype == torch.int64
    assert out.logprobs.shape == (*lead, k) and out.logprobs.dtype == compute
    # independent reference: Python's sort by (NaN first, value descending, id ascending)
    n = math.prod(lead)
    rows = x.double().reshape(n, v).tolist()
    expected = [sorted(range(v), key=lambda i, r=r: (not math.isnan(r[i]), -r[i] if not math.isnan(r[i]) else 0.0, i))[:k] for r in rows]
    assert out.ids.reshape(n, k).tolist() == expected
    lp = torch.log_softmax(x.double().reshape(n, v), 1)
    want = torch.gather(lp, 1, torch.tensor(expected, dtype=torch.int64).reshape(n, k))
    torch.testing.assert_close(out.logprobs.reshape(n, k).double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)


# ---------------------------------------------------------------------------- specific behaviour
def test_kl_of_a_model_with_itself_is_zero_and_reference_zeros_count_zero() -> None:
    ref = torch.tensor([[0.0, -math.inf, 1.0], [2.0, 2.0, -math.inf]])
    result = cmp.compare(ref, ref.clone(), torch.tensor([0, 1]))
    assert result.kl.tolist() == [0.0, 0.0]
    assert result.argmax_agree.tolist() == [True, True]
    # the candidate puts no mass where the reference has some: infinite KL; the reverse: finite
    cand = torch.tensor([[0.0, 0.0, -math.inf], [2.0, 2.0, 0.0]])
    result = cmp.compare(ref, cand)
    assert math.isinf(result.kl[0]) and math.isfinite(result.kl[1])


def test_argmax_ties_take_the_first_maximum() -> None:
    ref = torch.tensor([[1.0, 3.0, 3.0], [5.0, 5.0, 0.0]], dtype=torch.bfloat16)
    cand = torch.tensor([[1.0, 3.0, 2.0], [4.0, 5.0, 5.0]])
    assert cmp.compare(ref, cand).argmax_agree.tolist() == [True, False]


def test_shift_targets_scores_the_next_token_and_ignores_the_last() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 4, 6, generator=g)
    cand = torch.randn(2, 4, 6, generator=g)
    tokens = torch.randint(0, 6, (2, 4), generator=g)
    shifted = cmp.compare(ref, cand, tokens, shift_targets=True)
    plain = cmp.compare(ref[:, :-1], cand[:, :-1], tokens[:, 1:])
    assert shifted.counted[:, -1].tolist() == [False, False]
    torch.testing.assert_close(shifted.nll_cand[:, :-1], plain.nll_cand, rtol=0, atol=0)
    assert shifted.nll_cand[:, -1].tolist() == [0.0, 0.0] and shifted.kl[:, -1].tolist() == [0.0, 0.0]
    assert shifted.totals.tokens == 6


def test_half_logits_use_float32_accumulation() -> None:
    # 4096 equal logits: a float16 sum of the probabilities would not reach 1; the KL (1.75e-4) is
    # right to about float32's epsilon (a plain float32 log_softmax difference is 1e-6 off here)
    ref = torch.zeros(1, 4096, dtype=torch.float16)
    cand = torch.zeros(1, 4096, dtype=torch.bfloat16)
    cand[0, 0] = 1.0
    result = cmp.compare(ref, cand, torch.tensor([0]))
    assert result.kl.dtype == torch.float32
    lr = torch.log_softmax(ref.double(), 1)
    lc = torch.log_softmax(cand.double(), 1)
    expected = float((lr.exp() * (lr - lc)).sum())
    assert float(result.kl[0]) == pytest.approx(expected, rel=0, abs=1e-7)
    assert float(result.p_ref[0]) == pytest.approx(1 / 4096, rel=1e-6)


def test_summary_of_dense_outputs_agrees_with_the_totals() -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(3, 40, 30, generator=g) * 2
    cand = (ref + torch.randn(3, 40, 30, generator=g) * 0.3).to(torch.bfloat16)
    tokens = torch.randint(0, 30, (3, 40), generator=g)
    tokens[0, :5] = -100
    result = cmp.compare(ref, cand, tokens, shift_targets=True, chunk_bytes=1000)
    s = summarize(
        result.kl.numpy(),
        result.argmax_agree.numpy(),
        nll_ref=result.nll_ref.numpy(),
        nll_cand=result.nll_cand.numpy(),
        delta_p=result.delta_p.numpy(),
        counted=result.counted.numpy(),
    )
    t = result.totals
    n = t.tokens
    assert s.tokens == n
    assert s.kld.value == pytest.approx(t.sum_kl / n, rel=1e-12)
    assert s.kld.error == pytest.approx(math.sqrt((t.sum_kl2 / n - (t.sum_kl / n) ** 2) / (n - 1)), rel=1e-6)
    assert s.ppl_ref.value == pytest.approx(math.exp(t.sum_nll_ref / n), rel=1e-12)
    assert s.ppl_cand.value == pytest.approx(math.exp(t.sum_nll_cand / n), rel=1e-12)
    assert s.same_top_p.value == pytest.approx(t.argmax_agree / n, rel=1e-12)
    assert s.delta_p_rms.value == pytest.approx(math.sqrt(t.sum_delta_p2 / n), rel=1e-12)
    cov = (t.sum_nll_ref_nll_cand / n - (t.sum_nll_ref / n) * (t.sum_nll_cand / n)) / (n - 1)
    se_r = math.sqrt((t.sum_nll_ref2 / n - (t.sum_nll_ref / n) ** 2) / (n - 1))
    se_c = math.sqrt((t.sum_nll_cand2 / n - (t.sum_nll_cand / n) ** 2) / (n - 1))
    assert s.ln_ppl_correlation == pytest.approx(cov / (se_r * se_c), rel=1e-9)


# ---------------------------------------------------------------------------- bad input
def plan(ref_shape=(2, 3, 5), ref_dtype=torch.float32, cand_shape=(2, 3, 5), cand_dtype=torch.bfloat16, target=None, **kw):
    return cmp.plan_compare(ref_shape, ref_dtype, cand_shape, cand_dtype, target, **kw)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cand_shape": (2, 3, 6)}, "candidate"),  # different vocabularies
        ({"cand_shape": (2, 4, 5)}, "candidate"),  # shape mismatch
        ({"cand_shape": (6, 5)}, "candidate"),
        ({"ref_dtype": torch.int64}, "reference"),
        ({"cand_dtype": torch.int32}, "candidate"),
        ({"cand_dtype": torch.complex64}, "candidate"),
        ({"ref_dtype": torch.float8_e4m3fn}, "reference"),
        ({"ref_shape": (), "cand_shape": ()}, "reference"),
        ({"ref_shape": (2, 0), "cand_shape": (2, 0)}, "reference"),
        ({"target": torch.zeros(2, 4, dtype=torch.int64)}, "target"),  # wrong shape
        ({"target": torch.zeros(2, 3, 5, dtype=torch.int64)}, "target"),
        ({"target": torch.zeros(2, 3)}, "target"),  # float targets
        ({"target": torch.zeros(2, 3, dtype=torch.bool)}, "target"),
        ({"target": torch.tensor([[0, 1, 5], [0, 0, 0]])}, "target"),  # out of range
        ({"target": torch.tensor([[0, 1, -1], [0, 0, 0]])}, "target"),
        ({"target": torch.tensor([[0, 1, -1], [0, 0, 0]]), "ignore_index": -2}, "target"),
        ({"shift_targets": True}, "options.shift_targets"),  # nothing to shift
        ({"ref_shape": (5,), "cand_shape": (5,), "target": torch.tensor(1), "shift_targets": True}, "options.shift_targets"),
        ({"ignore_index": 1.5}, "options.ignore_index"),
    ],
)
def test_bad_input_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        plan(**kwargs)
    assert exc.value.field == field


def test_targets_equal_to_ignore_index_or_shifted_out_are_accepted() -> None:
    # out of range only in the position that the shift drops
    p = plan(target=torch.tensor([[9, 1, 2], [9, 0, 0]]), shift_targets=True)
    assert p.counted.tolist() == [True, True, False, True, True, False]
    p = plan(target=torch.tensor([[-1, 1, 2], [0, -1, 0]]), ignore_index=-1)
    assert p.counted.tolist() == [False, True, True, True, False, True]


def test_chunks_that_do_not_fit_are_rejected() -> None:
    p = plan()
    ref, cand = torch.zeros(6, 5), torch.zeros(6, 5, dtype=torch.bfloat16)
    for args, field in (
        ((ref[:, :4], cand[:, :4]), "reference"),
        ((ref, cand[:5]), "candidate"),
        ((ref.double(), cand), "reference"),
        ((ref, cand.float()), "candidate"),
    ):
        with pytest.raises(InvalidInput) as exc:
            cmp.compare_rows(p, *args)
        assert exc.value.field == field
    with pytest.raises(InvalidInput):
        cmp.compare_rows(p, ref[:2], cand[:2], 5)


@pytest.mark.parametrize(("k", "max_k", "v"), [(5, 4, 10), (11, 20, 10), (-1, 4, 10), (2.0, 4, 10), (True, 4, 10)])
def test_top_k_bounds(k: Any, max_k: int, v: int) -> None:
    with pytest.raises(InvalidInput) as exc:
        cmp.top_k(torch.zeros(2, v), k, max_k=max_k)
    assert exc.value.field == "options.top_k"
    with pytest.raises(InvalidInput) as exc:
        cmp.top_k(torch.zeros(2, v, dtype=torch.int64), 1, max_k=max_k)
    assert exc.value.field == "logits"
