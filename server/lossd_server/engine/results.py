"""What evaluation produces: partial results of unit ranges, and what torch returns."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch


@dataclass
class SequenceStats:
    """One value per sequence, as 1-d tensors (float64, int64, bool): never Python lists, which
    take 4x the memory (32 bytes a float) for millions of sequences."""

    nll_sum: torch.Tensor
    tokens: torch.Tensor
    mean_nll: torch.Tensor
    perplexity: torch.Tensor
    is_greedy: torch.Tensor


@dataclass
class LossResult:
    """What torch returns (``loss``) plus the exact float64 totals behind a mean."""

    loss: torch.Tensor
    loss_sum: float
    weight_sum: float
    counted: int
    sequences: SequenceStats | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Partial:
    """Evaluation of a contiguous range of units ``[unit_start, unit_stop)``."""

    unit_start: int
    unit_stop: int
    losses: torch.Tensor | None  # per element, compute dtype, on CPU; None unless needed
    loss_sum: float
    weight_sum: float
    counted: int
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    seq_loss: torch.Tensor | None = None  # (rows,) float64 weighted loss, for sequence stats
    seq_weight: torch.Tensor | None = None
    seq_counted: torch.Tensor | None = None
    seq_greedy: torch.Tensor | None = None
    # cross_entropy with label smoothing: the two float64 sums torch divides separately
    nll_sum: float = 0.0
    smooth_sum: float = 0.0


@dataclass
class ClassTerms:
    """Per-row tensors of a class-index evaluation; ``rows(a, b)`` views a row range."""

    x: torch.Tensor
    logp: torch.Tensor
    picked: torch.Tensor
    tc: torch.Tensor
    valid: torch.Tensor
    losses: torch.Tensor
    wt: torch.Tensor
    nll: torch.Tensor | None = None  # with label smoothing: the weighted NLL part of the losses
    smooth: torch.Tensor | None = None  # with label smoothing: the smoothing part (before ls / C)

    def rows(self, a: int, b: int) -> ClassTerms:
        return ClassTerms(*(None if t is None else t[a:b] for t in (getattr(self, f.name) for f in fields(self))))


def fsum(values: Sequence[float]) -> float:
    """Exactly rounded sum; IEEE semantics (inf - inf = nan, overflow = inf) when not finite."""
    try:
        return math.fsum(values)
    except (ValueError, OverflowError):
        return sum(values)


def merge_partials(parts: Sequence[Partial]) -> Partial:
    """Concatenate partials of consecutive unit ranges (in order)."""
    first = parts[0]

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return Partial(
        first.unit_start,
        parts[-1].unit_stop,
        cat("losses"),
        fsum([p.loss_sum for p in parts]),
        fsum([p.weight_sum for p in parts]),
        sum(p.counted for p in parts),
        {k: torch.cat([p.extras[k] for p in parts]) for k in first.extras},
        cat("seq_loss"),
        cat("seq_weight"),
        cat("seq_counted"),
        cat("seq_greedy"),
        fsum([p.nll_sum for p in parts]),
        fsum([p.smooth_sum for p in parts]),
    )
