"""The arithmetic, one function per target kind: a chunk of units in, a Partial out.

Every function reads only the chunk it is given plus the plan's small tensors (class weights,
resolved class targets); the chunk's per-element losses, their float64 sum (the numerator of
torch's mean) and the denominator torch uses go into a :class:`~.results.Partial`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .results import ClassTerms, Partial
from .scratch import scratch, sum64, temporary, upcast
from .spec import CROSS_ENTROPY, TargetKind

if TYPE_CHECKING:
    from .plan import Plan


def evaluate_chunk(plan: Plan, xu: torch.Tensor, tu: torch.Tensor | None, unit_start: int, device) -> Partial:
    """Units ``[unit_start, unit_start + len(xu))``: ``xu`` (and ``tu`` for probability / BCE
    targets) in the plan's unit layout."""
    u1 = unit_start + xu.shape[0]
    if plan.kind is TargetKind.BCE:
        return bce(plan, xu, tu, unit_start, u1, device)
    if plan.kind is TargetKind.PROB:
        if plan.output_dtype != plan.input_dtype:
            return prob_promoted(plan, xu, tu, unit_start, u1, device)
        if plan.geometry.kdim:  # torch's own layout, as for class indices below
            x, p = xu.to(device=device, dtype=plan.compute_dtype), tu.to(device=device, dtype=plan.compute_dtype)
            return prob(plan, x, p, unit_start, u1)
        x = plan.geometry.rows_of(xu, device, plan.compute_dtype)
        return prob(plan, x, plan.geometry.rows_of(tu, device, plan.compute_dtype), unit_start, u1)
    r0, r1 = unit_start * plan.geometry.unit_positions, u1 * plan.geometry.unit_positions
    if plan.fused_kernel and plan.geometry.kdim:
        # (units, C, positions): torch's own K-dim layout. Its log_softmax along dim 1 there differs
        # from the same logits' (rows, C) kernel by an ulp in about a fifth of the elements, so
        # these units are not turned into rows (that transposed copy also cost twice the time)
        x = xu.to(device, non_blocking=True)
        upcast_copy = x.dtype != plan.compute_dtype
        if upcast_copy:
            x = upcast(x, plan.compute_dtype, reuse=True)
        return class_fused(plan, x, r0, r1, unit_start, u1, overwrite=upcast_copy)
    if plan.geometry.kdim and plan.spec.loss == CROSS_ENTROPY:  # with extras or statistics (else fused above)
        t, valid = plan.target[r0:r1].to(device), plan.valid[r0:r1].to(device)
        return class_partial(plan, kdim_class_terms(plan, xu, t, valid, device), unit_start, u1)
    # class-index rows are consumed before the next chunk is upcast into the same scratch buffer
    x = plan.geometry.rows_of(xu, device, plan.compute_dtype, reuse=True)
    if plan.fused_kernel:  # takes its targets from the plan itself
        # upcast rows are the engine's own copy: their log-probabilities may overwrite them
        return class_fused(plan, x, r0, r1, unit_start, u1, overwrite=x.dtype != xu.dtype)
    t, valid = plan.target[r0:r1].to(device), plan.valid[r0:r1].to(device)
    return class_partial(plan, class_terms(plan, x, t, valid), unit_start, u1)


def kdim_class_terms(plan: Plan, xu: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, device) -> ClassTerms:
    """:func:`class_terms` of (units, C, positions) cross_entropy logits whose log-probabilities
    (and label smoothing's class sums) are taken in that layout, torch's own for K-dim inputs: the
    same values as ``F.cross_entropy``'s, where the row kernel differs by an ulp in about a fifth of
    the elements (and so did the extras). The rows are a copy of those log-probabilities."""
    x = xu.to(device, non_blocking=True)
    if x.dtype != plan.compute_dtype:
        x = upcast(x, plan.compute_dtype, reuse=True)
    units, classes, positions = x.shape
    on_cpu = x.device.type == "cpu"
    # on the CPU into this thread's buffers (fresh chunk-sized tensors are page-faulted in every
    # time), consumed (losses, extras) before it evaluates anything else
    logp_units = (
        torch.log_softmax(x, 1, out=scratch("kdim.log_softmax", x.numel(), x.dtype).view(x.shape)) if on_cpu else torch.log_softmax(x, 1)
    )
    smooth = None
    if plan.spec.smoothing > 0.0:  # as torch: -(logp * w).sum(class axis), in its layout
        w = _weight_on(plan, device)
        weighted = logp_units if w is None else logp_units * w.view(1, -1, 1)
        smooth = torch.neg(weighted.sum(1)).reshape(-1)
    by_position = logp_units.transpose(1, 2)
    if on_cpu:
        rows = scratch("log_softmax", x.numel(), x.dtype).view(units, positions, classes).copy_(by_position)
    else:
        rows = by_position.contiguous()
    rows = rows.view(units * positions, classes)
    return class_terms(plan, rows, t, valid, logp=rows, smooth=smooth)


def class_fused(plan: Plan, x: torch.Tensor, r0: int, r1: int, u0: int, u1: int, *, overwrite: bool = False) -> Partial:
    """Rows ``[r0, r1)`` through torch's own cross_entropy / nll_loss kernel (reduction='none'):
    per-element losses are torch's own, their float64 sum the numerator; the denominator and
    count were taken from the targets when the plan was made. ``x`` holds them as (rows, C)
    or as (units, C, positions)."""
    t = plan.target if r0 == 0 and r1 == plan.rows else plan.target[r0:r1]
    if x.dim() == 3:
        t = t.view(x.shape[0], x.shape[2])
    losses = fused_losses(plan, x, t, overwrite=overwrite).reshape(-1)
    if r0 == 0 and r1 == plan.rows:
        weight_sum, counted = plan.target_weight_sum, plan.target_counted
    else:
        weight_sum, counted = target_totals(plan.target[r0:r1], plan.valid[r0:r1], plan.weight, plan.compute_dtype)
    return Partial(u0, u1, losses.cpu() if plan.needs_losses() else None, sum64(losses), weight_sum, counted)


def fused_losses(plan: Plan, x: torch.Tensor, t: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
    """Per-row losses of (rows, C) compute-dtype logits ``x`` and their resolved class targets
    ``t`` (or of (units, C, positions) logits and (units, positions) targets), by torch's own kernel with the plan's loss, class weights, ignore_index and label
    smoothing. Row by row: rows of several plans that agree on those may be evaluated together.

    ``overwrite``: ``x`` is a copy nobody else reads (half / bfloat16 rows upcast to float32, rows
    of several requests concatenated), so the log-probabilities are written over it, row by row as
    torch's kernel reads it (the same values; 2048x32000 bfloat16 in 4 MiB chunks: 0.045 -> 0.041 s,
    float32 0.038 s)."""
    spec = plan.spec
    if t.device != x.device:
        t = t.to(x.device)
    w = _weight_on(plan, x.device)
    if spec.loss == CROSS_ENTROPY and spec.smoothing <= 0.0 and x.device.type == "cpu":
        # torch's cross_entropy is exactly nll_loss(log_softmax(x, 1)) without smoothing; the
        # log-probabilities go into this thread's scratch buffer instead of a fresh chunk-sized
        # tensor, which the server's 1 MiB mmap threshold would map and page-fault in per chunk
        out = x if overwrite else scratch("log_softmax", x.numel(), x.dtype).view(x.shape)
        logp = torch.log_softmax(x, 1, out=out)
        return F.nll_loss(logp, t, weight=w, ignore_index=spec.ignore_index, reduction="none")
    if spec.loss == CROSS_ENTROPY:
        return F.cross_entropy(x, t, weight=w, ignore_index=spec.ignore_index, reduction="none", label_smoothing=spec.smoothing)
    return F.nll_loss(x, t, weight=w, ignore_index=spec.ignore_index, reduction="none")


def target_totals(flat: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor | None, compute_dtype: torch.dtype) -> tuple[float, int]:
    """(Σ w[y] in float64 over the counted targets, as the compute dtype sees w; their count)."""
    counted = int(torch.count_nonzero(valid))  # valid.sum() makes an int64 copy: 8 bytes a target
    if weight is None:
        return float(counted), counted
    if not weight.numel():
        return 0.0, counted
    w = weight.to(compute_dtype)[flat.masked_fill(~valid, 0)]
    return sum64(torch.where(valid, w, 0.0)), counted


def share(label_smoothing: float, num_classes: int) -> float:
    """label_smoothing / C with C++ double semantics (torch divides by C = 0 without raising)."""
    return label_smoothing / num_classes if num_classes else math.inf


def _weight_on(plan: Plan, device) -> torch.Tensor | None:
    return None if plan.weight is None else plan.weight.to(device=device, dtype=plan.compute_dtype)


def class_terms(
    plan: Plan,
    x: torch.Tensor,
    t: torch.Tensor,
    valid: torch.Tensor,
    *,
    logp: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
) -> ClassTerms:
    """Per-row terms of a class-index loss for (rows, C) compute-dtype logits ``x``.

    Depends only on the loss, C, compute dtype, class weights and label smoothing, so rows of
    several compatible requests may be evaluated together (see batch_engine). ``logp`` and
    ``smooth``: the rows' log-probabilities and label smoothing's per-row class sums, when the
    caller has them (see :func:`kdim_class_terms`).
    """
    spec = plan.spec
    tc = t.masked_fill(~valid, 0)
    if logp is not None:
        pass
    elif spec.loss != CROSS_ENTROPY:
        logp = x
    elif x.device.type == "cpu":
        # consumed (losses, extras) before this thread evaluates anything else
        logp = torch.log_softmax(x, 1, out=scratch("log_softmax", x.numel(), x.dtype).view(x.shape))
    else:
        logp = torch.log_softmax(x, 1)
    # C = 0 is valid only when every target is ignored: gather from one padded zero class
    source = logp if logp.shape[1] else logp.new_zeros(logp.shape[0], 1)
    picked = source.gather(1, tc.unsqueeze(1)).squeeze(1)
    w = _weight_on(plan, x.device)
    if w is not None:
        wt = (w if w.numel() else w.new_zeros(1))[tc]
        nll = -picked * wt
        wt = torch.where(valid, wt, 0.0)
    else:
        nll = -picked
        wt = valid.to(plan.compute_dtype)
    nll = torch.where(valid, nll, 0.0)
    ls = spec.smoothing
    if ls <= 0.0:
        return ClassTerms(x, logp, picked, tc, valid, nll, wt)
    if smooth is None:
        smooth = -(logp * w).sum(1) if w is not None else -logp.sum(1)
    smooth = torch.where(valid, smooth, 0.0)
    losses = (1 - ls) * nll + smooth * share(ls, plan.num_classes)
    return ClassTerms(x, logp, picked, tc, valid, losses, wt, nll, smooth)


def class_partial(plan: Plan, terms: ClassTerms, u0: int, u1: int) -> Partial:
    """Reduce the terms of one request's rows (units ``[u0, u1)``) into a Partial."""
    losses, wt, valid = terms.losses, terms.wt, terms.valid
    part = Partial(
        u0,
        u1,
        losses.cpu() if plan.needs_losses() else None,
        sum64(losses),
        sum64(wt),
        int(torch.count_nonzero(valid)),
    )
    if terms.smooth is not None:
        part.nll_sum = sum64(terms.nll)
        part.smooth_sum = sum64(terms.smooth)
    if plan.spec.extras or plan.spec.sequence_stats:
        _class_extras(plan, part, terms)
    return part


def _class_extras(plan: Plan, part: Partial, terms: ClassTerms) -> None:
    logp, tc, valid = terms.logp, terms.tc, terms.valid
    extras = plan.spec.extras
    no_classes = logp.shape[1] == 0  # then every row is ignored (validated): nothing to rank
    # per row, whether the target is torch.argmax of its log-probabilities (the first maximum, NaN
    # counting as the maximum): lm-evaluation-harness's greedy test; argmax_correct is rank 1, the same
    # test (a count of the greater classes costs less than an argmax, and a rank is often wanted too)
    greedy = None
    if plan.spec.sequence_stats:
        greedy = torch.zeros_like(valid) if no_classes else logp.argmax(1) == tc
    rank = None
    if "target_rank" in extras or "argmax_correct" in extras:
        if no_classes:
            rank = torch.zeros(logp.shape[0], dtype=torch.int64, device=logp.device)
        else:
            rank = torch.where(valid, _target_rank(logp, tc, valid, terms.picked.unsqueeze(1), greedy), 0)
    if "target_logprob" in extras:
        part.extras["target_logprob"] = torch.where(valid, terms.picked, 0.0).cpu()
    if "entropy" in extras:
        p = torch.exp(logp, out=temporary("extras.p", logp))
        zero = torch.eq(p, 0, out=temporary("extras.zero", p, torch.bool))
        p_logp = torch.mul(p, logp, out=temporary("extras.p_logp", p)).masked_fill_(zero, 0.0).sum(1)  # 0 log 0 = 0; NaN stays NaN
        ent = torch.neg(p_logp).add_(0.0)  # -x bit for bit (NaN included), but +0.0 (not -0.0) for a one-hot row
        part.extras["entropy"] = torch.where(valid, ent, 0.0).cpu()
    if "target_rank" in extras:
        part.extras["target_rank"] = rank.cpu()
    if "argmax_correct" in extras:
        part.extras["argmax_correct"] = ((rank == 1) & valid).cpu()
    if plan.spec.sequence_stats:
        part.seq_loss = terms.losses.to(torch.float64).cpu()
        part.seq_weight = terms.wt.to(torch.float64).cpu()
        part.seq_counted = valid.cpu()
        # lm-evaluation-harness: log_softmax(logits).argmax(-1) == continuation, the first maximum
        # winning ties: of the log-probabilities, where two logits an ulp apart can be equal
        part.seq_greedy = (greedy | ~valid).cpu()


def _target_rank(logp: torch.Tensor, tc: torch.Tensor, valid: torch.Tensor, at: torch.Tensor, greedy: torch.Tensor | None) -> torch.Tensor:
    """The target's rank in its row of log-probabilities (``at``: the target's, (rows, 1)): 1 + the
    classes above it: greater, or NaN when it is not (NaN is the maximum, as for torch.argmax);
    when none is, it is a maximum, and the equal ones before it count (torch.argmax takes the
    first), so that rank 1 is exactly ``greedy``. One pass over the row, as a plain count of the
    greater ones: the rows whose target is a maximum (or NaN) and not the first are fixed alone."""
    rank = logp.shape[1] + 1 - _count_at_most(logp, at)  # C + 1 for a NaN target (nothing compares)
    is_nan = at.squeeze(1).isnan()
    not_first = (tc > 0) if greedy is None else ~greedy
    fix = torch.nonzero(valid & (is_nan | ((rank == 1) & not_first))).squeeze(1)
    if not fix.numel():
        return rank
    rows, t, a = logp.index_select(0, fix), tc.index_select(0, fix), at.index_select(0, fix)
    first = rows.argmax(1) == t
    rank[fix[first]] = 1
    tied = ~first
    rows, t, a = rows[tied], t[tied], a[tied]
    before = torch.arange(rows.shape[1], device=rows.device) < t.unsqueeze(1)
    same = (rows == a) | (rows.isnan() & a.isnan())
    rank[fix[tied]] = 1 + (same & before).sum(1)
    return rank


def _count_at_most(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per row, how many entries of ``x`` are <= ``threshold`` (int64): not NaN, nor compared with one.

    Counted as 0 / 1 floats in a scratch buffer: summing a bool tensor first converts all of it
    to a fresh int64 tensor (3.8 ms for 32 x 32000 under the server's allocator settings, against
    0.14 ms). float32 counts are exact up to 2**24 classes; beyond that float64."""
    dtype = torch.float32 if x.shape[1] <= 2**24 else torch.float64
    return torch.le(x, threshold, out=temporary("extras.above", x, dtype)).sum(1).to(torch.int64)


def _summed(plan: Plan, losses: torch.Tensor, u0: int, u1: int) -> Partial:
    """A Partial whose every element counts once (probability and BCE targets)."""
    n = losses.numel()
    return Partial(u0, u1, losses.reshape(-1).cpu() if plan.needs_losses() else None, sum64(losses), float(n), n)


def prob(plan: Plan, x: torch.Tensor, p: torch.Tensor, u0: int, u1: int) -> Partial:
    """Class probabilities, (rows, C) or (units, C, positions) logits and targets in the compute dtype."""
    ls = plan.spec.smoothing
    # chunk-sized temporaries in this thread's scratch buffers (see scratch.temporary)
    logp = torch.log_softmax(x, 1, out=temporary("log_softmax", x))
    if ls > 0.0 and plan.target_dtype != p.dtype == plan.input_dtype:
        # torch smooths the target in its own dtype, before any promotion: a float16 / bfloat16
        # target beside a float32 / float64 input is rounded to it twice (2.3e-3 relative off
        # otherwise). A 16-bit input is computed as torch computes it in float32 (target included).
        p = (p.to(plan.target_dtype) * (1 - ls) + share(ls, plan.num_classes)).to(p.dtype)
    elif ls > 0.0:
        p = torch.mul(p, 1 - ls, out=temporary("prob.smoothed", p)).add_(share(ls, plan.num_classes))
    prod = torch.mul(logp, p, out=temporary("prob.product", logp))
    if plan.weight is not None:
        w = _weight_on(plan, x.device)
        prod = prod.mul_(w.view(1, -1, 1) if x.dim() == 3 else w)
    return _summed(plan, -prod.sum(1), u0, u1)


def prob_promoted(plan: Plan, xu: torch.Tensor, tu: torch.Tensor, u0: int, u1: int, device) -> Partial:
    """Probability targets whose dtype (or the weight's) is wider than the input's.

    torch promotes only after its log_softmax, which runs in (and rounds to) the input dtype;
    the result is then torch's own arithmetic in torch's (N, C, positions) layout.
    """
    x = xu.to(device)
    t = tu.to(device)
    w = None if plan.weight is None else plan.weight.to(device)
    if len(plan.input_shape) <= 2:
        x = x.reshape(x.shape[0], plan.num_classes)
        t = t.reshape(t.shape[0], plan.num_classes)
    elif w is not None:
        w = w.reshape(1, -1, 1)
    ls = plan.spec.smoothing
    if ls > 0.0:
        t = t * (1 - ls) + share(ls, plan.num_classes)
    prod = torch.log_softmax(x, 1) * t
    if w is not None:
        prod = prod * w
    return _summed(plan, -prod.sum(1), u0, u1)


def bce(plan: Plan, xu: torch.Tensor, tu: torch.Tensor, u0: int, u1: int, device) -> Partial:
    """binary_cross_entropy_with_logits over (units, positions) logits and targets.

    When target / weight dtypes promote the result past the input dtype, torch rounds
    log_sigmoid(input) to the input dtype first: evaluating in the original dtypes keeps exactly
    that. Otherwise the input and target run in the compute dtype, and the weights keep their own
    dtype unless the input is upcast (16-bit inputs): torch computes ``pos_weight - 1`` in the
    pos_weight's dtype and multiplies by a float64 weight in float64 before rounding, so a float16
    pos_weight or a float64 weight beside a float32 input is not converted first.
    """
    cd = None if plan.output_dtype != plan.input_dtype else plan.compute_dtype
    x = xu.to(device=device, dtype=cd)
    t = tu.to(device=device, dtype=cd)
    wd = cd if cd is not None and cd != plan.input_dtype else None
    kwargs = {}
    for name, w in (("weight", plan.weight), ("pos_weight", plan.pos_weight)):
        if w is None:
            continue
        w = w.to(wd)
        if w.dim() == 0 and plan.input_shape:
            kwargs[name] = w.to(device)  # beside a dimensioned input a 0-dim weight promotes as a scalar does: kept 0-dim
        else:
            full = w.expand(plan.input_shape) if plan.input_shape else w.reshape(())
            kwargs[name] = plan.unit_view(full)[u0:u1].to(device)
    return _summed(plan, F.binary_cross_entropy_with_logits(x, t, reduction="none", **kwargs), u0, u1)
