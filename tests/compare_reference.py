"""Plain numpy computations of llama.cpp's ``--kl-divergence`` statistics, written out term for term,
to check lossd_client.compare_stats against (tests/unit/test_compare_stats.py) and the summaries a
real server's comparisons come with (tests/service/test_compare.py).

The reference follows llama.cpp's ``kl_divergence`` (tools/perplexity/perplexity.cpp) term for term
with plain sums (sum x, sum x^2, sum a*b over n tokens), except for its small-n cut-offs; the
percentiles are the linear interpolation written out by hand.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from lossd_client import compare_stats as cs


def mean_and_uncertainty(s: float, s2: float, n: int) -> tuple[float, float]:
    f = s / n
    var = s2 / n - f * f
    return f, (math.sqrt(max(var, 0.0) / (n - 1)) if n >= 2 else math.nan)


def covariance(sa: float, sb: float, sab: float, n: int) -> float:
    return (sab / n - (sa / n) * (sb / n)) / (n - 1)


def interpolated(values: np.ndarray, q: float) -> float:
    v = sorted(values.tolist())
    pos = q * (len(v) - 1)
    i = int(math.floor(pos))
    frac = pos - i
    j = min(i + 1, len(v) - 1)
    return v[i] + frac * (v[j] - v[i])


def reference_summary(kl, agree, nll_ref, nll_cand, dp) -> dict[str, Any]:
    n = len(kl)
    out: dict[str, Any] = {"tokens": n}
    out["kld"] = mean_and_uncertainty(kl.sum(), (kl * kl).sum(), n)
    f = agree.sum() / n
    out["same_top_p"] = (f, math.sqrt(f * (1 - f) / (n - 1)))
    out["kld_percentiles"] = [interpolated(kl, q) for _, q in cs.KLD_PERCENTILES]
    if nll_ref is not None:
        lq, uq = mean_and_uncertainty(nll_cand.sum(), (nll_cand**2).sum(), n)
        lb, ub = mean_and_uncertainty(nll_ref.sum(), (nll_ref**2).sum(), n)
        cov = covariance(nll_cand.sum(), nll_ref.sum(), (nll_cand * nll_ref).sum(), n)
        ppl_q, ppl_b = math.exp(lq), math.exp(lb)
        out["ppl_cand"] = (ppl_q, ppl_q * uq)
        out["ppl_ref"] = (ppl_b, ppl_b * ub)
        out["ln_ppl_correlation"] = cov / (uq * ub)
        ln_unc = math.sqrt(max(uq * uq + ub * ub - 2 * cov, 0.0))
        out["ln_ppl_ratio"] = (lq - lb, ln_unc)
        out["ppl_ratio"] = (math.exp(lq - lb), math.exp(lq - lb) * ln_unc)
        u_q, u_b = ppl_q * uq, ppl_b * ub
        out["ppl_diff"] = (ppl_q - ppl_b, math.sqrt(max(u_q * u_q + u_b * u_b - 2 * ppl_q * ppl_b * cov, 0.0)))
    if dp is not None:
        out["delta_p"] = mean_and_uncertainty(dp.sum(), (dp * dp).sum(), n)
        mse, mse_unc = mean_and_uncertainty((dp * dp).sum(), (dp**4).sum(), n)
        rms = math.sqrt(mse)
        out["delta_p_rms"] = (rms, 0.5 / rms * mse_unc)
        out["delta_p_percentiles"] = [interpolated(dp, q) for _, q in cs.DELTA_P_PERCENTILES]
    return out


def close(actual: float, expected: float, rel: float = 1e-9, abs_: float = 1e-12) -> None:
    assert actual == pytest.approx(expected, rel=rel, abs=abs_, nan_ok=True)


def assert_summary_matches(s: cs.CompareSummary, ref: dict[str, Any]) -> None:
    """Every statistic of ``s`` equals the reference's (uncertainties: the sums-of-squares form
    loses digits to cancellation; 1e-6 is ample)."""
    assert s.tokens == ref["tokens"]
    names = ["kld", "same_top_p"]
    if "ppl_cand" in ref:
        names += ["ppl_cand", "ppl_ref", "ppl_ratio", "ln_ppl_ratio", "ppl_diff"]
        close(s.ln_ppl_correlation, ref["ln_ppl_correlation"], rel=1e-6)
    if "delta_p" in ref:
        names += ["delta_p", "delta_p_rms"]
        for (q, value), expected, (_, fraction) in zip(
            s.delta_p_percentiles, ref["delta_p_percentiles"], cs.DELTA_P_PERCENTILES, strict=True
        ):
            assert q == fraction
            close(value, expected, rel=1e-12, abs_=1e-18)
    for name in names:
        est = getattr(s, name)
        close(est.value, ref[name][0])
        close(est.error, ref[name][1], rel=1e-6, abs_=1e-12)
    for (q, value), expected, (_, fraction) in zip(s.kld_percentiles, ref["kld_percentiles"], cs.KLD_PERCENTILES, strict=True):
        assert q == fraction
        close(value, expected, rel=1e-12, abs_=0.0)


#: The labels of llama.cpp's table, in its order.
LLAMA_CPP_LABELS = [
    "Mean PPL(Q)                   :",
    "Mean PPL(base)                :",
    "Cor(ln(PPL(Q)), ln(PPL(base))):",
    "Mean ln(PPL(Q)/PPL(base))     :",
    "Mean PPL(Q)/PPL(base)         :",
    "Mean PPL(Q)-PPL(base)         :",
    "Mean    KLD:",
    "Maximum KLD:",
    "99.9%   KLD:",
    "99.0%   KLD:",
    "95.0%   KLD:",
    "90.0%   KLD:",
    "Median  KLD:",
    "10.0%   KLD:",
    " 5.0%   KLD:",
    " 1.0%   KLD:",
    " 0.1%   KLD:",
    "Minimum KLD:",
    "Mean    Δp:",
    "Maximum Δp:",
    "99.9%   Δp:",
    "99.0%   Δp:",
    "95.0%   Δp:",
    "90.0%   Δp:",
    "75.0%   Δp:",
    "Median  Δp:",
    "25.0%   Δp:",
    "10.0%   Δp:",
    " 5.0%   Δp:",
    " 1.0%   Δp:",
    " 0.1%   Δp:",
    "Minimum Δp:",
    "RMS Δp    :",
    "Same top p:",
]
