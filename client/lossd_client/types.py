"""What the client takes and returns: one request, its results, and exact combination of totals.

Plain dataclasses, no I/O: :class:`LossRequest` goes in; :class:`EvaluateResult` (with
:class:`SequenceStats`), :class:`PerplexityResult` and :class:`LoglikelihoodResult` come out;
:func:`combine` adds totals up exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LossRequest:
    """One evaluation, as :meth:`LossClient.evaluate` takes it (used by ``evaluate_many``)."""

    input: Any
    target: Any
    loss: str = "cross_entropy"
    weight: Any = None
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    pos_weight: Any = None
    class_axis: int | None = None
    shift_targets: bool = False
    extras: Sequence[str] = ()
    sequence_stats: bool = False
    id: str = ""


@dataclass
class SequenceStats:
    """Per-sequence statistics (rows of the target's last axis)."""

    nll_sum: np.ndarray
    tokens: np.ndarray
    mean_nll: np.ndarray
    perplexity: np.ndarray
    is_greedy: np.ndarray


@dataclass
class EvaluateResult:
    """What torch returns (``loss``) plus the float64 totals that combine across requests."""

    loss: Any
    loss_sum: float
    weight_sum: float
    counted: int
    sequences: SequenceStats | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    id: str = ""

    @property
    def mean(self) -> float:
        """loss_sum / weight_sum (torch's mean for these options)."""
        return self.loss_sum / self.weight_sum if self.weight_sum else math.nan


def _fsum(values: Sequence[float]) -> float:
    """Exactly rounded sum; IEEE semantics (inf - inf = nan, overflow = inf) when not finite."""
    try:
        return math.fsum(values)
    except (ValueError, OverflowError):
        return sum(values)


def combine(results: Sequence[EvaluateResult]) -> float:
    """The exact mean over several results (requests, shards or replicas)."""
    total, weight = _fsum([r.loss_sum for r in results]), _fsum([r.weight_sum for r in results])
    return total / weight if weight else math.nan


@dataclass
class PerplexityResult:
    """Per-token NLL (float32, never rounded to the logits' dtype), per-sequence and corpus figures.

    ``token_nll`` is shaped like the tokens; with ``shift`` position t holds -log p(token t+1), and
    positions that score nothing (the last one, ignored tokens) hold 0.
    """

    token_nll: Any
    sequence_nll_sum: np.ndarray
    sequence_tokens: np.ndarray
    sequence_perplexity: np.ndarray
    nll_sum: float
    tokens: int

    @property
    def mean_nll(self) -> float:
        """Corpus mean NLL per counted token: nll_sum / tokens."""
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """Corpus perplexity: exp(total NLL / total counted tokens)."""
        return math.exp(self.mean_nll) if self.tokens else math.nan


@dataclass
class LoglikelihoodResult:
    """Per sequence: sum of continuation log-probs and whether greedy decoding gives it."""

    logprob: np.ndarray
    is_greedy: np.ndarray
