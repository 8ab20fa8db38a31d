"""kl_div as an engine loss: a validated :class:`~.kl_div.KlDivPlan` behind the interface that the
batcher, the servicer and the chunk assembler use for every loss (:class:`KlDivLossPlan`).

The units are the rows of the broadcast output (its dim 0; a 0-dim output is one unit), and the
unit of an input is its row too (``lossd_client.layout.row_shape``: dim 0, as for BCE), so an
input whose dim 0 is the output's streams through EvaluateChunked row by row with a target shaped
like it (``target_rows``) or a target sent whole in the header (broadcast along the rows, or
merely of another shape). An operand broadcast along dim 0 is handed to the kernel as
``operand.expand(output_shape)``: a view, not a copy, whose elements are the broadcast's, so every
per-element loss is the one torch computes. An input broadcast along dim 0 has no rows of the
output to stream: such a request is evaluated whole (Evaluate), never chunked.

Rows are evaluated a bounded range at a time (``chunk_bytes`` of compute-dtype elements), with the
caller's checkpoint between ranges; the float64 sum of the elements is ``loss_sum`` and the
denominator torch divides it by (elements for 'mean', ``input.size(0)`` for 'batchmean', 1 for
'sum') is ``weight_sum``, so kl_div results combine across requests exactly like the other losses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lossd_client import layout

from . import kl_div
from .dtypes import itemsize
from .results import LossResult, Partial, merge_partials
from .spec import ANSWER_OVERHEAD_BYTES, DEFAULT_CHUNK_BYTES, InvalidInput, LossSpec, TargetKind

Checkpoint = Callable[[], None] | None


@dataclass(frozen=True)
class RowGeometry:
    """What the chunk assembler reads of a plan's geometry: the shape of one input row."""

    unit_shape: tuple[int, ...]

    @property
    def unit_elements(self) -> int:
        """Input elements per row."""
        return math.prod(self.unit_shape)


def _check_options(spec: LossSpec, weight: torch.Tensor | None, pos_weight: torch.Tensor | None) -> None:
    """torch's kl_div takes none of the other losses' options: each one set is rejected by name."""
    unexpected = (
        ("options.weight", weight is not None, "weight"),
        ("options.pos_weight", pos_weight is not None, "pos_weight"),
        ("options.label_smoothing", spec.label_smoothing != 0.0, "label_smoothing"),
        ("options.ignore_index", spec.ignore_index != -100, "ignore_index"),
        ("options.class_axis", spec.class_axis is not None, "class_axis"),
        ("options.shift_targets", spec.shift_targets, "shift_targets"),
        ("options.extras", bool(spec.extras), "extras"),
        ("options.sequence_stats", spec.sequence_stats, "sequence_stats"),
    )
    for field, given, name in unexpected:
        if given:
            raise InvalidInput(field, f"kl_div() got an unexpected keyword argument '{name}' (it takes reduction and log_target only)")


def plan_kl(
    spec: LossSpec,
    input_shape: tuple[int, ...],
    input_dtype: torch.dtype,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
) -> KlDivLossPlan:
    """Validate a kl_div request as torch would (``target`` may be a meta tensor: only its shape
    and dtype are read); InvalidInput naming the field otherwise."""
    _check_options(spec, weight, pos_weight)
    call = kl_div.plan_kl_div(
        input_shape,
        input_dtype,
        tuple(target.shape),
        target.dtype,
        reduction=spec.reduction,
        log_target=spec.log_target,
        size_average=spec.size_average,
        reduce=spec.reduce,
    )
    rows_call = call
    if call.output_shape:  # both operands as rows of the output (see the module docstring)
        rows_call = dataclasses.replace(
            call,
            input_shape=call.input_shape if call.input_by_rows else call.output_shape,
            target_shape=call.target_shape if call.target_by_rows else call.output_shape,
            input_by_rows=True,
            target_by_rows=True,
        )
    return KlDivLossPlan(spec, call, rows_call)


@dataclass(frozen=True, eq=False)
class KlDivLossPlan:
    """A validated kl_div request: :class:`~.plan.Plan`'s interface over a :class:`~.kl_div.KlDivPlan`."""

    spec: LossSpec
    #: torch's call as validated (shapes, dtypes, reduction, warnings).
    call: kl_div.KlDivPlan
    #: The same call with both operands viewed as rows of the output (what the kernel is given).
    rows_call: kl_div.KlDivPlan
    kind: TargetKind = TargetKind.KL

    # ------------------------------------------------------------------ what callers read
    @property
    def input_nbytes(self) -> int:
        return math.prod(self.call.input_shape) * itemsize(self.call.input_dtype)

    @functools.cached_property
    def work_nbytes(self) -> int:
        """What an evaluation reads or writes, in bytes, for choosing where it runs: the input, or
        the broadcast output's elements when they are more (a 512 KB request of [65536, 1] against
        [1, 65536] is 4.3 billion elements, 31 s of compute: refused over max_broadcast_elements)."""
        return max(self.input_nbytes, self.call.numel * itemsize(self.call.output_dtype))

    @property
    def broadcast_elements(self) -> int:
        """The broadcast output's elements when they are more than the larger operand's (work the
        request's bytes do not bound: [2**20, 1] against [1, 2**20] is 1.1e12 elements), else 0."""
        larger = max(math.prod(self.call.input_shape), math.prod(self.call.target_shape))
        return self.call.numel if self.call.numel > larger else 0

    @property
    def rows(self) -> int:
        """Rows of the broadcast output: the plan's units."""
        return self.call.rows

    units = rows

    @property
    def geometry(self) -> RowGeometry:
        return RowGeometry(layout.row_shape(layout.KL_DIV, self.call.input_shape))

    @property
    def unit_elements(self) -> int:
        return self.geometry.unit_elements

    def needs_losses(self) -> bool:
        return self.call.reduction == "none"

    def answer_nbytes(self) -> int:
        """An upper bound of the encoded answer: the per-element losses for 'none'."""
        return ANSWER_OVERHEAD_BYTES + (self.call.numel * itemsize(self.call.output_dtype) if self.needs_losses() else 0)

    def working_nbytes(self) -> int:
        """The per-element losses of every row range and their concatenation, for 'none'."""
        return 2 * self.call.numel * itemsize(self.call.output_dtype) if self.needs_losses() else 0

    # ------------------------------------------------------------------ operands as rows
    def unit_view(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of the input (or of a target shaped like it) as they are: ``(rows, *row shape)``."""
        return x

    def input_rows(self, input: torch.Tensor) -> torch.Tensor:
        """The whole input as rows of the output (broadcast along dim 0 by a view)."""
        return input if not self.call.output_shape or self.call.input_by_rows else input.expand(self.call.output_shape)

    def target_rows(self, target: torch.Tensor) -> torch.Tensor:
        """A whole target as rows of the output (broadcast along dim 0 by a view)."""
        return target if not self.call.output_shape or self.call.target_by_rows else target.expand(self.call.output_shape)

    # ------------------------------------------------------------------ evaluation
    def evaluate_units(self, x_units: torch.Tensor, unit_start: int, *, target_units: torch.Tensor | None = None,
                       device: torch.device | str = "cpu", chunk_bytes: int = DEFAULT_CHUNK_BYTES, checkpoint: Checkpoint = None) -> Partial:  # fmt: skip
        """Output rows ``[unit_start, unit_start + len(x_units))`` from those rows of both operands
        (see :meth:`input_rows`, :meth:`target_rows`), a bounded range at a time; ``checkpoint``
        is called before each range. torch errors become InvalidInput."""
        if target_units is None:
            raise InvalidInput("target", "kl_div needs a target")
        if not self.call.output_shape:  # one 0-dim row: the operands whole
            if checkpoint is not None:
                checkpoint()
            return self._partial(self.call, x_units.reshape(()), target_units.reshape(()), unit_start, device, chunk_bytes)
        n = x_units.shape[0]
        row_elements = self.call.row_elements
        if n == 0 or row_elements == 0:
            return self.empty_partial(unit_start, n)
        step = max(1, chunk_bytes // (row_elements * itemsize(self.call.compute_dtype)))
        parts = []
        for a in range(0, n, step):
            if checkpoint is not None:
                checkpoint()
            b = min(n, a + step)
            parts.append(self._partial(self.rows_call, x_units[a:b], target_units[a:b], unit_start + a, device, chunk_bytes))
        return merge_partials(parts) if len(parts) > 1 else parts[0]

    def _partial(self, call: kl_div.KlDivPlan, x: torch.Tensor, t: torch.Tensor, row_start: int, device, chunk_bytes: int) -> Partial:
        try:
            part = kl_div.evaluate_kl_div_rows(call, x, t, row_start, device=device, chunk_bytes=chunk_bytes)
        except (RuntimeError, IndexError, ValueError) as exc:
            if isinstance(exc, InvalidInput):
                raise
            raise InvalidInput("input", f"torch rejected the request: {exc}") from None
        losses = None if part.losses is None else part.losses.reshape(-1)
        return Partial(part.row_start, part.row_stop, losses, part.loss_sum, 0.0, part.numel)

    def empty_partial(self, unit_start: int = 0, units: int = 0) -> Partial:
        """``units`` rows without elements (or no rows)."""
        losses = torch.empty(0, dtype=self.call.output_dtype) if self.needs_losses() else None
        return Partial(unit_start, unit_start + units, losses, 0.0, 0.0, 0)

    def finish(self, partial: Partial) -> LossResult:
        """What torch returns for the partial covering every row; ``weight_sum`` is the denominator."""
        losses = partial.losses if self.needs_losses() else None
        if losses is not None and not self.call.output_shape:
            losses = losses.reshape(())
        whole = kl_div.KlDivPartial(partial.unit_start, partial.unit_stop, losses, partial.loss_sum, partial.counted)
        result = kl_div.finish_kl_div(self.call, whole)
        return LossResult(result.loss, result.loss_sum, result.denominator, result.numel)

    def run(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        *,
        device: torch.device | str = "cpu",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        checkpoint: Checkpoint = None,
    ) -> LossResult:
        """Evaluate the whole request (the unary path)."""
        partial = self.evaluate_units(
            self.input_rows(input),
            0,
            target_units=self.target_rows(target),
            device=device,
            chunk_bytes=chunk_bytes,
            checkpoint=checkpoint,
        )
        return self.finish(partial)
