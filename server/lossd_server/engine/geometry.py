"""Where the classes are, and what a unit and a row are, for one input shape.

A *unit* is one leading position before the class axis: one row of C logits when the classes
are the last axis, one (C, d1..dk) slab in torch's (N, C, d1..dk) layout, one leading slice for
BCE. Inputs are walked in units (they are contiguous in memory in every layout) and computed as
*rows*: (rows, C) matrices with one row per loss position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from lossd_client import layout

from .scratch import upcast
from .spec import InvalidInput, TargetKind


def class_axis_of(input_shape: tuple[int, ...], class_axis: int | None) -> int:
    """The class axis of a cross_entropy / nll_loss input, normalised; InvalidInput when out of range."""
    try:
        return layout.resolve_class_axis(len(input_shape), class_axis)
    except ValueError as exc:
        raise InvalidInput("options.class_axis", str(exc)) from None


def torch_layout(shape: tuple[int, ...], class_axis: int) -> tuple[int, ...]:
    """The shape an input (or a target shaped like it) would have with the classes on torch's axis."""
    out = list(shape)
    if class_axis != layout.default_class_axis(len(out)) and len(out) > 1:
        out.insert(1, out.pop(class_axis))
    return tuple(out)


@dataclass(frozen=True)
class Geometry:
    """The unit and row layout of one input."""

    input_shape: tuple[int, ...]
    kind: TargetKind
    class_axis: int
    num_classes: int
    units: int
    unit_positions: int  # rows per unit

    @classmethod
    def of(cls, input_shape: tuple[int, ...], kind: TargetKind, class_axis: int) -> Geometry:
        """The layout of an input whose classes are on ``class_axis`` (ignored for BCE); its units
        are lossd_client.layout's rows, the rule by which EvaluateChunked's client cuts them."""
        if kind is TargetKind.BCE:
            units, per_unit = layout.rows(layout.BCE_WITH_LOGITS, input_shape)
            return cls(input_shape, kind, 1 if len(input_shape) > 1 else 0, 1, units, per_unit)
        units, _ = layout.rows(layout.CROSS_ENTROPY, input_shape, class_axis)
        return cls(input_shape, kind, class_axis, input_shape[class_axis], units, math.prod(input_shape[class_axis + 1 :]))

    @property
    def rows(self) -> int:
        return self.units * self.unit_positions

    @property
    def kdim(self) -> bool:
        """Class indices with positions after the class axis, torch's (N, C, d1..dk) layout (even
        when every d is 1): torch's kernel there runs along a strided class axis, not over rows."""
        return self.kind is not TargetKind.BCE and 0 < self.class_axis < len(self.input_shape) - 1

    @property
    def unit_elements(self) -> int:
        """Input elements per unit."""
        if self.kind is TargetKind.BCE:
            return self.unit_positions
        return self.unit_positions * self.num_classes

    @property
    def unit_shape(self) -> tuple[int, ...]:
        """Shape of one unit of the input, in its own layout."""
        if self.kind is TargetKind.BCE:
            return layout.row_shape(layout.BCE_WITH_LOGITS, self.input_shape)
        return layout.row_shape(layout.CROSS_ENTROPY, self.input_shape, self.class_axis)

    def units_per_chunk(self, chunk_bytes: int, compute_dtype: torch.dtype) -> int:
        per_unit = max(1, self.unit_elements) * (8 if compute_dtype == torch.float64 else 4)
        return max(1, chunk_bytes // per_unit)

    def unit_view(self, x: torch.Tensor) -> torch.Tensor:
        """View the input (or a unit-range slice of it) as (units, C, positions) / (units, positions)."""
        if self.kind is TargetKind.BCE:
            if x.dim() == 0:
                return x.reshape(1, 1)
            return x.reshape(self._leading_units(x, 1), self.unit_positions)
        return x.reshape(self._leading_units(x, self.class_axis), self.num_classes, self.unit_positions)

    def _leading_units(self, x: torch.Tensor, axis: int) -> int:
        """Units in ``x``: the whole input (dims before ``axis``) or a (units, *unit) slice.

        Counted from the shape because reshape(-1, ...) is ambiguous for empty tensors.
        """
        lead = x.dim() - (len(self.input_shape) - axis)
        return math.prod(x.shape[:lead])

    def rows_of(self, xu: torch.Tensor, device, compute_dtype: torch.dtype, *, reuse: bool = False) -> torch.Tensor:
        """(units, C, positions) -> contiguous (rows, C) in the compute dtype on device.

        ``reuse``: the rows may live in a scratch buffer (see :func:`~.scratch.upcast`).
        """
        if xu.device != device:
            xu = xu.to(device=device, non_blocking=True)
        if self.unit_positions != 1:
            xu = xu.transpose(1, 2)
        rows = xu.reshape(xu.shape[0] * self.unit_positions, self.num_classes)
        return rows if rows.dtype == compute_dtype else upcast(rows, compute_dtype, reuse=reuse)
