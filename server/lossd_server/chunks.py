"""EvaluateChunked without gRPC: a header becomes a validated plan, each message a range of rows.

:class:`ChunkAssembler` checks every message of one chunked call exactly as the unary path
checks a request (INVALID_ARGUMENT for every client mistake, naming the header's field where the
unary request's has another name: :mod:`.header_fields`) and hands out :class:`RowChunk` values,
in order, for the engine; it computes nothing itself and holds only the header's target. The
servicer drives it (reading, budgeting, scheduling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client.layout import input_rows_are_output_rows, target_travels_with_rows

from . import codec, convert, engine, header_fields
from .wire import WireChunk, WireHeader


@dataclass(slots=True)
class RowChunk:
    """Input units ``[start, start + len(x_units))`` in the plan's unit layout (views of the message)."""

    start: int
    x_units: torch.Tensor
    target_units: torch.Tensor | None


class ChunkAssembler:
    """One EvaluateChunked call: ``rows(message)`` for every message, then ``finish(partials)``."""

    def __init__(self, header: WireHeader, shm_reader=None) -> None:
        with header_fields.named_in(pb.ChunkHeader.DESCRIPTOR):  # the unary checks name EvaluateRequest's fields
            self._open(header, shm_reader)

    def _open(self, header: WireHeader, shm_reader) -> None:
        spec, weight, pos_weight = convert.decode_options(header.options, shm_reader)
        self.id = header.id
        self.input_dtype = codec.dtype_field("header.input_dtype", header.input_dtype)
        self.input_shape = codec.shape_field("header.input_shape", header.input_shape)
        input_nbytes = math.prod(self.input_shape) * codec.ITEMSIZE[header.input_dtype]
        if input_nbytes > codec.MAX_TENSOR_BYTES:
            raise engine.InvalidInput(
                "header.input_shape", f"{list(self.input_shape)} is {input_nbytes} bytes, more than any tensor may hold"
            )
        if header.target is None:
            raise engine.InvalidInput("header.target", "is missing")
        target_dtype, target_shape, target_nbytes = codec.expected_nbytes("header.target", header.target)
        self.streamed = target_nbytes > 0 and target_travels_with_rows(spec.loss, self.input_shape, target_shape)
        if self.streamed:
            if len(header.target.data) or header.target.shm is not None:
                raise engine.InvalidInput(
                    "header.target.data",
                    "a target shaped like the input (class probabilities, BCE targets) travels in target_rows with the input rows; "
                    f"the header carries only its dtype and shape, got {len(header.target.data)} bytes of data"
                    + (" and a shm reference" if header.target.shm is not None else ""),
                )
        if self.streamed or not input_rows_are_output_rows(spec.loss, self.input_shape, target_shape):
            # only its dtype and shape are read (an input kl_div broadcasts along the rows is refused
            # once validated, whatever data its target brought: see _whole_target_units)
            target = torch.empty(target_shape, dtype=target_dtype, device="meta")
        else:
            target = codec.decode("header.target", header.target, shm_reader)
        self.plan = engine.plan(spec, self.input_shape, self.input_dtype, target, weight, pos_weight, target_streamed=self.streamed)
        self._header_target_units = self._whole_target_units(target)
        self.target_dtype = target_dtype
        self.unit_shape = self.plan.geometry.unit_shape
        self.in_unit_bytes = self.plan.geometry.unit_elements * codec.ITEMSIZE[header.input_dtype]
        self.target_unit_bytes = self.plan.geometry.unit_elements * codec.ITEMSIZE[header.target.dtype] if self.streamed else 0
        self.next_unit = 0

    def _whole_target_units(self, target: torch.Tensor) -> torch.Tensor | None:
        """A target that came whole in the header, as units to slice with the input's rows (None for
        class indices, which the plan holds, and for targets streamed in target_rows)."""
        plan = self.plan
        if plan.kind is engine.TargetKind.KL:
            if not input_rows_are_output_rows(plan.spec.loss, self.input_shape, target.shape):
                raise engine.InvalidInput(
                    "header.input_shape",
                    f"the input {list(self.input_shape)} is broadcast along the rows of the target {list(target.shape)}: "
                    "it has no rows of the result to stream; send the request whole with Evaluate",
                )
            return None if self.streamed else plan.target_rows(target)
        # an empty target shaped like the input came whole in the header (zero bytes): its units
        return plan.unit_view(target) if plan.kind is not engine.TargetKind.CLASS and not self.streamed else None

    def work_nbytes(self, chunk: WireChunk) -> int:
        """What evaluating a message costs, in input bytes of a loss evaluation (the unit of
        ``inline_batch_bytes``): its row bytes, or its rows' share of the plan's work when that is
        more, as a unary request's (Plan.work_nbytes). A kl_div target broadcast along 8192
        one-element rows is 98 KB of request and 512 MiB of output; counted by its bytes, such a
        chunk was computed on the event loop, which answered no health check for 1.1 s per call."""
        nbytes = len(chunk.input_rows) + len(chunk.target_rows)
        plan = self.plan
        if not plan.units:
            return nbytes
        units = plan.units if self.in_unit_bytes == 0 else len(chunk.input_rows) // self.in_unit_bytes
        return max(nbytes, -(-plan.work_nbytes * units // plan.units))

    def rows(self, chunk: WireChunk, *, first: bool = False) -> RowChunk | None:
        """The rows a message carries (None when it carries none); raises InvalidInput."""
        if chunk.header is not None and not first:
            raise engine.InvalidInput("header", "only the first EvaluateChunk may carry a header")
        plan = self.plan
        rows, target_rows = chunk.input_rows, chunk.target_rows
        n_in = len(rows)
        if self.in_unit_bytes == 0:
            # units without elements: a message without bytes carries all of them at once
            n_units = plan.units - self.next_unit if n_in == 0 else -1
        elif n_in % self.in_unit_bytes:
            raise engine.InvalidInput("input_rows", f"holds {n_in} bytes, not a whole number of rows of {self.in_unit_bytes} bytes")
        else:
            n_units = n_in // self.in_unit_bytes
        if n_units < 0 or self.next_unit + n_units > plan.units:
            raise engine.InvalidInput("input_rows", f"more rows than the header's input_shape {list(self.input_shape)} holds")
        if self.streamed and len(target_rows) != n_units * self.target_unit_bytes:
            raise engine.InvalidInput(
                "target_rows", f"expected {n_units * self.target_unit_bytes} bytes for {n_units} rows, got {len(target_rows)}"
            )
        if not self.streamed and len(target_rows):
            raise engine.InvalidInput("target_rows", "class-index targets travel whole in the header")
        if n_units == 0:
            return None
        x = codec.from_buffer("input_rows", rows, self.input_dtype, (n_units, *self.unit_shape))
        tu = codec.from_buffer("target_rows", target_rows, self.target_dtype, (n_units, *self.unit_shape)) if self.streamed else None
        start = self.next_unit
        self.next_unit += n_units
        if self._header_target_units is not None:
            return RowChunk(start, plan.unit_view(x), self._header_target_units[start : start + n_units])
        return RowChunk(start, plan.unit_view(x), None if tu is None else plan.unit_view(tu))

    def evaluate(
        self, chunk: RowChunk, *, device: torch.device, chunk_bytes: int, checkpoint: Callable[[], None] | None = None
    ) -> engine.Partial:
        """Evaluate one RowChunk (on an engine thread)."""
        return self.plan.evaluate_units(
            chunk.x_units, chunk.start, target_units=chunk.target_units, device=device, chunk_bytes=chunk_bytes, checkpoint=checkpoint
        )

    def check_complete(self) -> None:
        if self.next_unit != self.plan.units:
            raise engine.InvalidInput(
                "input_rows", f"received {self.next_unit} of {self.plan.units} rows of the header's input_shape {list(self.input_shape)}"
            )

    def finish(self, partials: Sequence[engine.Partial]) -> engine.LossResult:
        """What torch returns for the whole input (on an engine thread)."""
        partial = engine.merge_partials(partials) if partials else self.plan.empty_partial()
        return self.plan.finish(partial)
