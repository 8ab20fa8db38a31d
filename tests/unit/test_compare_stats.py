"""lossd_client.compare_stats against plain numpy computations of the same formulas, written out in
tests/compare_reference.py (llama.cpp's ``kl_divergence`` term for term, with plain sums)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from compare_reference import LLAMA_CPP_LABELS, assert_summary_matches, close, reference_summary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lossd_client import compare_stats as cs

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------- data
@st.composite
def dense(draw: st.DrawFn) -> dict[str, Any]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.sampled_from([(40,), (3, 17), (2, 5, 30), (300,)]))
    nll_ref = rng.gamma(2.0, 1.5, shape)
    noise = draw(st.sampled_from([0.01, 0.3, 2.0]))
    nll_cand = np.abs(nll_ref + rng.normal(0, noise, shape))
    data: dict[str, Any] = {
        "kl": rng.exponential(draw(st.sampled_from([1e-4, 0.01, 1.0])), shape).astype(np.float32),
        "argmax_agree": rng.random(shape) < draw(st.sampled_from([0.2, 0.9])),
        "nll_ref": nll_ref.astype(np.float32),
        "nll_cand": nll_cand.astype(np.float32),
    }
    data["p_ref"] = np.exp(-data["nll_ref"].astype(np.float64)).astype(np.float32)
    data["p_cand"] = np.exp(-data["nll_cand"].astype(np.float64)).astype(np.float32)
    data["delta_p"] = (data["p_cand"].astype(np.float64) - data["p_ref"]).astype(np.float32)
    counted = rng.random(shape) < 0.85
    counted.reshape(-1)[:12] = True  # at least 12 counted tokens
    data["counted"] = counted if draw(st.booleans()) else None
    return data


def masked(data: dict[str, Any], name: str) -> np.ndarray:
    values = np.asarray(data[name]).astype(np.float64).reshape(-1)
    return values if data["counted"] is None else values[data["counted"].reshape(-1)]


# ---------------------------------------------------------------------------- properties
@SETTINGS
@given(dense(), st.sampled_from(["delta_p", "p", "nll"]))
def test_every_statistic_matches_the_written_out_formulas(data: dict[str, Any], dp_source: str) -> None:
    kwargs = {k: data[k] for k in ("nll_ref", "nll_cand", "counted")}
    if dp_source == "delta_p":
        kwargs["delta_p"] = data["delta_p"]
        dp = masked(data, "delta_p")
    elif dp_source == "p":
        kwargs.update(p_ref=data["p_ref"], p_cand=data["p_cand"])
        dp = masked(data, "p_cand") - masked(data, "p_ref")
    else:
        dp = np.exp(-masked(data, "nll_cand")) - np.exp(-masked(data, "nll_ref"))
    s = cs.summarize(data["kl"], data["argmax_agree"], **kwargs)
    ref = reference_summary(masked(data, "kl"), masked(data, "argmax_agree"), masked(data, "nll_ref"), masked(data, "nll_cand"), dp)
    assert_summary_matches(s, ref)
    kl = masked(data, "kl")
    assert dict(s.kld_percentiles)[1.0] == kl.max() and dict(s.kld_percentiles)[0.0] == kl.min()
    close(dict(s.kld_percentiles)[0.5], float(np.median(kl)), rel=1e-15, abs_=0.0)


@SETTINGS
@given(dense())
def test_without_targets_only_kld_and_same_top_p(data: dict[str, Any]) -> None:
    s = cs.summarize(data["kl"], data["argmax_agree"], counted=data["counted"])
    assert s.ppl_cand is s.ppl_ref is s.ln_ppl_ratio is s.ppl_ratio is s.ppl_diff is s.ln_ppl_correlation is None
    assert s.delta_p is s.delta_p_percentiles is s.delta_p_rms is None
    ref = reference_summary(masked(data, "kl"), masked(data, "argmax_agree"), None, None, None)
    close(s.kld.value, ref["kld"][0])
    close(s.kld.error, ref["kld"][1], rel=1e-6)
    close(s.same_top_p.value, ref["same_top_p"][0])
    close(s.same_top_p.error, ref["same_top_p"][1])
    table = cs.format_table(s)
    assert "Perplexity statistics" not in table and "Δp" not in table and "Same top p" in table


# ---------------------------------------------------------------------------- table and dict


def example_summary() -> cs.CompareSummary:
    rng = np.random.default_rng(7)
    nll_ref = rng.gamma(2.0, 1.5, 500)
    nll_cand = np.abs(nll_ref + rng.normal(0, 0.2, 500))
    return cs.summarize(
        rng.exponential(0.01, 500),
        rng.random(500) < 0.9,
        nll_ref=nll_ref,
        nll_cand=nll_cand,
        p_ref=np.exp(-nll_ref),
        p_cand=np.exp(-nll_cand),
    )


def test_table_has_llama_cpp_labels_order_and_numbers() -> None:
    s = example_summary()
    table = cs.format_table(s)
    lines = [line for line in table.splitlines() if ":" in line and not line.startswith("Tokens")]
    assert [line[: len(label)] for line, label in zip(lines, LLAMA_CPP_LABELS, strict=True)] == LLAMA_CPP_LABELS
    assert table.splitlines()[0] == "Tokens compared: 500"
    numbers = {label: line[len(label) :] for line, label in zip(lines, LLAMA_CPP_LABELS, strict=True)}

    def parse(text: str) -> list[float]:
        return [float(part.strip().rstrip("%").strip()) for part in text.split("±")]

    assert parse(numbers["Mean PPL(Q)                   :"]) == pytest.approx([s.ppl_cand.value, s.ppl_cand.error], abs=1e-6)
    assert parse(numbers["Mean PPL(base)                :"]) == pytest.approx([s.ppl_ref.value, s.ppl_ref.error], abs=1e-6)
    assert parse(numbers["Cor(ln(PPL(Q)), ln(PPL(base))):"]) == pytest.approx([100 * s.ln_ppl_correlation], abs=0.005)
    assert parse(numbers["Mean PPL(Q)-PPL(base)         :"]) == pytest.approx([s.ppl_diff.value, s.ppl_diff.error], abs=1e-6)
    assert parse(numbers["Mean    KLD:"]) == pytest.approx([s.kld.value, s.kld.error], abs=1e-6)
    assert parse(numbers["99.9%   KLD:"]) == pytest.approx([dict(s.kld_percentiles)[0.999]], abs=1e-6)
    assert parse(numbers["Mean    Δp:"]) == pytest.approx([100 * s.delta_p.value, 100 * s.delta_p.error], abs=1e-3)
    assert parse(numbers["25.0%   Δp:"]) == pytest.approx([100 * dict(s.delta_p_percentiles)[0.25]], abs=1e-3)
    assert parse(numbers["RMS Δp    :"]) == pytest.approx([100 * s.delta_p_rms.value, 100 * s.delta_p_rms.error], abs=1e-3)
    assert parse(numbers["Same top p:"]) == pytest.approx([100 * s.same_top_p.value, 100 * s.same_top_p.error], abs=1e-3)


def test_to_dict_round_trips_through_json() -> None:
    s = example_summary()
    d = json.loads(json.dumps(s.to_dict()))
    assert d["tokens"] == 500
    assert d["kld"] == {"value": s.kld.value, "error": s.kld.error}
    assert d["ppl_ratio"]["value"] == s.ppl_ratio.value
    assert list(d["kld_percentiles"]) == ["max", "99.9", "99", "95", "90", "median", "10", "5", "1", "0.1", "min"]
    assert list(d["delta_p_percentiles"]) == ["max", "99.9", "99", "95", "90", "75", "median", "25", "10", "5", "1", "0.1", "min"]
    assert d["delta_p_percentiles"]["median"] == dict(s.delta_p_percentiles)[0.5]
    assert d["ln_ppl_correlation"] == s.ln_ppl_correlation


# ---------------------------------------------------------------------------- edges and bad input
def test_few_tokens_give_nan_uncertainties_and_no_tokens_nan_values() -> None:
    one = cs.summarize(np.array([0.5]), np.array([True]), nll_ref=np.array([1.0]), nll_cand=np.array([2.0]))
    assert one.kld.value == 0.5 and math.isnan(one.kld.error)
    assert one.ppl_cand.value == pytest.approx(math.e**2) and math.isnan(one.ppl_cand.error)
    none = cs.summarize(np.zeros(3), np.zeros(3, bool), counted=np.zeros(3, bool))
    assert none.tokens == 0 and math.isnan(none.kld.value) and math.isnan(none.same_top_p.value)
    assert all(math.isnan(v) for _, v in none.kld_percentiles)
    cs.format_table(none)  # prints nan, does not raise
    constant = cs.summarize(np.full(20, 0.25), np.ones(20, bool))
    assert constant.kld.error == 0.0 and constant.same_top_p.error == 0.0


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        cs.summarize(np.zeros(3), np.zeros(4, bool))
    with pytest.raises(ValueError):
        cs.summarize(np.zeros(3), np.zeros(3, bool), nll_ref=np.zeros(3))
    with pytest.raises(ValueError):
        cs.summarize(np.zeros(3), np.zeros(3, bool), p_cand=np.zeros(3))
    with pytest.raises(ValueError):
        cs.summarize(np.zeros(3), np.zeros(3, bool), counted=np.zeros(2, bool))


def test_module_does_not_import_torch() -> None:
    code = "import sys, lossd_client.compare_stats as m; m.summarize([0.1, 0.2], [True, False]); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
