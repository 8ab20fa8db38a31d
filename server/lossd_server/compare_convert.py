"""Compare's wire messages <-> engine values: options, requests and answers. No gRPC calls here."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client.compare_stats import CompareTotals

from . import answers, codec, engine
from .engine import comparison
from .engine.compare import TARGET_OUTPUTS
from .wire import WireCompareRequest, WireTensor

#: The dense per-position outputs of CompareResponse, by name (the target outputs only with targets).
DENSE_OUTPUTS = ("kl", "argmax_agree", "counted", *TARGET_OUTPUTS)
TOP_K_OUTPUTS = ("reference_top_k", "candidate_top_k")


@dataclass
class DecodedComparison:
    plan: comparison.ComparisonPlan
    reference: torch.Tensor
    candidate: torch.Tensor


def options(msg: pb.CompareOptions, max_top_k: int) -> dict[str, Any]:
    """CompareOptions as plan_comparison's keywords (an unset ignore_index is -100)."""
    return {
        "ignore_index": msg.ignore_index if msg.HasField("ignore_index") else -100,
        "shift_targets": msg.shift_targets,
        "top_k": msg.top_k,
        "max_top_k": max_top_k,
    }


def tensors(request: WireCompareRequest) -> list[WireTensor]:
    """The request's tensors that are present."""
    return [t for t in (request.reference, request.candidate, request.target) if t is not None]


def decode_request(request: WireCompareRequest, max_top_k: int, shm_reader=None) -> DecodedComparison:
    """Decode and validate a unary Compare request; raises engine.InvalidInput / codec.TensorError."""
    for name in ("reference", "candidate"):
        if getattr(request, name) is None:
            raise engine.InvalidInput(name, "is missing")
    reference = codec.decode("reference", request.reference, shm_reader)
    candidate = codec.decode("candidate", request.candidate, shm_reader)
    target = None if request.target is None else codec.decode("target", request.target, shm_reader)
    plan = comparison.plan_comparison(
        reference.shape, reference.dtype, candidate.shape, candidate.dtype, target, **options(request.options, max_top_k)
    )
    return DecodedComparison(plan, reference, candidate)


def encode_result(request_id: str, result: comparison.Comparison) -> pb.CompareResponse:
    response = pb.CompareResponse(id=request_id)
    values = result.result
    for name in DENSE_OUTPUTS:
        value = getattr(values, name)
        if value is not None:
            codec.encode(value, getattr(response, name))
    for f in fields(CompareTotals):
        setattr(response.totals, f.name, getattr(values.totals, f.name))
    for name in TOP_K_OUTPUTS:
        top = getattr(result, name)
        if top is not None:
            codec.encode(top.ids, getattr(response, name).ids)
            codec.encode(top.logprobs, getattr(response, name).logprobs)
    return response


def answer_parts(request_id: str, result: comparison.Comparison, checkpoint: answers.Checkpoint = None) -> list[bytes]:
    """The wire bytes of ``encode_result(request_id, result)`` in parts, for a large answer
    (:mod:`.answers`), in protobuf's order of the fields."""
    values = result.result
    written = [pb.CompareResponse(id=request_id).SerializeToString()]
    for name in sorted(DENSE_OUTPUTS, key=_NUMBERS.__getitem__):
        value = getattr(values, name)
        if value is not None:
            written += answers.tensor(_NUMBERS[name], value, checkpoint)
    totals = pb.CompareResponse()
    for f in fields(CompareTotals):
        setattr(totals.totals, f.name, getattr(values.totals, f.name))
    written.append(totals.SerializeToString())
    for name in TOP_K_OUTPUTS:
        top = getattr(result, name)
        if top is not None:  # TopK: ids = 1, logprobs = 2
            written += answers.field(_NUMBERS[name], answers.tensor(1, top.ids, checkpoint) + answers.tensor(2, top.logprobs, checkpoint))
    return written


_NUMBERS = {f.name: f.number for f in pb.CompareResponse.DESCRIPTOR.fields}
#: Compare's answers, small and large (:func:`.answers.encode_answer`).
ANSWER = answers.Encoding(encode_result, answer_parts)
