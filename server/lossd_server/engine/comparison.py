"""The Compare RPCs' engine work: :mod:`.compare` (per-token values) and its ``top_k`` for both
models, over row ranges of both logit tensors, with the caller's checkpoint between ranges and
sizes the servicer reserves before it computes. Pure torch.

Rows are positions (one position's V logits of each model, ``lossd_client.layout.logits_rows``);
a request is evaluated whole (:meth:`ComparisonPlan.evaluate_rows` over every row) or as the row
chunks CompareChunked streams, then :meth:`ComparisonPlan.finish` joins the ranges in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import compare as cmp
from .dtypes import itemsize
from .spec import DEFAULT_CHUNK_BYTES, oversized_row_nbytes

#: Row-sized temporaries of a comparison chunk, with a margin: both models' rows upcast, normalised and
#: exponentiated, their products and torch's own (a 15-million-class comparison peaked at about
#: ten rows of float32).
COMPARE_ROW_COPIES = 12

Checkpoint = Callable[[], None] | None

#: Bytes of the answer per position besides the float outputs: argmax_agree and counted (bools).
FLAG_BYTES = 2


@dataclass
class ComparisonPart:
    """Rows ``[partial.row_start, partial.row_stop)``: the per-token values and, with top_k, each
    model's top classes (``(rows, k)``)."""

    partial: cmp.ComparePartial
    reference_top_k: cmp.TopK | None = None
    candidate_top_k: cmp.TopK | None = None


@dataclass
class Comparison:
    """Every row: the per-token values shaped like the targets, and each model's top classes
    shaped ``(*token_shape, k)`` (None without top_k)."""

    result: cmp.CompareResult
    reference_top_k: cmp.TopK | None = None
    candidate_top_k: cmp.TopK | None = None


def plan_comparison(*logits: Any, top_k: int = 0, max_top_k: int = 0, **options: Any) -> ComparisonPlan:
    """Validate a comparison, :func:`.compare.plan_compare`'s arguments (shapes, dtypes, target,
    ``ignore_index``, ``shift_targets``), and its ``top_k`` (InvalidInput naming ``options.top_k``
    past ``max_top_k`` or the vocabulary)."""
    plan = cmp.plan_compare(*logits, **options)
    cmp.check_top_k(top_k, max_k=max_top_k, vocab=plan.vocab)
    return ComparisonPlan(plan, top_k)


@dataclass(frozen=True, eq=False)
class ComparisonPlan:
    """A validated comparison and its ``top_k``."""

    plan: cmp.ComparePlan
    top_k: int = 0

    @property
    def rows(self) -> int:
        return self.plan.rows

    def row_bytes(self) -> tuple[int, int]:
        """Bytes of one row of the reference's and of the candidate's logits."""
        return self.plan.vocab * itemsize(self.plan.reference_dtype), self.plan.vocab * itemsize(self.plan.candidate_dtype)

    def _row_answer_bytes(self) -> int:
        """Answer bytes per position: the float outputs, the flags and both models' top-k."""
        floats = 1 + (len(cmp.TARGET_OUTPUTS) if self.plan.has_targets else 0)
        top_k = 2 * self.top_k * (8 + itemsize(self.plan.compute_dtype))
        return floats * itemsize(self.plan.compute_dtype) + FLAG_BYTES + top_k

    def plan_nbytes(self) -> int:
        """What the plan holds besides the logits: the int64 targets (and their shifted copy while
        it is made) and the counted mask."""
        return self.rows * ((8 + 8 if self.plan.has_targets else 0) + 1)

    def answer_nbytes(self) -> int:
        """An upper bound of the encoded answer."""
        return 4096 + self.rows * self._row_answer_bytes()

    def working_nbytes(self) -> int:
        """What evaluation keeps before the answer is encoded: the values of every row range and
        their concatenation (float64 targets are held by the plan, counted in its header)."""
        row_bytes = self.plan.vocab * itemsize(self.plan.compute_dtype)
        return 2 * self.rows * self._row_answer_bytes() + oversized_row_nbytes(self.rows, row_bytes, COMPARE_ROW_COPIES)

    def evaluate_rows(self, reference: torch.Tensor, candidate: torch.Tensor, row_start: int, *, device: torch.device | str = "cpu",
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES, checkpoint: Checkpoint = None) -> ComparisonPart:  # fmt: skip
        """Rows ``[row_start, row_start + n)`` of both models, ``(n, V)`` each, compared a bounded
        range at a time (``chunk_bytes`` of compute-dtype logits per model); ``checkpoint`` is
        called before each range. Raises InvalidInput when the rows do not fit the plan."""
        n = reference.shape[0]
        step = self.plan.rows_per_chunk(chunk_bytes)
        parts = []
        for a in range(0, max(n, 1), step):  # zero rows: one empty range, for its empty outputs
            if checkpoint is not None:
                checkpoint()
            parts.append(self._range(reference[a : a + step], candidate[a : a + step], row_start + a, device, chunk_bytes))
        return parts[0] if len(parts) == 1 else merge_parts(parts)

    def _range(self, reference: torch.Tensor, candidate: torch.Tensor, row_start: int, device, chunk_bytes: int) -> ComparisonPart:
        partial = cmp.compare_rows(self.plan, reference, candidate, row_start, device=device, chunk_bytes=chunk_bytes)
        if not self.top_k:
            return ComparisonPart(partial)
        k = self.top_k
        return ComparisonPart(
            partial,
            cmp.top_k(reference, k, max_k=k, device=device, chunk_bytes=chunk_bytes),
            cmp.top_k(candidate, k, max_k=k, device=device, chunk_bytes=chunk_bytes),
        )

    def empty_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero rows of each model (what a comparison without positions evaluates)."""
        vocab = self.plan.vocab
        return torch.empty(0, vocab, dtype=self.plan.reference_dtype), torch.empty(0, vocab, dtype=self.plan.candidate_dtype)

    def finish(self, parts: Sequence[ComparisonPart]) -> Comparison:
        """Join the parts covering every row, in order, shaped like the targets."""
        if not parts:
            parts = [self.evaluate_rows(*self.empty_rows(), 0)]
        whole = merge_parts(parts) if len(parts) > 1 else parts[0]
        result = cmp.finish_compare(self.plan, whole.partial)
        shape = (*self.plan.token_shape, self.top_k)
        if whole.reference_top_k is None:
            return Comparison(result)
        return Comparison(result, _shaped(whole.reference_top_k, shape), _shaped(whole.candidate_top_k, shape))

    def evaluate(self, reference: torch.Tensor, candidate: torch.Tensor, *, device: torch.device | str = "cpu",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, checkpoint: Checkpoint = None) -> Comparison:  # fmt: skip
        """Compare two whole logit tensors (the unary path)."""
        rows = (self.plan.row_view(reference), self.plan.row_view(candidate))
        return self.finish([self.evaluate_rows(*rows, 0, device=device, chunk_bytes=chunk_bytes, checkpoint=checkpoint)])


def _shaped(top: cmp.TopK, shape: tuple[int, ...]) -> cmp.TopK:
    return cmp.TopK(top.ids.reshape(shape), top.logprobs.reshape(shape))


def _joined(tops: list[cmp.TopK | None]) -> cmp.TopK | None:
    if tops[0] is None:
        return None
    return cmp.TopK(torch.cat([t.ids for t in tops]), torch.cat([t.logprobs for t in tops]))


def merge_parts(parts: Sequence[ComparisonPart]) -> ComparisonPart:
    """Concatenate parts of consecutive row ranges (in order)."""
    return ComparisonPart(
        cmp.merge_compare_partials([p.partial for p in parts]),
        _joined([p.reference_top_k for p in parts]),
        _joined([p.candidate_top_k for p in parts]),
    )
