"""Rules that client and server must agree on byte for byte, each defined once. No torch, no gRPC.

The server imports this module from the client distribution (which it depends on): the names of
losses, reductions, extras and dtypes on the wire, the class axis, what a row of an input is and
how many bytes it holds, which target travels with the rows of ``EvaluateChunked``, and how many
tensor bytes fit in one unary message.

Every table is a plain dict and every rule a plain function of shapes and names, so they can be
used without numpy arrays, torch tensors or protobuf messages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._proto.lossd.v1 import loss_pb2 as pb

# --------------------------------------------------------------------------- wire tables
CROSS_ENTROPY = "cross_entropy"
NLL_LOSS = "nll_loss"
BCE_WITH_LOGITS = "binary_cross_entropy_with_logits"
KL_DIV = "kl_div"

#: Loss name (as torch.nn.functional spells it) -> ``LossKind`` enum value.
LOSSES: dict[str, int] = {
    CROSS_ENTROPY: pb.CROSS_ENTROPY,
    NLL_LOSS: pb.NLL,
    BCE_WITH_LOGITS: pb.BINARY_CROSS_ENTROPY_WITH_LOGITS,
    KL_DIV: pb.KL_DIV,
}
#: ``LossKind`` enum value -> loss name; an unset loss (``LOSS_KIND_UNSPECIFIED``) is cross_entropy.
LOSS_NAMES: dict[int, str] = {pb.LOSS_KIND_UNSPECIFIED: CROSS_ENTROPY, **{kind: name for name, kind in LOSSES.items()}}

#: ``Reduction`` enum value -> reduction name; an unset reduction (``REDUCTION_UNSPECIFIED``) is "mean".
#: "batchmean" is kl_div's own (every other loss rejects it, as torch does).
REDUCTION_NAMES: dict[int, str] = {
    pb.REDUCTION_UNSPECIFIED: "mean",
    pb.MEAN: "mean",
    pb.SUM: "sum",
    pb.NONE: "none",
    pb.BATCHMEAN: "batchmean",
}
#: Reduction name -> ``Reduction`` enum value; "elementwise_mean" is torch's deprecated spelling of
#: "mean", still accepted by torch.
REDUCTIONS: dict[str, int] = {
    **{name: value for value, name in REDUCTION_NAMES.items() if value != pb.REDUCTION_UNSPECIFIED},
    "elementwise_mean": pb.MEAN,
}

#: Per-token extra name -> ``Extra`` enum value (also the key of ``EvaluateResponse.extras``).
EXTRAS: dict[str, int] = {
    "target_logprob": pb.TARGET_LOGPROB,
    "entropy": pb.ENTROPY,
    "target_rank": pb.TARGET_RANK,
    "argmax_correct": pb.ARGMAX_CORRECT,
}
#: ``Extra`` enum value -> extra name.
EXTRA_NAMES: dict[int, str] = {value: name for name, value in EXTRAS.items()}

_DTYPES: tuple[tuple[int, str, int], ...] = (
    (pb.FLOAT32, "float32", 4),
    (pb.FLOAT16, "float16", 2),
    (pb.BFLOAT16, "bfloat16", 2),
    (pb.FLOAT64, "float64", 8),
    (pb.INT64, "int64", 8),
    (pb.INT32, "int32", 4),
    (pb.INT16, "int16", 2),
    (pb.INT8, "int8", 1),
    (pb.UINT8, "uint8", 1),
    (pb.BOOL, "bool", 1),
)
#: ``DType`` enum value -> dtype name. The name is the same in numpy (``np.dtype(name)``;
#: bfloat16 is ``ml_dtypes.bfloat16``) and in torch (``getattr(torch, name)``, printed as
#: ``torch.<name>``).
DTYPE_NAMES: dict[int, str] = {wire: name for wire, name, _ in _DTYPES}
#: dtype name (numpy's and torch's) -> ``DType`` enum value.
DTYPES: dict[str, int] = {name: wire for wire, name, _ in _DTYPES}
#: ``DType`` enum value -> bytes per element (little-endian on the wire).
ITEMSIZE: dict[int, int] = {wire: size for wire, _, size in _DTYPES}


def legacy_reduction(size_average: bool | None, reduce: bool | None) -> str:
    """The reduction torch uses for its deprecated ``size_average`` / ``reduce`` keywords
    (``torch.nn._reduction.legacy_get_string``).

    ``None`` counts as ``True`` for both; ``reduce=False`` gives ``'none'`` whatever
    ``size_average`` says; otherwise ``size_average=False`` gives ``'sum'`` and the rest ``'mean'``.
    """
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        return "mean"
    if reduce:
        return "sum"
    return "none"


def dtype_name(wire_dtype: int) -> str:
    """The name of a ``DType`` enum value (``"float32"``); ``"dtype <n>"`` for a value this client does not know."""
    return DTYPE_NAMES.get(wire_dtype, f"dtype {wire_dtype}")


# --------------------------------------------------------------------------- class axis and rows
def default_class_axis(ndim: int) -> int:
    """torch's class axis when none is given: 0 for a 1-d input ``(C)``, else 1 (``(N, C, d1, ...)``)."""
    return 0 if ndim == 1 else 1


def normalise_axis(axis: int, ndim: int) -> int:
    """``axis`` in ``[0, ndim)``, counting negative axes from the end.

    Raises ValueError (the server answers INVALID_ARGUMENT with this text) when it is out of range.
    """
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an input with {ndim} dimensions")
    return axis % ndim


def resolve_class_axis(ndim: int, class_axis: int | None = None) -> int:
    """The class axis of an ``ndim``-dimensional cross_entropy / nll_loss input, in ``[0, ndim)``.

    ``None`` is :func:`default_class_axis`; an explicit axis is normalised by :func:`normalise_axis`
    (ValueError when out of range).
    """
    return default_class_axis(ndim) if class_axis is None else normalise_axis(class_axis, ndim)


def row_shape(loss: str, input_shape: Sequence[int], class_axis: int | None = None) -> tuple[int, ...]:
    """The shape of one row of the input: the unit that ``EvaluateChunked`` carries whole.

    The rows are the positions of the axes before the class axis, so a row is the input from
    the class axis on (cross_entropy, nll_loss), or from axis 1 on for
    binary_cross_entropy_with_logits and kl_div, which have no class axis. A 0-d input, or a
    class axis 0, is one row holding the whole input. Raises ValueError for an out-of-range
    ``class_axis`` (cross_entropy, nll_loss), as the server rejects it.
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape:
        return ()
    lead = 1 if loss in (BCE_WITH_LOGITS, KL_DIV) else resolve_class_axis(len(shape), class_axis)
    return shape[lead:]


def rows(loss: str, input_shape: Sequence[int], class_axis: int | None = None) -> tuple[int, int]:
    """``(rows, elements per row)`` of an input (see :func:`row_shape`); ValueError as row_shape."""
    shape = tuple(int(s) for s in input_shape)
    unit = row_shape(loss, shape, class_axis)
    return math.prod(shape[: len(shape) - len(unit)]), math.prod(unit)


def row_bytes(elements_per_row: int, wire_dtype: int) -> int:
    """Bytes of one row of ``elements_per_row`` elements of a ``DType`` on the wire."""
    return elements_per_row * ITEMSIZE[wire_dtype]


def target_travels_with_rows(loss: str, input_shape: Sequence[int], target_shape: Sequence[int]) -> bool:
    """EvaluateChunked: whether the target is split into rows like the input (``target_rows``).

    Probability targets (cross_entropy), BCE and kl_div targets are shaped like the input and
    travel with its rows; class-index targets (and anything not shaped like the input, such as a
    kl_div target broadcast along the input's rows) travel whole in the ChunkHeader.
    """
    return loss != NLL_LOSS and tuple(target_shape) == tuple(input_shape)


def input_rows_are_output_rows(loss: str, input_shape: Sequence[int], target_shape: Sequence[int]) -> bool:
    """Whether the input's rows are the rows of the result, so that it can stream in row chunks.

    Always for class-index, probability and BCE targets; for kl_div, whose operands broadcast,
    unless the target broadcasts the input along dim 0 (the input has fewer dimensions, or size 1
    where the target has more): such an input has no rows of the output and travels whole.
    """
    a, b = tuple(input_shape), tuple(target_shape)
    if loss != KL_DIV or len(a) > len(b) or not b:
        return True
    return len(a) == len(b) and b[0] in (1, a[0])


def logits_rows(shape: Sequence[int]) -> tuple[int, int]:
    """Compare: ``(rows, V)`` of logits with the vocabulary axis last, ``(..., V)``.

    A row is one position's V logits (the positions of the leading axes, in C order); a 0-d
    shape is one row of one element (the server rejects it).
    """
    dims = tuple(int(s) for s in shape)
    if not dims:
        return 1, 1
    return math.prod(dims[:-1]), dims[-1]


# --------------------------------------------------------------------------- message sizes
#: Dimensions a tensor may have (torch's own limit is 64; lossd's messages and kernels need far fewer).
MAX_DIMS = 32

#: Requests one EvaluatePacked message (EvaluateBatch) may carry; the server answers a message with
#: more as a whole with INVALID_ARGUMENT naming this. A request costs the server a few KiB of
#: bookkeeping whatever its size: 200,000 tiny requests in one 7.4 MB message held 717 MiB and
#: 37 s of the event loop before this limit.
MAX_PACKED_ITEMS = 1024

#: Requests with more tensor bytes than this go through EvaluateChunked even when they would fit in
#: one message: a unary request costs the server about 4x its size in copies (gRPC's receive
#: buffer, the bytes handed to Python, the parsed message, each read of a bytes field), a
#: chunked one a few chunks.
CHUNKED_ABOVE_BYTES = 4 * 1024 * 1024


#: The smallest message limit a lossd server can have: the lower bound of its --max-message-bytes and
#: --max-send-message-bytes (``lossd_server.config.BOUNDS``). A GetServerInfo answer with a limit
#: under it (0, negative) is not a lossd server's, and the client does not route requests by it.
MIN_MESSAGE_BYTES = 1024


def unary_budget(max_message_bytes: int) -> int:
    """Tensor bytes that fit in one message of ``max_message_bytes`` with its other fields."""
    return max_message_bytes - min(4096, max_message_bytes // 4)
