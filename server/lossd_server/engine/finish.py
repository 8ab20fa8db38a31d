"""From the partial covering every unit to what torch returns: reductions and sequence statistics."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from lossd_client.reduction import accumulation_dtypes, quotient, total
from lossd_client.reduction import divide as divide

from .kernels import share
from .results import LossResult, Partial, SequenceStats
from .spec import CROSS_ENTROPY, EXTRA_DTYPES, TargetKind, dtype_name

if TYPE_CHECKING:
    from .plan import Plan


def _scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim tensor of a float64 value rounded once to ``dtype``, through a float64 tensor: the
    bits ``torch.tensor(value, dtype=dtype)`` gives (checked over 60,000 values and inf, nan, -0.0),
    in two torch ops instead of seven. ``torch.full`` straight into a narrower dtype would refuse
    a value past its range, where rounding gives inf."""
    exact = torch.full((), value, dtype=torch.float64)
    return exact if dtype == torch.float64 else exact.to(dtype)


def reduce(plan: Plan, partial: Partial) -> torch.Tensor:
    """torch's ``loss`` for the plan's reduction, in torch's output dtype."""
    spec = plan.spec
    if spec.reduction == "none":
        losses = partial.losses if partial.losses is not None else torch.empty(0, dtype=plan.compute_dtype)
        return losses.reshape(plan.output_shape).to(plan.output_dtype)
    if spec.reduction == "sum":
        value = total(partial.loss_sum, spec.loss, class_indices=plan.kind is TargetKind.CLASS)
        if plan.kind is TargetKind.CLASS and plan.num_classes == 0 and spec.loss == CROSS_ENTROPY and spec.label_smoothing > 0:
            value = math.nan  # torch: smooth_loss.sum() * (label_smoothing / 0) = 0 * inf
        return _scalar(value, plan.output_dtype)
    return _scalar(mean(plan, partial), plan.output_dtype)


def mean(plan: Plan, partial: Partial) -> float:
    """torch's 'mean' from the float64 totals, before rounding to the output dtype; where torch's
    own totals overflow their dtype, its inf / nan (:func:`lossd_client.reduction.quotient`), and a
    zero total signed as torch's (:func:`lossd_client.reduction.total`)."""
    spec, out, class_indices = plan.spec, dtype_name(plan.output_dtype), plan.kind is TargetKind.CLASS
    ls = spec.smoothing
    if not class_indices and math.prod(plan.input_shape) == 0:
        # probabilities: torch's -(input * target).sum().fill_(nan), a NaN with its sign bit set
        return -math.nan if plan.kind is TargetKind.PROB else math.nan
    if class_indices and ls > 0.0:
        # torch: (1 - ls) * nll_loss(mean) + smooth.sum() / Σ w[y] * (ls / C), each mean divided
        # on its own (a zero total weight gives nan + inf = nan, not inf); the smoothing part's
        # denominator is the weights' sum in the accumulation dtype, or the count of targets (unrounded)
        acc, _ = accumulation_dtypes(spec.loss, out)
        nll = quotient(total(partial.nll_sum, spec.loss), partial.weight_sum, acc, acc)
        smooth = quotient(total(partial.smooth_sum, spec.loss), partial.weight_sum, acc, acc if plan.weight is not None else None)
        return (1 - ls) * nll + smooth * share(ls, plan.num_classes)
    num_dtype, den_dtype = accumulation_dtypes(spec.loss, out, class_indices=class_indices)
    return quotient(total(partial.loss_sum, spec.loss, class_indices=class_indices), partial.weight_sum, num_dtype, den_dtype)


def finish(plan: Plan, partial: Partial) -> LossResult:
    """Turn the partial covering every unit into what torch returns, plus the extras asked for."""
    result = LossResult(reduce(plan, partial), partial.loss_sum, partial.weight_sum, partial.counted)
    if plan.kind is TargetKind.CLASS:
        spec = plan.spec
        shape = plan.target_shape if plan.target_shape else ()
        for name, value in partial.extras.items():
            result.extras[name] = value.reshape(shape)
        for name in spec.extras:
            if name not in result.extras:  # nothing was evaluated (empty input)
                result.extras[name] = torch.empty(shape, dtype=EXTRA_DTYPES.get(name, plan.compute_dtype))
        if spec.sequence_stats:
            result.sequences = sequence_stats(plan, partial)
    return result


def sequence_stats(plan: Plan, partial: Partial) -> SequenceStats:
    """Per row of the target's last axis: NLL sum, tokens, mean, perplexity, greedy."""
    t_len = max(1, plan.seq_len)
    if partial.seq_loss is None or not partial.seq_loss.numel():  # nothing evaluated: empty input, or its rows of a fused batch
        zeros = torch.zeros(plan.sequences, t_len, dtype=torch.float64).reshape(-1)
        partial = Partial(0, 0, None, 0.0, 0.0, 0, {}, zeros, zeros, zeros.bool(), ~zeros.bool())
    loss = partial.seq_loss.reshape(-1, t_len)
    weight = partial.seq_weight.reshape(-1, t_len)
    nll_sum = loss.sum(1)
    wsum = weight.sum(1)
    tokens = partial.seq_counted.reshape(-1, t_len).sum(1)
    mean = nll_sum / wsum
    return SequenceStats(
        nll_sum=nll_sum,
        tokens=tokens,
        mean_nll=mean,
        perplexity=mean.exp(),
        is_greedy=partial.seq_greedy.reshape(-1, t_len).all(1),
    )
