"""CompareChunked without gRPC: a CompareHeader becomes a validated comparison, each CompareChunk
the same range of rows of both models.

:class:`CompareAssembler` checks every message of one call as the unary Compare checks a request
(INVALID_ARGUMENT for every client mistake, naming the header's field where the unary request's
has another name: :mod:`.header_fields`), hands out :class:`CompareRows` in order and evaluates
them; it holds only the header's target. It has the interface the servicer's chunk loop drives
(``rows``, ``work_nbytes``, ``evaluate``, ``check_complete``, ``finish``), the one
EvaluateChunked's :class:`~lossd_server.chunks.ChunkAssembler` has.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client.layout import ITEMSIZE

from . import codec, compare_convert, engine, header_fields
from .engine import comparison
from .wire import WireCompareChunk, WireCompareHeader

#: Compute per logit byte of a comparison over that of a loss evaluation: two log-softmaxes, the KL
#: and two argmaxes against one fused cross_entropy (measured in-process, one torch thread, 2048x32000
#: bf16 twice: compare 1.0 s, cross_entropy over the same 262 MB 0.32-0.35 s; about 3, rounded up).
#: Small work is computed on the event loop, larger on an engine thread (batcher.compute_soon): a
#: 1 MiB compare message takes ~7 ms, and computed on the event loop the server's memory grew by
#: nearly the whole request while gRPC kept receiving (228 MiB for 262 MB; 14-24 MiB on a thread).
COMPARE_COST = 4


@dataclass(slots=True)
class CompareRows:
    """Rows ``[start, start + len(reference))`` of both models, ``(rows, V)`` views of the message."""

    start: int
    reference: torch.Tensor
    candidate: torch.Tensor


def _logits(name: str, wire_dtype: int, shape: tuple[int, ...]) -> tuple[torch.dtype, tuple[int, ...]]:
    """One model's dtype and shape from the header's fields for them (``name``: "reference";
    errors name "header.reference_dtype" / "header.reference_shape", as the EvaluateChunked
    header's name "header.input_dtype")."""
    dtype = codec.dtype_field(f"header.{name}_dtype", wire_dtype)
    dims = codec.shape_field(f"header.{name}_shape", shape)
    nbytes = math.prod(dims) * ITEMSIZE[wire_dtype]
    if nbytes > codec.MAX_TENSOR_BYTES:
        raise engine.InvalidInput(f"header.{name}_shape", f"{list(dims)} is {nbytes} bytes, more than any tensor may hold")
    return dtype, dims


class CompareAssembler:
    """One CompareChunked call: ``rows(message)`` for every message, then ``finish(parts)``."""

    def __init__(self, header: WireCompareHeader, shm_reader=None, *, max_top_k: int = 0) -> None:
        self.id = header.id
        ref_dtype, ref_shape = _logits("reference", header.reference_dtype, header.reference_shape)
        cand_dtype, cand_shape = _logits("candidate", header.candidate_dtype, header.candidate_shape)
        target = None if header.target is None else codec.decode("header.target", header.target, shm_reader)
        with header_fields.named_in(pb.CompareHeader.DESCRIPTOR):  # plan_comparison names CompareRequest's fields
            self.plan = comparison.plan_comparison(
                ref_shape, ref_dtype, cand_shape, cand_dtype, target, **compare_convert.options(header.options, max_top_k)
            )
        self.dtypes = (ref_dtype, cand_dtype)
        self.row_bytes = self.plan.row_bytes()
        self.next_row = 0

    def work_nbytes(self, chunk: WireCompareChunk) -> int:
        """What comparing a message's rows costs, in input bytes of a loss evaluation (the unit of
        ``inline_batch_bytes``): :data:`COMPARE_COST` times its logit bytes."""
        return COMPARE_COST * (len(chunk.reference_rows) + len(chunk.candidate_rows))

    def rows(self, chunk: WireCompareChunk, *, first: bool = False) -> CompareRows | None:
        """The rows a message carries (None when it carries none); raises InvalidInput."""
        if chunk.header is not None and not first:
            raise engine.InvalidInput("header", "only the first CompareChunk may carry a header")
        counts = []
        for field, data, row_bytes in (("reference_rows", chunk.reference_rows, self.row_bytes[0]), ("candidate_rows", chunk.candidate_rows, self.row_bytes[1])):  # fmt: skip
            if len(data) % row_bytes:
                raise engine.InvalidInput(field, f"holds {len(data)} bytes, not a whole number of rows of {row_bytes} bytes")
            counts.append(len(data) // row_bytes)
        n = counts[0]
        if counts[1] != n:
            raise engine.InvalidInput(
                "candidate_rows", f"holds {counts[1]} rows, the message's reference_rows {n}: send the same rows of both"
            )
        if self.next_row + n > self.plan.rows:
            raise engine.InvalidInput("reference_rows", f"more rows than the header's reference_shape {list(self.plan.plan.shape)} holds")
        if n == 0:
            return None
        vocab = self.plan.plan.vocab
        ref = codec.from_buffer("reference_rows", chunk.reference_rows, self.dtypes[0], (n, vocab))
        cand = codec.from_buffer("candidate_rows", chunk.candidate_rows, self.dtypes[1], (n, vocab))
        start, self.next_row = self.next_row, self.next_row + n
        return CompareRows(start, ref, cand)

    def evaluate(
        self, rows: CompareRows, *, device: torch.device, chunk_bytes: int, checkpoint: Callable[[], None] | None = None
    ) -> comparison.ComparisonPart:
        """Compare one range of rows (on an engine thread, or inline when it is small)."""
        return self.plan.evaluate_rows(
            rows.reference, rows.candidate, rows.start, device=device, chunk_bytes=chunk_bytes, checkpoint=checkpoint
        )

    def check_complete(self) -> None:
        if self.next_row != self.plan.rows:
            raise engine.InvalidInput(
                "reference_rows",
                f"received {self.next_row} of {self.plan.rows} rows of the header's reference_shape {list(self.plan.plan.shape)}",
            )

    def finish(self, parts: Sequence[comparison.ComparisonPart]) -> comparison.Comparison:
        """The whole comparison (on an engine thread)."""
        return self.plan.finish(parts)
