"""Comparing two models' logits token by token, without I/O (what ``client.compare`` sends and returns).

- requests: :class:`CompareInputs` (``client.compare``'s arguments), :func:`request` (one
  CompareRequest message) and :func:`payloads` (CompareChunked: a CompareHeader, then messages
  carrying the same whole rows of both logit tensors, cut by ``lossd_client.layout.logits_rows``);
- routing: :func:`route` picks CompareChunked above the server's message limit (or above
  ``chunked_above_bytes``), as :func:`lossd_client.core.route` does for Evaluate;
- answers: :func:`result` turns a CompareResponse, checked against its request
  (:func:`lossd_client.answers.comparison_answer`), into a :class:`CompareResult`: the dense arrays
  in the caller's kind (numpy in, numpy out; torch in, torch out), the float64 totals and the
  :func:`lossd_client.compare_stats.summarize` summary (llama.cpp's ``--kl-divergence`` statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from . import answers, core, layout, tensors
from ._proto.lossd.v1 import loss_pb2 as pb
from .compare_stats import CompareSummary, CompareTotals, summarize
from .errors import InvalidArgumentError

#: The dense per-position outputs, by name; the last five exist only with tokens.
DENSE_OUTPUTS = answers.DENSE_OUTPUTS

Progress = Callable[[int], None] | None


@dataclass
class CompareInputs:
    """What ``client.compare`` takes: two ``(..., V)`` logit tensors (class axis last) of the same
    shape, optional class-index ``tokens`` shaped like them without V, and the options."""

    reference: Any
    candidate: Any
    tokens: Any = None
    ignore_index: int = -100
    shift_targets: bool = False
    top_k: int = 0
    id: str = ""


@dataclass
class TopK:
    """One model's ``k`` most likely classes per position, most likely first (ties: lower id first):
    ``ids`` (int64) and their ``logprobs``, both shaped ``(..., k)``."""

    ids: Any
    logprobs: Any


@dataclass
class CompareResult:
    """A comparison: dense arrays shaped like the tokens (the logits without V), float64 totals that
    add up across requests (``compare_stats.combine_totals``), and the llama.cpp summary.

    ``kl`` is KL(reference || candidate) per position; ``argmax_agree`` whether both models' argmax
    agree; ``counted`` the positions that count (not ``ignore_index``, not the last one with
    ``shift_targets``): the others hold 0 / False. With tokens, ``p_ref`` / ``p_cand`` are the
    token's probability under each model, ``delta_p = p_cand - p_ref``, ``nll_ref`` / ``nll_cand``
    its negative log-likelihood (None without tokens). Float outputs are float32 (float64 when
    either model's logits are), never rounded to the logits' half precision.
    """

    kl: Any
    argmax_agree: Any
    counted: Any
    totals: CompareTotals
    summary: CompareSummary
    p_ref: Any = None
    p_cand: Any = None
    delta_p: Any = None
    nll_ref: Any = None
    nll_cand: Any = None
    reference_top_k: TopK | None = None
    candidate_top_k: TopK | None = None
    id: str = ""


# --------------------------------------------------------------------------- requests
#: The request field ``tokens`` is sent as (CompareRequest's and CompareHeader's ``target``), by the
#: argument's name: ``client.compare``'s errors name ``tokens`` (:func:`lossd_client.errors.caller_fields`).
CALLER_FIELDS = {"target": "tokens"}


def with_token_ids(inputs: CompareInputs) -> CompareInputs:
    """``inputs`` with tokens of any integer dtype as int64 ids (:func:`lossd_client.core.token_ids`,
    the LM helpers' rule: uint16, uint32, ... as tokenizers hand them out); other tokens as they are."""
    tokens = core.integer_token_ids(inputs.tokens, "target")
    return inputs if tokens is inputs.tokens else replace(inputs, tokens=tokens)


def _options(inputs: CompareInputs) -> pb.CompareOptions:
    # integers only, as perplexity's ignore_index: int() truncated 3.7 to 3 and parsed "3"
    ignore_index, top_k = core.integer_argument("ignore_index", inputs.ignore_index), core.integer_argument("top_k", inputs.top_k)
    if top_k < 0:
        raise InvalidArgumentError(f"options.top_k: must be >= 0, got {top_k}")
    if top_k >= 2**32:
        raise InvalidArgumentError(f"options.top_k: {top_k} is out of uint32 range")
    if not -(2**63) <= ignore_index < 2**63:
        raise InvalidArgumentError(f"options.ignore_index: {ignore_index} is out of int64 range")
    return pb.CompareOptions(
        ignore_index=ignore_index, shift_targets=core.flag_argument("shift_targets", inputs.shift_targets), top_k=top_k
    )


def request(inputs: CompareInputs) -> pb.CompareRequest:
    """One CompareRequest message."""
    msg = pb.CompareRequest(id=core.request_id(inputs.id), options=_options(inputs))
    with core.tensor_field("reference"):
        tensors.to_proto(inputs.reference, msg.reference)
    with core.tensor_field("candidate"):
        tensors.to_proto(inputs.candidate, msg.candidate)
    if inputs.tokens is not None:
        with core.tensor_field("target"):
            tensors.to_proto(inputs.tokens, msg.target)
    return msg


def nbytes(inputs: CompareInputs) -> int:
    """Tensor bytes the comparison puts on the wire."""
    return core.tensors_nbytes(reference=inputs.reference, candidate=inputs.candidate, target=inputs.tokens)


def payloads(inputs: CompareInputs, chunk_bytes: int = core.DEFAULT_CHUNK_BYTES, max_message_bytes: int | None = None) -> Iterator[bytes]:
    """The comparison as serialised CompareChunk messages: a CompareHeader (with the whole tokens),
    then messages of the same whole rows of both models, each within ``max_message_bytes``.

    Checks everything (and raises InvalidArgumentError) before returning the iterator; rows are
    cut straight out of the caller's arrays, one copy per message.
    """
    with core.tensor_field("reference"):
        ref_wire, shape, ref_data = tensors.as_wire_bytes(inputs.reference)
    with core.tensor_field("candidate"):
        cand_wire, cand_shape, cand_data = tensors.as_wire_bytes(inputs.candidate)
    header = pb.CompareHeader(id=core.request_id(inputs.id), options=_options(inputs), reference_dtype=ref_wire, reference_shape=shape)
    header.candidate_dtype, header.candidate_shape[:] = cand_wire, cand_shape
    if inputs.tokens is not None:
        with core.tensor_field("target"):
            tensors.to_proto(inputs.tokens, header.target)
    first = pb.CompareChunk(header=header).SerializeToString()
    if max_message_bytes is not None and len(first) > max_message_bytes:
        raise InvalidArgumentError(
            f"target: the header (options and the whole tokens, {len(first)} bytes) does not fit in one message of the server's "
            f"max_message_bytes ({max_message_bytes}); split the comparison by sequences"
        )
    rows, vocab = layout.logits_rows(shape)
    ref_row = layout.row_bytes(vocab, ref_wire)
    cand_row = layout.row_bytes(layout.logits_rows(cand_shape)[1], cand_wire)
    per_chunk = core.rows_per_message(ref_row + cand_row, chunk_bytes, max_message_bytes, "reference: one row of both models", "")
    return core.row_payloads(first, ref_data, cand_data, rows, ref_row, cand_row, per_chunk)


# --------------------------------------------------------------------------- routing
@dataclass
class Call:
    """One comparison ready to send: a unary ``message`` or CompareChunked ``payloads``."""

    message: pb.CompareRequest | None
    payloads: Iterator[bytes] | None
    as_torch: bool
    #: What a valid answer holds (None: not checked).
    expect: answers.ExpectedComparison | None = None

    @property
    def chunked(self) -> bool:
        """Whether the comparison goes through CompareChunked (``payloads``) instead of Compare."""
        return self.payloads is not None

    @property
    def request(self) -> pb.CompareRequest | Iterator[bytes]:
        """What the RPC sends: the message, or the payloads."""
        return self.payloads if self.payloads is not None else self.message

    def parse(self, response: pb.CompareResponse) -> CompareResult:
        """The answer, checked against the request, as the caller's kind of array (see :func:`result`)."""
        return result(response, self.as_torch, self.expect)


def needs_server_limit(inputs: CompareInputs, server_max: int | None) -> bool:
    """Whether :func:`route` needs the server's message limit (GetServerInfo) before it can decide."""
    return server_max is None and nbytes(inputs) > core.SMALL_REQUEST_BYTES


def _counted(messages: Iterator[bytes], progress: Callable[[int], None]) -> Iterator[bytes]:
    for message in messages:
        yield message
        progress(len(message))


def route(
    inputs: CompareInputs,
    *,
    server_max: int | None,
    chunk_bytes: int = core.DEFAULT_CHUNK_BYTES,
    chunked_above_bytes: int = layout.CHUNKED_ABOVE_BYTES,
    progress: Progress = None,
) -> Call:
    """How to send the comparison: CompareChunked when its tensor bytes exceed the server's unary
    budget or ``chunked_above_bytes``, else one Compare message. ``progress`` is called with the
    bytes of each message as it is handed to gRPC."""
    size = nbytes(inputs)
    as_torch = tensors.is_torch_tensor(inputs.reference)
    if size > core.SMALL_REQUEST_BYTES:
        if server_max is None:
            raise ValueError("route: a comparison of more than SMALL_REQUEST_BYTES needs the server's limit (see needs_server_limit)")
        if size > layout.unary_budget(server_max) or size > chunked_above_bytes:
            messages = payloads(inputs, chunk_bytes, server_max)
            return Call(None, messages if progress is None else _counted(messages, progress), as_torch, _expected(inputs))
    message = request(inputs)
    if progress is not None:
        progress(message.ByteSize())
    return Call(message, None, as_torch, _expected(inputs))


def _expected(inputs: CompareInputs) -> answers.ExpectedComparison:
    """What a valid answer to the comparison holds (its options already checked: :func:`_options`)."""
    top_k = core.integer_argument("top_k", inputs.top_k)
    return answers.expected_comparison(inputs.id, inputs.reference, inputs.candidate, inputs.tokens is not None, top_k)


# --------------------------------------------------------------------------- answers
def totals_of(msg: pb.CompareTotals) -> CompareTotals:
    """The wire totals as :class:`~lossd_client.compare_stats.CompareTotals` (field for field)."""
    return CompareTotals(**{f.name: getattr(msg, f.name) for f in fields(CompareTotals)})


def _top_k(response: pb.CompareResponse, name: str, as_torch: bool) -> TopK | None:
    if not response.HasField(name):
        return None
    msg = getattr(response, name)
    return TopK(tensors.from_proto(msg.ids, as_torch=as_torch), tensors.from_proto(msg.logprobs, as_torch=as_torch))


def result(response: pb.CompareResponse, as_torch: bool, expect: answers.ExpectedComparison | None = None) -> CompareResult:
    """A CompareResponse as a :class:`CompareResult` (torch tensors when ``as_torch``), with its summary;
    InternalError naming the field where it does not fit ``expect``, what a valid answer to the request holds."""
    if expect is not None:
        answers.comparison_answer(response, expect)
    present = [name for name in DENSE_OUTPUTS if response.HasField(name)]
    plain = {name: tensors.numpy_from_proto(getattr(response, name)) for name in present}
    summary = summarize(**{name: value for name, value in plain.items() if name not in ("p_ref", "p_cand")})
    dense = {name: tensors.from_proto(getattr(response, name), as_torch=True) for name in present} if as_torch else plain
    return CompareResult(
        **dense,
        totals=totals_of(response.totals),
        summary=summary,
        reference_top_k=_top_k(response, "reference_top_k", as_torch),
        candidate_top_k=_top_k(response, "candidate_top_k", as_torch),
        id=response.id,
    )


def as_numpy(values: Any) -> np.ndarray:
    """A dense output as a numpy array, whichever kind it was returned as."""
    return values.numpy() if tensors.is_torch_tensor(values) else np.asarray(values)
