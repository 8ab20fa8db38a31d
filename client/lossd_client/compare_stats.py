"""llama.cpp's ``llama-perplexity --kl-divergence`` summary from dense per-token values. numpy only.

Input: the dense per-token arrays of a comparison (``kl``, ``argmax_agree`` and, with targets,
``nll_ref``, ``nll_cand``, ``p_ref``, ``p_cand`` / ``delta_p``), any shape, and optionally the mask
of counted tokens; only counted tokens enter the statistics. "Q" is the candidate and "base" the
reference, as in llama.cpp (``tools/perplexity/perplexity.cpp``, function ``kl_divergence``); the
statistics and their order are llama.cpp's; the formulas are restated here (values in float64,
n = counted tokens, mean(x) = sum(x) / n)::

    se(x)      = sqrt(mean((x - mean(x))^2) / (n - 1))     standard error of a mean (nan for n < 2)
    cov(a, b)  = mean((a - mean(a)) * (b - mean(b))) / (n - 1)

    Mean PPL(Q)               = exp(mean(nll_cand))       ± PPL(Q) * se(nll_cand)          (delta method)
    Mean PPL(base)            = exp(mean(nll_ref))        ± PPL(base) * se(nll_ref)
    Cor(ln(PPL(Q)), ln(PPL(base))) = cov(nll_cand, nll_ref) / (se(nll_cand) * se(nll_ref))
                                                          (Pearson's r of the per-token NLLs)
    Mean ln(PPL(Q)/PPL(base)) = mean(nll_cand) - mean(nll_ref)
                                ± sqrt(se(nll_cand)^2 + se(nll_ref)^2 - 2 cov(nll_cand, nll_ref))
    Mean PPL(Q)/PPL(base)     = exp(ln ratio)             ± ratio * se(ln ratio)
    Mean PPL(Q)-PPL(base)     = PPL(Q) - PPL(base)
                                ± sqrt(u(Q)^2 + u(base)^2 - 2 PPL(Q) PPL(base) cov(nll_cand, nll_ref))
    Mean KLD                  = mean(kl)                  ± se(kl)
    Mean Δp                   = mean(Δp)                  ± se(Δp)          Δp = p_cand - p_ref
    RMS Δp                    = sqrt(mean(Δp^2))          ± se(Δp^2) / (2 RMS)
    Same top p                = f = mean(argmax_agree)    ± sqrt(f (1 - f) / (n - 1))

The standard errors are llama.cpp's ``sqrt((sum(x^2)/n - mean^2) / (n - 1))`` (its
``mean_and_uncertainty``) and its ``covariance``, computed with centred (two-pass) sums, which
are mathematically equal and do not cancel catastrophically; the uncertainty of the log-ratio is
computed as se(nll_cand - nll_ref), which equals the expression above exactly in real arithmetic.
Differences from llama.cpp, on purpose: llama.cpp reports 0 uncertainty below 11 tokens and a 0
covariance below 10 and prints nothing below 100 tokens; here the uncertainties are defined from
n = 2 (nan below; a negative rounded variance counts as 0, as in llama.cpp) and the summary is
always produced (nan for what an empty set cannot give).

Percentiles (KLD: max, 99.9, 99, 95, 90, median, 10, 5, 1, 0.1, min; Δp additionally 75 and 25,
as llama.cpp prints them) are numpy's default linear interpolation on the sorted values
(``np.quantile(x, q)``: position q (n - 1), interpolated between its two neighbours; the median is
the mean of the two middle values for even n). That is llama.cpp's formula too, but llama.cpp
evaluates it in float32 (fractions such as 0.999f, the position and the interpolation), so its
digits can differ beyond float32 precision.

The llama.cpp table prints PPL, KLD and Δp values with its format widths, Δp and "same top p" in
percent; :func:`format_table` reproduces it (with a first line giving the token count), and
:meth:`CompareSummary.to_dict` gives the same numbers (fractions, not percent) for ``--json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .types import exact_sum, exp

#: (label, fraction) of the KLD percentiles, in llama.cpp's order; 1 is the maximum, 0 the minimum.
KLD_PERCENTILES = (
    ("Maximum", 1.0),
    ("99.9%", 0.999),
    ("99.0%", 0.99),
    ("95.0%", 0.95),
    ("90.0%", 0.90),
    ("Median", 0.5),
    ("10.0%", 0.10),
    (" 5.0%", 0.05),
    (" 1.0%", 0.01),
    (" 0.1%", 0.001),
    ("Minimum", 0.0),
)
#: Likewise for Δp (llama.cpp adds the quartiles there).
DELTA_P_PERCENTILES = (
    ("Maximum", 1.0),
    ("99.9%", 0.999),
    ("99.0%", 0.99),
    ("95.0%", 0.95),
    ("90.0%", 0.90),
    ("75.0%", 0.75),
    ("Median", 0.5),
    ("25.0%", 0.25),
    ("10.0%", 0.10),
    (" 5.0%", 0.05),
    (" 1.0%", 0.01),
    (" 0.1%", 0.001),
    ("Minimum", 0.0),
)


@dataclass(frozen=True)
class Estimate:
    """A value and its standard uncertainty (nan where it is undefined)."""

    value: float
    error: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "error": self.error}


@dataclass(frozen=True)
class CompareSummary:
    """Every statistic of ``llama-perplexity --kl-divergence``, in its order (see the module docstring).

    The perplexity and Δp statistics need targets and are None without them. Percentiles are
    ``((fraction, value), ...)`` in llama.cpp's order (fraction 1 = maximum, 0.5 = median, 0 = minimum).
    """

    tokens: int
    ppl_cand: Estimate | None
    ppl_ref: Estimate | None
    ln_ppl_correlation: float | None
    ln_ppl_ratio: Estimate | None
    ppl_ratio: Estimate | None
    ppl_diff: Estimate | None
    kld: Estimate
    kld_percentiles: tuple[tuple[float, float], ...]
    delta_p: Estimate | None
    delta_p_percentiles: tuple[tuple[float, float], ...] | None
    delta_p_rms: Estimate | None
    same_top_p: Estimate

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types for ``json.dumps`` (non-finite floats stay floats: NaN / Infinity)."""

        def est(e: Estimate | None) -> dict[str, float] | None:
            return None if e is None else e.to_dict()

        def pct(values: tuple[tuple[float, float], ...] | None) -> dict[str, float] | None:
            if values is None:
                return None
            return {_percentile_key(q): v for q, v in values}

        return {
            "tokens": self.tokens,
            "ppl_cand": est(self.ppl_cand),
            "ppl_ref": est(self.ppl_ref),
            "ln_ppl_correlation": self.ln_ppl_correlation,
            "ln_ppl_ratio": est(self.ln_ppl_ratio),
            "ppl_ratio": est(self.ppl_ratio),
            "ppl_diff": est(self.ppl_diff),
            "kld": est(self.kld),
            "kld_percentiles": pct(self.kld_percentiles),
            "delta_p": est(self.delta_p),
            "delta_p_percentiles": pct(self.delta_p_percentiles),
            "delta_p_rms": est(self.delta_p_rms),
            "same_top_p": est(self.same_top_p),
        }


def _percentile_key(q: float) -> str:
    if q == 1.0:
        return "max"
    if q == 0.0:
        return "min"
    if q == 0.5:
        return "median"
    return f"{100 * q:g}"


# ---------------------------------------------------------------------------- totals
@dataclass(frozen=True)
class CompareTotals:
    """float64 totals over counted tokens (``CompareResponse.totals``, field for field); add them
    up (:func:`combine_totals`) to combine requests, shards or replicas.

    Without targets the nll and delta_p sums are 0.
    """

    #: Counted tokens, and those whose argmax agree.
    tokens: int = 0
    argmax_agree: int = 0
    #: Σ kl, Σ kl².
    sum_kl: float = 0.0
    sum_kl2: float = 0.0
    #: Σ nll_ref, Σ nll_ref², Σ nll_cand, Σ nll_cand², Σ nll_ref nll_cand.
    sum_nll_ref: float = 0.0
    sum_nll_ref2: float = 0.0
    sum_nll_cand: float = 0.0
    sum_nll_cand2: float = 0.0
    sum_nll_ref_nll_cand: float = 0.0
    #: Σ Δp, Σ Δp², Σ Δp⁴.
    sum_delta_p: float = 0.0
    sum_delta_p2: float = 0.0
    sum_delta_p4: float = 0.0


def combine_totals(parts: Sequence[CompareTotals]) -> CompareTotals:
    """Field-wise sum (integers exactly, floats exactly rounded: types.exact_sum)."""
    values = {}
    for f in fields(CompareTotals):
        column = [getattr(p, f.name) for p in parts]
        values[f.name] = sum(column) if f.type == "int" else exact_sum(column)
    return CompareTotals(**values)


# ---------------------------------------------------------------------------- formulas
def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else math.nan


def standard_error(x: np.ndarray) -> float:
    """sqrt(mean((x - mean)^2) / (n - 1)): the standard error of the mean; nan for n < 2."""
    n = x.size
    if n < 2:
        return math.nan
    var = float(np.mean((x - np.mean(x)) ** 2))
    return math.sqrt(max(var, 0.0) / (n - 1))


def covariance_of_means(a: np.ndarray, b: np.ndarray) -> float:
    """mean((a - mean a)(b - mean b)) / (n - 1): the covariance of the two means; nan for n < 2."""
    n = a.size
    if n < 2:
        return math.nan
    return float(np.mean((a - np.mean(a)) * (b - np.mean(b)))) / (n - 1)


def percentiles(x: np.ndarray, table: tuple[tuple[str, float], ...]) -> tuple[tuple[float, float], ...]:
    """numpy's linear interpolation at each fraction of ``table`` (nan for no values)."""
    if x.size == 0:
        return tuple((q, math.nan) for _, q in table)
    values = np.quantile(x, [q for _, q in table], method="linear")
    return tuple((q, float(v)) for (_, q), v in zip(table, values, strict=True))


def _counted(values: Any, mask: np.ndarray | None, name: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, kl has {shape}")
    arr = arr.astype(np.float64).reshape(-1)
    return arr if mask is None else arr[mask]


def summarize(
    kl: Any,
    argmax_agree: Any,
    *,
    nll_ref: Any = None,
    nll_cand: Any = None,
    p_ref: Any = None,
    p_cand: Any = None,
    delta_p: Any = None,
    counted: Any = None,
) -> CompareSummary:
    """The llama.cpp summary of the counted tokens (all of them when ``counted`` is None).

    Every array has ``kl``'s shape. Perplexity statistics need ``nll_ref`` and ``nll_cand``. Δp is
    ``delta_p`` when given, else ``p_cand - p_ref``, else ``exp(-nll_cand) - exp(-nll_ref)`` (as
    llama.cpp derives it), computed in float64.
    """
    kl_arr = np.asarray(kl)
    shape = kl_arr.shape
    mask = _mask(counted, shape)
    kl_v = _counted(kl_arr, mask, "kl", shape)
    agree = _counted(argmax_agree, mask, "argmax_agree", shape)
    n = kl_v.size
    if (nll_ref is None) != (nll_cand is None):
        raise ValueError("nll_ref and nll_cand go together")
    if (p_ref is None) != (p_cand is None):
        raise ValueError("p_ref and p_cand go together")

    f = _mean(agree)
    same_top = Estimate(f, math.sqrt(f * (1.0 - f) / (n - 1)) if n >= 2 else math.nan)
    ppl: dict[str, Any] = dict.fromkeys(("ppl_cand", "ppl_ref", "ln_ppl_correlation", "ln_ppl_ratio", "ppl_ratio", "ppl_diff"))
    if nll_ref is not None:
        ppl = _perplexity_statistics(_counted(nll_cand, mask, "nll_cand", shape), _counted(nll_ref, mask, "nll_ref", shape))
    if delta_p is not None:
        dp = _counted(delta_p, mask, "delta_p", shape)
    elif p_ref is not None:
        dp = _counted(p_cand, mask, "p_cand", shape) - _counted(p_ref, mask, "p_ref", shape)
    elif nll_ref is not None:
        dp = np.exp(-_counted(nll_cand, mask, "nll_cand", shape)) - np.exp(-_counted(nll_ref, mask, "nll_ref", shape))
    else:
        dp = None
    return CompareSummary(
        tokens=n,
        **ppl,
        kld=Estimate(_mean(kl_v), standard_error(kl_v)),
        kld_percentiles=percentiles(kl_v, KLD_PERCENTILES),
        **_delta_p_statistics(dp, n),
        same_top_p=same_top,
    )


def _mask(counted: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """The flat boolean mask of counted tokens (None: all of them)."""
    if counted is None:
        return None
    mask = np.asarray(counted)
    if mask.shape != shape:
        raise ValueError(f"counted has shape {mask.shape}, kl has {shape}")
    return mask.astype(bool).reshape(-1)


def _perplexity_statistics(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """The perplexity fields of CompareSummary from the counted NLLs of Q (``a``) and base (``b``)."""
    se_a, se_b = standard_error(a), standard_error(b)
    cov = covariance_of_means(a, b)
    ppl_cand = Estimate(exp(_mean(a)), exp(_mean(a)) * se_a)
    ppl_ref = Estimate(exp(_mean(b)), exp(_mean(b)) * se_b)
    ln_value = _mean(a) - _mean(b)
    ln_ratio = Estimate(ln_value, standard_error(a - b))
    var_diff = ppl_cand.error**2 + ppl_ref.error**2 - 2.0 * ppl_cand.value * ppl_ref.value * cov
    return {
        "ppl_cand": ppl_cand,
        "ppl_ref": ppl_ref,
        "ln_ppl_correlation": cov / (se_a * se_b) if se_a > 0 and se_b > 0 else math.nan,
        "ln_ppl_ratio": ln_ratio,
        "ppl_ratio": Estimate(exp(ln_value), exp(ln_value) * ln_ratio.error),
        "ppl_diff": Estimate(ppl_cand.value - ppl_ref.value, math.sqrt(max(var_diff, 0.0)) if not math.isnan(var_diff) else math.nan),
    }


def _delta_p_statistics(dp: np.ndarray | None, n: int) -> dict[str, Any]:
    """The Δp fields of CompareSummary (None without Δp)."""
    if dp is None:
        return {"delta_p": None, "delta_p_percentiles": None, "delta_p_rms": None}
    dp2 = dp * dp
    rms = math.sqrt(_mean(dp2)) if n else math.nan
    return {
        "delta_p": Estimate(_mean(dp), standard_error(dp)),
        "delta_p_percentiles": percentiles(dp, DELTA_P_PERCENTILES),
        "delta_p_rms": Estimate(rms, 0.5 / rms * standard_error(dp2) if rms > 0 else math.nan),
    }


# ---------------------------------------------------------------------------- table
def format_table(summary: CompareSummary) -> str:
    """The statistics block llama-perplexity prints after a ``--kl-divergence`` run (same labels,
    order and number formats), preceded by the number of tokens compared. Without targets the
    perplexity and Δp lines are left out; "Same top p" is always printed."""
    s = summary
    lines = [f"Tokens compared: {s.tokens}", ""]
    if s.ppl_cand is not None:
        lines += [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {s.ppl_cand.value:10.6f} ± {s.ppl_cand.error:10.6f}",
            f"Mean PPL(base)                : {s.ppl_ref.value:10.6f} ± {s.ppl_ref.error:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100.0 * s.ln_ppl_correlation:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {s.ln_ppl_ratio.value:10.6f} ± {s.ln_ppl_ratio.error:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {s.ppl_ratio.value:10.6f} ± {s.ppl_ratio.error:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {s.ppl_diff.value:10.6f} ± {s.ppl_diff.error:10.6f}",
            "",
        ]
    lines += ["====== KL divergence statistics ======", f"Mean    KLD: {s.kld.value:10.6f} ± {s.kld.error:10.6f}"]
    for (label, _), (_, value) in zip(KLD_PERCENTILES, s.kld_percentiles, strict=True):
        lines.append(f"{label:<7} KLD: {value:10.6f}")
    lines += ["", "====== Token probability statistics ======"]
    if s.delta_p is not None:
        lines.append(f"Mean    Δp: {100.0 * s.delta_p.value:6.3f} ± {100.0 * s.delta_p.error:5.3f} %")
        for (label, _), (_, value) in zip(DELTA_P_PERCENTILES, s.delta_p_percentiles, strict=True):
            lines.append(f"{label:<7} Δp: {100.0 * value:6.3f}%")
        lines.append(f"RMS Δp    : {100.0 * s.delta_p_rms.value:6.3f} ± {100.0 * s.delta_p_rms.error:5.3f} %")
    lines.append(f"Same top p: {100.0 * s.same_top_p.value:6.3f} ± {100.0 * s.same_top_p.error:5.3f} %")
    return "\n".join(lines) + "\n"
