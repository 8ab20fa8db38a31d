"""A validated request: every decision about it, made once, and the walk over its input.

A :class:`Plan` is immutable; :func:`~.validate.build_plan` makes it after checking shapes,
dtypes, options and class-index target values exactly as torch checks them. The input values
are read only by :meth:`Plan.evaluate_units`, which walks them in chunks of units sized from a
byte budget, so half-precision input is upcast one chunk at a time and no full-size float32
copy or full-size log_softmax is ever made.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import finish as _finish
from . import kernels
from .dtypes import itemsize
from .geometry import Geometry
from .results import LossResult, Partial, merge_partials
from .spec import (
    ANSWER_OVERHEAD_BYTES,
    DEFAULT_CHUNK_BYTES,
    ELEMENTWISE_CHUNK_BYTES,
    EXTRA_DTYPES,
    InvalidInput,
    LossSpec,
    TargetKind,
    oversized_row_nbytes,
)

#: Row-sized temporaries of a loss chunk: the upcast rows, their log-probabilities, torch's own.
LOSS_ROW_COPIES = 4

#: Encoded bytes per sequence: nll_sum, mean_nll and perplexity doubles, a tokens varint, a bool.
SEQUENCE_STAT_BYTES = 3 * 8 + 10 + 1
#: What computing and encoding the statistics holds per sequence beside the answer's copies: the
#: weight sum and the five values (8 bytes each but the flag), the zero-filled terms of an empty
#: target, and one field's values as Python floats while it is encoded (32 bytes each).
SEQUENCE_WORK_BYTES = 6 * 8 + 8 + 1 + 1 + 32

Checkpoint = Callable[[], None] | None


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything about a request but the bulk input values."""

    spec: LossSpec
    kind: TargetKind
    geometry: Geometry
    input_dtype: torch.dtype
    target_shape: tuple[int, ...]
    target_dtype: torch.dtype
    output_shape: tuple[int, ...]
    output_dtype: torch.dtype
    compute_dtype: torch.dtype
    weight: torch.Tensor | None = None
    pos_weight: torch.Tensor | None = None
    target: torch.Tensor | None = None  # class indices: flat int64, shifted, ignored ones kept
    valid: torch.Tensor | None = None  # class indices: not ignored
    seq_len: int = 1  # class indices: positions per sequence (the target's last axis)
    target_weight_sum: float = 0.0  # class indices: Σ w[y] over the targets that count (float64)
    target_counted: int = 0  # class indices: targets that count

    @property
    def fused_kernel(self) -> bool:
        """Class indices evaluated by torch's own fused cross_entropy / nll_loss kernel per chunk:
        no extras or sequence statistics (they need the log-probabilities), at least one class,
        and no label-smoothed mean (torch divides its two parts separately: both sums are kept)."""
        spec = self.spec
        return (
            self.kind is TargetKind.CLASS
            and not spec.extras
            and not spec.sequence_stats
            and self.num_classes > 0
            and not (spec.smoothing > 0.0 and spec.reduction == "mean")
        )

    # ------------------------------------------------------------------ geometry, for callers
    input_shape = property(lambda self: self.geometry.input_shape, doc="The input's shape.")
    num_classes = property(lambda self: self.geometry.num_classes, doc="C (1 for BCE).")
    units = property(lambda self: self.geometry.units, doc="Leading positions before the class axis.")
    rows = property(lambda self: self.geometry.rows, doc="Loss positions: units x positions per unit.")

    def unit_view(self, x: torch.Tensor) -> torch.Tensor:
        return self.geometry.unit_view(x)

    def rows_of(self, xu: torch.Tensor, device) -> torch.Tensor:
        """Units as (rows, C) in the compute dtype (a fresh tensor, never a scratch buffer)."""
        return self.geometry.rows_of(xu, device, self.compute_dtype)

    # ------------------------------------------------------------------ sizes
    @property
    def input_nbytes(self) -> int:
        return math.prod(self.input_shape) * itemsize(self.input_dtype)

    @functools.cached_property
    def work_nbytes(self) -> int:
        """What an evaluation reads or writes, in bytes, for choosing where it runs (on the event
        loop only when small): the input, or the answer when that is larger (the statistics of
        millions of empty sequences come from a request of a few bytes)."""
        return max(self.input_nbytes, self.answer_nbytes() - ANSWER_OVERHEAD_BYTES)

    @property
    def broadcast_elements(self) -> int:
        """The broadcast output's elements when they are more than the larger operand's: never for
        these losses (class targets index the input; probability and BCE targets are shaped like
        it, BCE's weight and pos_weight broadcast to it), see KlDivLossPlan.broadcast_elements."""
        return 0

    @property
    def sequences(self) -> int:
        """Rows of the target's last axis: the entries of the per-sequence statistics."""
        return math.prod(self.target_shape[:-1]) if self.target_shape else 1

    def needs_losses(self) -> bool:
        return self.spec.reduction == "none"

    def answer_nbytes(self) -> int:
        """An upper bound of the encoded answer: per-element losses, extras, sequence statistics."""
        size = ANSWER_OVERHEAD_BYTES
        if self.needs_losses():
            size += math.prod(self.output_shape) * itemsize(self.output_dtype)
        if self.kind is TargetKind.CLASS:
            targets = math.prod(self.target_shape)
            for name in self.spec.extras:
                size += targets * itemsize(EXTRA_DTYPES.get(name, self.compute_dtype))
            if self.spec.sequence_stats:
                size += self.sequences * SEQUENCE_STAT_BYTES
        return size

    def working_nbytes(self) -> int:
        """An upper bound of what evaluation keeps for the answer before it is encoded: the
        per-element tensors of every chunk, and their concatenation."""
        per_element = itemsize(self.compute_dtype) if self.needs_losses() else 0
        if self.kind is TargetKind.CLASS:
            per_element += sum(itemsize(EXTRA_DTYPES.get(name, self.compute_dtype)) for name in self.spec.extras)
            if self.spec.sequence_stats:
                per_element += 8 + 8 + 1 + 1  # float64 loss and weight, counted and greedy flags
        elements = math.prod(self.target_shape) if self.kind is TargetKind.CLASS else self.rows
        row_bytes = self.geometry.unit_elements * itemsize(self.compute_dtype)
        size = 2 * per_element * elements + oversized_row_nbytes(self.units, row_bytes, LOSS_ROW_COPIES)
        if self.kind is TargetKind.CLASS and self.spec.sequence_stats:
            size += self.sequences * SEQUENCE_WORK_BYTES  # millions of them from an empty target: [B, 0]
        return size

    # ------------------------------------------------------------------ evaluation
    def evaluate_units(
        self,
        x_units: torch.Tensor,
        unit_start: int,
        *,
        target_units: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        checkpoint: Checkpoint = None,
    ) -> Partial:
        """Evaluate the units ``[unit_start, unit_start + len(x_units))``.

        ``x_units`` is the input restricted to those units in (units, C, positions) layout (see
        :meth:`unit_view`); ``target_units`` likewise for probability / BCE targets.
        ``checkpoint`` is called before every chunk; it raises to abandon the evaluation (the
        caller went away or its deadline passed). torch errors become :class:`InvalidInput`.
        """
        n_units = x_units.shape[0]
        device = torch.device(device)
        if not self.geometry.unit_positions and n_units > 1:
            # Units without positions (a zero-size dimension after the class axis) hold no element
            # and no target, but torch's kernels still loop over them (nll_loss over 2**34 of them
            # took 2.5 s): one of them gets torch's verdict, and the others add nothing to it.
            one = None if target_units is None else target_units[:1]
            part = self.evaluate_units(
                x_units[:1], unit_start, target_units=one, device=device, chunk_bytes=chunk_bytes, checkpoint=checkpoint
            )
            return dataclasses.replace(part, unit_stop=unit_start + n_units)
        # Units without elements (no classes) cost nothing to evaluate, however many there are:
        # one step, never a loop over 2**62 empty units.
        if self.kind is TargetKind.BCE:
            chunk_bytes = min(chunk_bytes, ELEMENTWISE_CHUNK_BYTES)
        step = self.geometry.units_per_chunk(chunk_bytes, self.compute_dtype) if self.geometry.unit_elements else max(1, n_units)
        parts = []
        try:
            for u0 in range(0, n_units, step):
                if checkpoint is not None:
                    checkpoint()
                u1 = min(n_units, u0 + step)
                whole = u0 == 0 and u1 == n_units  # one chunk: no slicing
                xu = x_units if whole else x_units[u0:u1]
                tu = target_units if whole or target_units is None else target_units[u0:u1]
                parts.append(kernels.evaluate_chunk(self, xu, tu, unit_start + u0, device))
        except (RuntimeError, IndexError, ValueError) as exc:
            if isinstance(exc, InvalidInput):
                raise
            raise InvalidInput("input", f"torch rejected the request: {exc}") from None
        if not parts:
            return self.empty_partial(unit_start)
        return merge_partials(parts) if len(parts) > 1 else parts[0]

    def empty_partial(self, unit_start: int = 0) -> Partial:
        return Partial(unit_start, unit_start, torch.empty(0, dtype=self.compute_dtype), 0.0, 0.0, 0)

    def finish(self, partial: Partial) -> LossResult:
        """Turn the partial covering every unit into what torch returns."""
        return _finish.finish(self, partial)
