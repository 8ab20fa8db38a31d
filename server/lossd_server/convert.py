"""Wire messages <-> engine values: options, requests and results. No gRPC calls here."""

from __future__ import annotations

import math

import torch
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client.layout import EXTRA_NAMES, KL_DIV, LOSS_NAMES, REDUCTION_NAMES, legacy_reduction

from . import answers, codec, engine
from .batch_engine import Job
from .wire import MAX_EXTRA_VALUES, WireRequest, WireTensor

INPUT_DTYPES = [pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.FLOAT64]
TARGET_DTYPES = [pb.INT64, pb.UINT8, pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.FLOAT64]


def decode_options(options: pb.LossOptions, shm_reader=None) -> tuple[engine.LossSpec, torch.Tensor | None, torch.Tensor | None]:
    """LossOptions -> (LossSpec, weight, pos_weight)."""
    if options.loss not in LOSS_NAMES:
        raise engine.InvalidInput("options.loss", f"unknown LossKind enum value {options.loss}")
    if options.reduction not in REDUCTION_NAMES:
        raise engine.InvalidInput("options.reduction", f"unknown Reduction enum value {options.reduction}")
    if len(options.extras) > MAX_EXTRA_VALUES:
        raise engine.InvalidInput("options.extras", f"{len(options.extras)} values, more than MAX_EXTRA_VALUES={MAX_EXTRA_VALUES}")
    extras = []
    for value in options.extras:
        if value not in EXTRA_NAMES:
            raise engine.InvalidInput("options.extras", f"unknown Extra enum value {value}")
        if EXTRA_NAMES[value] not in extras:
            extras.append(EXTRA_NAMES[value])
    ls = float(options.label_smoothing)
    if ls > 1.0:  # torch 2.13: NaN and negative values are accepted (and ignored for class indices)
        raise engine.InvalidInput("options.label_smoothing", f"label_smoothing must be between 0.0 and 1.0. Got: {ls:g}")
    loss = LOSS_NAMES[options.loss]
    reduction, size_average, reduce = _reduction(options, loss)
    spec = engine.LossSpec(
        loss=loss,
        reduction=reduction,
        ignore_index=options.ignore_index if options.HasField("ignore_index") else -100,
        label_smoothing=ls,
        class_axis=options.class_axis if options.HasField("class_axis") else None,
        shift_targets=options.shift_targets,
        extras=tuple(extras),
        sequence_stats=options.sequence_stats,
        log_target=options.log_target,
        size_average=size_average,
        reduce=reduce,
    )
    weight = codec.decode("options.weight", options.weight, shm_reader) if options.HasField("weight") else None
    pos_weight = codec.decode("options.pos_weight", options.pos_weight, shm_reader) if options.HasField("pos_weight") else None
    return spec, weight, pos_weight


def _reduction(options: pb.LossOptions, loss: str) -> tuple[str, bool | None, bool | None]:
    """(reduction, size_average, reduce): torch's legacy keywords decide the reduction when either
    is set, as torch does; kl_div keeps them (a 'batchmean' beside them still divides)."""
    size_average = options.size_average if options.HasField("size_average") else None
    reduce = options.reduce if options.HasField("reduce") else None
    reduction = REDUCTION_NAMES[options.reduction]
    if loss == KL_DIV:
        return reduction, size_average, reduce
    if options.log_target:
        raise engine.InvalidInput("options.log_target", f"only kl_div takes log_target, not {loss}")
    if size_average is not None or reduce is not None:
        return legacy_reduction(size_average, reduce), None, None
    return reduction, None, None


def target_decode_nbytes(target: WireTensor | None, shift: bool, weighted: bool = False) -> int:
    """What decoding ``target`` as class indices makes beside its bytes (:func:`engine.class_target_nbytes`),
    from its wire header alone; 0 for a floating target (probabilities), a missing one, or one that
    decoding refuses anyway (a bad dtype or shape, inline bytes that do not match its shape): the
    caller then reserves nothing and decoding names the problem."""
    if target is None:
        return 0
    try:
        dtype, shape, nbytes = codec.expected_nbytes("target", target)
    except codec.TensorError:
        return 0
    if dtype.is_floating_point or (target.shm is None and len(target.data) != nbytes):
        return 0
    return engine.class_target_nbytes(math.prod(shape), int64=dtype == torch.int64, shift=shift, weighted=weighted)


def decode_request(request: WireRequest, shm_reader=None) -> Job:
    """Decode and validate a unary request into the batch engine's job (its plan and tensors);
    raises engine.InvalidInput / codec.TensorError."""
    if request.input is None:
        raise engine.InvalidInput("input", "is missing")
    if request.target is None:
        raise engine.InvalidInput("target", "is missing")
    spec, weight, pos_weight = decode_options(request.options, shm_reader)
    x = codec.decode("input", request.input, shm_reader)
    target = codec.decode("target", request.target, shm_reader)
    plan = engine.plan(spec, x.shape, x.dtype, target, weight, pos_weight)
    return Job(plan, x, target)


#: SequenceStats' fields in their wire order (field numbers 1 to 5).
SEQUENCE_FIELDS = ("nll_sum", "tokens", "mean_nll", "perplexity", "is_greedy")


def encode_result(request_id: str, result: engine.LossResult) -> pb.EvaluateResponse:
    response = pb.EvaluateResponse(id=request_id, loss_sum=result.loss_sum, weight_sum=result.weight_sum, counted=result.counted)
    codec.encode(result.loss, response.loss)
    for name, value in result.extras.items():
        codec.encode(value, response.extras[name])
    if result.sequences is not None:
        s = result.sequences
        for name in SEQUENCE_FIELDS:
            # one field's Python values at a time (32 bytes a float), in one assignment: filled
            # piecewise, a repeated field's storage grows by doubling inside the message's arena
            getattr(response.sequences, name)[:] = getattr(s, name).tolist()
    return response


def answer_parts(request_id: str, result: engine.LossResult, checkpoint: answers.Checkpoint = None) -> list[bytes]:
    """The wire bytes of ``encode_result(request_id, result)`` in parts, for a large answer
    (:mod:`.answers`): the tensors written a slice at a time, ``checkpoint`` between the slices
    and between the fields."""
    totals = pb.EvaluateResponse(loss_sum=result.loss_sum, weight_sum=result.weight_sum, counted=result.counted)
    written = [pb.EvaluateResponse(id=request_id).SerializeToString()]  # fields in protobuf's order: id = 1
    written += answers.tensor(2, result.loss, checkpoint)  # loss = 2
    written.append(totals.SerializeToString())  # 3 to 5
    if result.sequences is not None:
        stats: list[bytes] = []
        for number, name in enumerate(SEQUENCE_FIELDS, 1):
            stats += answers.packed(number, getattr(result.sequences, name), checkpoint)
        written += answers.field(6, stats)  # sequences = 6
    for name, value in result.extras.items():  # extras = 7: map entries of key = 1, value = 2
        entry = name.encode()
        written += answers.field(7, [answers.key(1, len(entry)), entry, *answers.tensor(2, value, checkpoint)])
    return written


#: Evaluate's answers, small and large (:func:`.answers.encode_answer`).
ANSWER = answers.Encoding(encode_result, answer_parts)


def error_response(request_id: str, code: int, message: str) -> pb.EvaluateResponse:
    """A stream item's failure."""
    return pb.EvaluateResponse(id=request_id, error=pb.ItemError(code=code, message=message))
