"""Token-by-token comparison of two models' logits (reference and candidate). Pure torch.

Both logit tensors have the same shape ``(..., V)`` with the class (vocabulary) axis last:
``(N, V)`` or ``(B, T, V)`` in practice; a token is one position of the leading shape
(``token_shape = shape[:-1]``), a *row* one token's V logits in the flattened ``(rows, V)`` view.
Per token, with ``lr = log_softmax(reference)``, ``lc = log_softmax(candidate)`` and
``p_r = exp(lr)``::

    kl           = sum_v p_r[v] * (lr[v] - lc[v])   KL(reference || candidate), terms with p_r[v] = 0 count 0
    argmax_agree = argmax(reference) == argmax(candidate)   (first maximum on ties, NaN counts as the maximum, as torch.argmax)

and, with class-index targets ``y`` (optionally shifted causally: position t is scored against
target t+1 along the last target axis, the last position ignored, as Hugging Face's
ForCausalLMLoss)::

    nll_ref  = -lr[y]          nll_cand = -lc[y]
    p_ref    = exp(lr[y])      p_cand   = exp(lc[y])       delta_p = p_cand - p_ref

Positions whose (shifted) target is ``ignore_index`` are not counted: they hold 0 (False) in
every dense output and are left out of the totals. Without targets every position is counted.

Everything is computed in the compute dtype (float64 when either model's logits are float64,
else float32, half / bfloat16 upcast exactly chunk by chunk), with the per-token scalars in
float64: log_softmax is taken apart as ``y = x - max(x)`` (float32), ``s = sum(exp(y))`` (summed
in float64) and ``log_softmax = y - log(s)``. The KL is evaluated without the cancellation a
plain float32 ``sum p (lr - lc)`` suffers (whose error is about eps32 * |log p|, 1e-6 for 30k
classes): ``lr - lc = d - D`` with ``d = y_r - y_c`` and ``D = log(s_r) - log(s_c)``, centred on
``c = sum_v p_r d``, so ``kl = sum_v p_r (d - c) + (c - D)``; both parts are as small as the KL
itself and its absolute error is about float32's epsilon (~1e-7; the float32 exponentials are
the floor). The target outputs are gathered from ``y`` and finished in float64 (``nll = log(s) -
y[target]``, ``p = exp(-nll)``, ``delta_p`` the float64 difference), then stored in the compute
dtype. A reference probability that underflows the compute dtype (below ~1e-45 in float32)
counts as 0.

The float64 :class:`~lossd_client.compare_stats.CompareTotals` (sums, sums of squares and cross
products over counted tokens; defined in the client, which shares them) combine across row
chunks, requests, shards and replicas by addition (:func:`~lossd_client.compare_stats.combine_totals`);
:mod:`lossd_client.compare_stats` turns dense values into llama.cpp's ``--kl-divergence`` summary. :func:`compare_rows` evaluates any row range of both tensors, so a
caller can stream them in bounded chunks; :func:`merge_compare_partials` joins consecutive ranges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from lossd_client.compare_stats import CompareTotals, combine_totals

from ._exact import FLOAT_DTYPES, dtype_name, itemsize, to_compute
from .scratch import sum64, temporary, upcast
from .spec import DEFAULT_CHUNK_BYTES, InvalidDtype, InvalidInput, LossSpec
from .validate import _resolve_targets as resolve_targets

#: Class-index target dtypes accepted (converted to int64).
TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

#: Names of the dense per-token outputs that exist only with targets.
TARGET_OUTPUTS = ("p_ref", "p_cand", "delta_p", "nll_ref", "nll_cand")


@dataclass(frozen=True, eq=False)
class ComparePlan:
    """A validated comparison: shapes, dtypes and the (shifted) targets; not the logits."""

    shape: tuple[int, ...]
    reference_dtype: torch.dtype
    candidate_dtype: torch.dtype
    vocab: int
    token_shape: tuple[int, ...]
    rows: int
    #: float64 when either model's logits are float64, else float32.
    compute_dtype: torch.dtype
    ignore_index: int
    shift_targets: bool
    #: (rows,) int64 targets after the shift (ignored positions hold ignore_index), or None.
    target: torch.Tensor | None
    #: (rows,) bool: the counted positions; None without targets (every position counts: nothing
    #: the size of the rows is made before their chunks arrive).
    counted: torch.Tensor | None

    @property
    def has_targets(self) -> bool:
        return self.target is not None

    def row_view(self, logits: torch.Tensor) -> torch.Tensor:
        """A full logits tensor (or a slice of whole tokens) as (rows, V)."""
        return logits.reshape(math.prod(logits.shape[:-1]), self.vocab)

    def rows_per_chunk(self, chunk_bytes: int) -> int:
        """Rows evaluated together for a budget of ``chunk_bytes`` bytes of compute-dtype logits per
        model (the temporaries of one chunk peak at about ten times that)."""
        return max(1, chunk_bytes // max(1, self.vocab * itemsize(self.compute_dtype)))


@dataclass
class CompareValues:
    """Dense per-token values and their float64 totals.

    ``kl`` and the target outputs are in the compute dtype; ``argmax_agree`` and ``counted`` bool.
    The target outputs are None without targets.
    """

    kl: torch.Tensor
    argmax_agree: torch.Tensor
    counted: torch.Tensor
    totals: CompareTotals
    p_ref: torch.Tensor | None = None
    p_cand: torch.Tensor | None = None
    delta_p: torch.Tensor | None = None
    nll_ref: torch.Tensor | None = None
    nll_cand: torch.Tensor | None = None


@dataclass
class ComparePartial(CompareValues):
    """The values of rows ``[row_start, row_stop)``, 1-d."""

    row_start: int = field(default=0, kw_only=True)
    row_stop: int = field(default=0, kw_only=True)


@dataclass
class CompareResult(CompareValues):
    """The values of every row, shaped like the targets (``token_shape``)."""


# ---------------------------------------------------------------------------- validation
def _check_logits(field: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise InvalidDtype(field, f"expected floating logits (float32, float64, float16, bfloat16), got {dtype_name(dtype)}")
    if len(shape) == 0:
        raise InvalidInput(field, "expected logits with a vocabulary axis last ((V), (N, V) or (B, T, V)), got a 0-dim tensor")
    if shape[-1] == 0:
        raise InvalidInput(field, f"the vocabulary axis (last) is empty: shape {list(shape)}")


def plan_compare(
    reference_shape: Sequence[int],
    reference_dtype: torch.dtype,
    candidate_shape: Sequence[int],
    candidate_dtype: torch.dtype,
    target: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift_targets: bool = False,
) -> ComparePlan:
    """Validate a comparison; raise InvalidInput naming the field.

    Fields: ``reference`` / ``candidate`` (dtype not floating, an InvalidDtype; 0-dim, empty vocabulary),
    ``candidate`` (different vocabulary, different token shape), ``target`` (dtype, shape not
    the logits' shape without V, class index outside [0, V) that is not ignore_index),
    ``options.ignore_index`` (not an int), ``options.shift_targets`` (without targets, or with a
    0-dim target).
    """
    ref_shape = tuple(int(s) for s in reference_shape)
    cand_shape = tuple(int(s) for s in candidate_shape)
    _check_logits("reference", ref_shape, reference_dtype)
    _check_logits("candidate", cand_shape, candidate_dtype)
    if ref_shape[-1] != cand_shape[-1]:
        raise InvalidInput(
            "candidate", f"different vocabularies: the reference has {ref_shape[-1]} classes, the candidate {cand_shape[-1]}"
        )
    if ref_shape != cand_shape:
        raise InvalidInput("candidate", f"shape mismatch: the reference's logits are {list(ref_shape)}, the candidate's {list(cand_shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise InvalidInput("options.ignore_index", f"expected an integer, got {type(ignore_index).__name__}")
    if not isinstance(shift_targets, bool):
        raise InvalidInput("options.shift_targets", f"expected a bool, got {type(shift_targets).__name__}")
    vocab = ref_shape[-1]
    token_shape = ref_shape[:-1]
    rows = math.prod(token_shape)
    compute_dtype = torch.float64 if torch.float64 in (reference_dtype, candidate_dtype) else torch.float32
    if target is None:
        if shift_targets:
            raise InvalidInput("options.shift_targets", "shifting needs class-index targets, none were given")
        flat, counted = None, None
    else:
        flat, counted = _targets(target, token_shape, vocab, ignore_index, shift_targets)
    return ComparePlan(
        shape=ref_shape,
        reference_dtype=reference_dtype,
        candidate_dtype=candidate_dtype,
        vocab=vocab,
        token_shape=token_shape,
        rows=rows,
        compute_dtype=compute_dtype,
        ignore_index=ignore_index,
        shift_targets=shift_targets,
        target=flat,
        counted=counted,
    )


def _targets(
    target: torch.Tensor, token_shape: tuple[int, ...], vocab: int, ignore_index: int, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if target.dtype not in TARGET_DTYPES:
        raise InvalidInput("target", f"expected integer class indices (int64, int32, int16, int8, uint8), got {dtype_name(target.dtype)}")
    if tuple(target.shape) != token_shape:
        raise InvalidInput(
            "target",
            f"expected class indices shaped like the logits without the vocabulary axis, {list(token_shape)}, got {list(target.shape)}",
        )
    # the class-index rule of every loss: ignore_index, the causal shift, targets in [0, V)
    return resolve_targets(LossSpec(ignore_index=ignore_index, shift_targets=shift), target, vocab)


# ---------------------------------------------------------------------------- evaluation
def compare_rows(plan: ComparePlan, reference: torch.Tensor, candidate: torch.Tensor, row_start: int = 0, *,
                 device: torch.device | str = "cpu", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ComparePartial:  # fmt: skip
    """Compare rows ``[row_start, row_start + n)``: ``reference`` and ``candidate`` are (n, V).

    Evaluated in sub-chunks of :meth:`ComparePlan.rows_per_chunk` rows, so half-precision
    logits are upcast one bounded chunk at a time. Raises InvalidInput if a chunk does not fit.
    """
    for name, x, dtype in (("reference", reference, plan.reference_dtype), ("candidate", candidate, plan.candidate_dtype)):
        if x.dtype != dtype:
            raise InvalidInput(name, f"chunk dtype {dtype_name(x.dtype)} differs from the request's {dtype_name(dtype)}")
        if x.dim() != 2 or x.shape[1] != plan.vocab:
            raise InvalidInput(name, f"expected a chunk of rows of shape (rows, {plan.vocab}), got {list(x.shape)}")
    n = reference.shape[0]
    if candidate.shape[0] != n:
        raise InvalidInput("candidate", f"chunk has {candidate.shape[0]} rows, the reference's chunk {n}")
    if row_start < 0 or row_start + n > plan.rows:
        raise InvalidInput("reference", f"rows [{row_start}, {row_start + n}) are outside the {plan.rows} tokens")
    step = plan.rows_per_chunk(chunk_bytes)
    parts = [_compare_chunk(plan, reference[a : a + step], candidate[a : a + step], row_start + a, device) for a in range(0, n, step)]
    if not parts:
        return _empty_partial(plan, row_start)
    return merge_compare_partials(parts) if len(parts) > 1 else parts[0]


def _empty_partial(plan: ComparePlan, row_start: int) -> ComparePartial:
    empty = torch.empty(0, dtype=plan.compute_dtype)
    extra = dict.fromkeys(TARGET_OUTPUTS, empty) if plan.has_targets else {}
    flags = torch.empty(0, dtype=torch.bool)
    return ComparePartial(empty, flags, flags, CompareTotals(), **extra, row_start=row_start, row_stop=row_start)


def _sum(x: torch.Tensor) -> float:
    return sum64(x)


def _rows_in(name: str, rows: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """A chunk of logits in the compute dtype on ``device``; a CPU half-precision chunk is upcast
    into the scratch buffer ``name`` (exact). May be the caller's tensor: never written to."""
    if rows.device.type == "cpu" and torch.device(device).type == "cpu" and rows.dtype != dtype:
        return upcast(rows, dtype, reuse=True, name=name)
    return to_compute(rows, dtype, device)


def _normalised(x: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax's pieces for (rows, V) logits: ``y = x - max``, ``e = exp(y)``, the float64
    normaliser ``s = sum(e)`` and ``log(s)``, so that ``log_softmax(x) = y - log(s)``.
    ``y`` and ``e`` are this thread's scratch buffers ``compare.y.<side>`` / ``compare.e.<side>``."""
    y = torch.sub(x, x.amax(1, keepdim=True), out=temporary(f"compare.y.{side}", x))
    e = torch.exp(y, out=temporary(f"compare.e.{side}", x))
    wide = temporary("compare.e64", e, torch.float64)
    s = (e.to(torch.float64) if wide is None else wide.copy_(e)).sum(1)
    return y, e, s, s.log()


def _compare_chunk(plan: ComparePlan, ref: torch.Tensor, cand: torch.Tensor, r0: int, device) -> ComparePartial:
    r1 = r0 + ref.shape[0]
    cd = plan.compute_dtype
    xr = _rows_in("compare.x.reference", ref, cd, device)
    xc = _rows_in("compare.x.candidate", cand, cd, device)
    counted = torch.ones(r1 - r0, dtype=torch.bool, device=device) if plan.counted is None else plan.counted[r0:r1].to(device)
    agree = (xr.argmax(1) == xc.argmax(1)) & counted
    yr, er, sr, log_sr = _normalised(xr, "reference")
    # the candidate's exponentials are only summed: their buffer is the products' below
    yc, _, _, log_sc = _normalised(xc, "candidate")
    values = {}
    if plan.has_targets:
        t = plan.target[r0:r1].to(device).masked_fill(~counted, 0).unsqueeze(1)
        nll_r = log_sr - yr.gather(1, t).squeeze(1).to(torch.float64)
        nll_c = log_sc - yc.gather(1, t).squeeze(1).to(torch.float64)
        p_r = torch.exp(-nll_r)
        p_c = torch.exp(-nll_c)
        values = {"p_ref": p_r, "p_cand": p_c, "delta_p": p_c - p_r, "nll_ref": nll_r, "nll_cand": nll_c}
    # KL = sum_v p (lr - lc) with lr - lc = d - D, d = yr - yc, D = log(sr) - log(sc): the logits'
    # common offsets never enter a rounding. Centred on c = sum_v p d, so that both parts are of
    # the size of the KL: KL = sum_v p (d - c) + (c - D), the per-row scalars in float64.
    # (In place from here: yr, er and the products are this function's own temporaries.)
    p = er.div_(sr.to(cd).unsqueeze(1))
    zero = torch.eq(p, 0, out=temporary("compare.zero", p, torch.bool))  # 0 log 0 = 0 (also where the candidate is -inf)
    d = yr.sub_(yc)
    c = torch.mul(p, d, out=temporary("compare.e.candidate", p)).masked_fill_(zero, 0.0).sum(1)
    c = torch.where(c.isfinite(), c, 0.0)
    spread = d.sub_(c.unsqueeze(1)).mul_(p).masked_fill_(zero, 0.0).sum(1)
    kl = ((c.to(torch.float64) - (log_sr - log_sc)) + spread.to(torch.float64)).to(cd)
    kl = torch.where(counted, kl, 0.0)
    kl64 = kl.to(torch.float64)
    totals = {
        "tokens": int(counted.sum()),
        "argmax_agree": int(agree.sum()),
        "sum_kl": _sum(kl64),
        "sum_kl2": _sum(kl64 * kl64),
    }
    extra = {k: torch.where(counted, v, 0.0).to(cd) for k, v in values.items()}
    if extra:
        a = extra["nll_ref"].to(torch.float64)
        b = extra["nll_cand"].to(torch.float64)
        dp = extra["delta_p"].to(torch.float64)
        dp2 = dp * dp
        totals.update(
            sum_nll_ref=_sum(a),
            sum_nll_ref2=_sum(a * a),
            sum_nll_cand=_sum(b),
            sum_nll_cand2=_sum(b * b),
            sum_nll_ref_nll_cand=_sum(a * b),
            sum_delta_p=_sum(dp),
            sum_delta_p2=_sum(dp2),
            sum_delta_p4=_sum(dp2 * dp2),
        )
    extra = {k: v.cpu() for k, v in extra.items()}
    return ComparePartial(kl.cpu(), agree.cpu(), counted.cpu(), CompareTotals(**totals), **extra, row_start=r0, row_stop=r1)


def merge_compare_partials(parts: Sequence[ComparePartial]) -> ComparePartial:
    """Concatenate partials of consecutive row ranges (in order); totals are added."""
    first = parts[0]
    extra = {k: torch.cat([getattr(p, k) for p in parts]) for k in TARGET_OUTPUTS if getattr(first, k) is not None}
    return ComparePartial(
        torch.cat([p.kl for p in parts]),
        torch.cat([p.argmax_agree for p in parts]),
        torch.cat([p.counted for p in parts]),
        combine_totals([p.totals for p in parts]),
        **extra,
        row_start=first.row_start,
        row_stop=parts[-1].row_stop,
    )


def finish_compare(plan: ComparePlan, partial: ComparePartial) -> CompareResult:
    """Shape the partial covering every row like the targets (``plan.token_shape``)."""
    if (partial.row_start, partial.row_stop) != (0, plan.rows):
        raise ValueError(f"partial covers rows [{partial.row_start}, {partial.row_stop}), not [0, {plan.rows})")
    shape = plan.token_shape
    extra = {k: getattr(partial, k).reshape(shape) for k in TARGET_OUTPUTS if getattr(partial, k) is not None}
    return CompareResult(
        partial.kl.reshape(shape), partial.argmax_agree.reshape(shape), partial.counted.reshape(shape), partial.totals, **extra
    )


def compare(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift_targets: bool = False,
    device: torch.device | str = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> CompareResult:
    """Validate and compare two whole logit tensors."""
    plan = plan_compare(
        reference.shape, reference.dtype, candidate.shape, candidate.dtype, target, ignore_index=ignore_index, shift_targets=shift_targets
    )
    partial = compare_rows(plan, plan.row_view(reference), plan.row_view(candidate), 0, device=device, chunk_bytes=chunk_bytes)
    return finish_compare(plan, partial)


# ---------------------------------------------------------------------------- top-k
@dataclass
class TopK:
    """Per token the ``k`` most likely classes, most likely first (ties: lower id first).

    ``ids`` int64 and ``logprobs`` (log_softmax in the compute dtype), both shaped ``(..., k)``.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor


def check_top_k(k: int, *, max_k: int, vocab: int) -> None:
    """Raise InvalidInput('options.top_k') unless 0 <= k <= min(max_k, vocab)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise InvalidInput("options.top_k", f"expected an integer, got {type(k).__name__}")
    if k < 0:
        raise InvalidInput("options.top_k", f"must be >= 0, got {k}")
    if k > max_k:
        raise InvalidInput("options.top_k", f"{k} is above this server's limit of {max_k}")
    if k > vocab:
        raise InvalidInput("options.top_k", f"{k} is more than the {vocab} classes")


def top_k(
    logits: torch.Tensor,
    k: int,
    *,
    max_k: int,
    device: torch.device | str = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> TopK:
    """The ``k`` most likely classes of every token of ``logits`` (``(..., V)``, class axis last).

    Classes are ranked by their logits (log_softmax preserves the order), descending, ties by
    ascending id, NaN above everything (as torch.sort and torch.argmax): the ids of the first
    ``k`` entries of a stable descending sort, found with ``torch.topk`` and a full stable sort
    only for the rows where ties at the k-th value or NaN make topk's choice ambiguous.
    ``logprobs`` are those classes' log_softmax values in float32 (float64 for float64 logits).
    Raises InvalidInput naming ``logits`` (dtype, shape) or ``options.top_k``.
    """
    _check_logits("logits", tuple(logits.shape), logits.dtype)
    vocab = logits.shape[-1]
    check_top_k(k, max_k=max_k, vocab=vocab)
    lead = tuple(logits.shape[:-1])
    rows = logits.reshape(math.prod(lead), vocab)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    step = max(1, chunk_bytes // (vocab * itemsize(dtype)))
    ids, logprobs = [], []
    for a in range(0, rows.shape[0], step):
        i, lp = _top_k_chunk(to_compute(rows[a : a + step], dtype, device), k)
        ids.append(i.cpu())
        logprobs.append(lp.cpu())
    if not ids:
        return TopK(torch.empty((*lead, k), dtype=torch.int64), torch.empty((*lead, k), dtype=dtype))
    return TopK(torch.cat(ids).reshape(*lead, k), torch.cat(logprobs).reshape(*lead, k))


def _top_k_chunk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if k == 0:
        return torch.empty(x.shape[0], 0, dtype=torch.int64, device=x.device), x[:, :0]
    values, idx = torch.topk(x, k, dim=1, largest=True, sorted=False)
    threshold = values.min(1, keepdim=True).values
    # topk's set is the answer when exactly k classes reach its k-th value and nothing is NaN
    exact = ((x >= threshold).sum(1) == k) & ~x.isnan().any(1)
    by_id = idx.sort(1).values
    order = torch.sort(x.gather(1, by_id), dim=1, descending=True, stable=True).indices
    ids = by_id.gather(1, order)
    if not bool(exact.all()):
        ambiguous = (~exact).nonzero().squeeze(1)
        ids[ambiguous] = torch.sort(x[ambiguous], dim=1, descending=True, stable=True).indices[:, :k]
    y, _, _, log_s = _normalised(x, "top_k")
    return ids, (y.gather(1, ids).to(torch.float64) - log_s.unsqueeze(1)).to(x.dtype)
