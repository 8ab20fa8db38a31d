"""The client's logic without I/O, shared by :class:`LossClient` and :class:`AsyncLossClient`.

- requests: :func:`loss_request` (torch's keywords), :func:`build` (LossRequest -> wire message),
  :func:`chunk_payloads` (one request as EvaluateChunked messages of whole rows);
- routing: :func:`route` sends a request through shared memory, one unary message or
  EvaluateChunked (a large one cut over parallel streams by :mod:`lossd_client.split`), and
  :class:`Call` is what the clients then send; :class:`RoundRobin` picks the connection of each call;
- answers: :func:`parse` (each answer checked against its request first:
  :mod:`lossd_client.answers`), :func:`perplexity_result`, :func:`loglikelihood_result`,
  :func:`server_info`, :func:`health_status`;
- ``evaluate_many``: :class:`Stream` numbers the requests, packs them into messages and hands
  the answers back in input order; :func:`as_loss_request` says what an item may be.

Nothing here opens a channel or waits: the clients do the I/O and nothing else.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import answers, layout, protowire, split, tensors
from ._proto.lossd.v1 import loss_pb2 as pb
from .errors import InternalError, InvalidArgumentError, LossdError, shown
from .lanes import Lanes, gave_way
from .shm import SegmentPool, SharedMemoryArena
from .types import EvaluateResult, LoglikelihoodResult, LossRequest, PerplexityResult, SequenceStats, ServerInfo

#: torch's default ignore_index (LossRequest's), which only cross_entropy and nll_loss take.
DEFAULT_IGNORE_INDEX = LossRequest.ignore_index

#: Bytes of input per EvaluateChunked message: big enough to amortise per-message cost, small
#: enough that several can be in flight without large buffers (measured on loopback TCP).
DEFAULT_CHUNK_BYTES = 1024 * 1024
#: evaluate_many packs requests into EvaluatePacked messages of about this many bytes at most: a
#: message stays under 1 MiB while its requests are under 512 KiB each. Over 1 MiB, the server's
#: buffers for it are fresh mmap'd pages (the server caps glibc's mmap threshold at 1 MiB) and are
#: page-faulted in per message: 64x1000 fp32 requests, 5 per 1.28 MB message vs 3 per 768 KB one,
#: cost the server 600-650 vs 460-480 us of CPU per request (1,650-1,800 vs 2,170-2,350 req/s).
PACK_BYTES = 512 * 1024
#: Requests with at most this many tensor bytes never ask the server for its limit (a server's
#: --max-message-bytes is at least 1024, whose unary budget is 768 bytes).
SMALL_REQUEST_BYTES = 512


# --------------------------------------------------------------------------- requests
def loss_request(
    loss: str,
    input: Any,
    target: Any,
    *,
    size_average: bool | None = None,
    reduce: bool | None = None,
    grad_enabled: bool = False,
    **options: Any,
) -> LossRequest:
    """A LossRequest from torch.nn.functional's arguments (legacy ``size_average``/``reduce`` included).

    ``grad_enabled``: torch's grad mode when the function was called (:func:`grad_enabled`); a
    weight torch cannot differentiate that requires grad is then refused as torch refuses it.
    """
    if grad_enabled:
        check_differentiable(loss, input, target, options.get("weight"), options.get("pos_weight"))
    if size_average is not None or reduce is not None:
        options["reduction"] = layout.legacy_reduction(_legacy_argument("size_average", size_average), _legacy_argument("reduce", reduce))
    return LossRequest(input, target, loss, **options)


def grad_enabled() -> bool:
    """torch's grad mode in the calling thread (``torch.is_grad_enabled()``): False without torch
    (never imported, so no tensor can require grad), and under ``no_grad`` / ``inference_mode``."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.is_grad_enabled())


def check_differentiable(loss: str, input: Any, target: Any, weight: Any, pos_weight: Any) -> None:
    """What torch's autograd refuses in grad mode: a class ``weight`` that requires grad for
    nll_loss and cross_entropy with class indices (its nll_loss_forward / nll_loss2d_forward has no
    derivative for it; probabilities use the weight differentiably), and a ``weight`` or
    ``pos_weight`` that requires grad for binary_cross_entropy_with_logits. InvalidArgumentError
    naming the option, with torch's RuntimeError message."""
    if loss == layout.BCE_WITH_LOGITS:
        function, named = loss, (("weight", weight), ("pos_weight", pos_weight))
    elif loss == layout.NLL_LOSS or (loss == layout.CROSS_ENTROPY and _shape(input) != _shape(target)):
        function, named = ("nll_loss2d_forward" if len(_shape(input)) >= 3 else "nll_loss_forward"), (("weight", weight),)
    else:
        return
    for name, value in named:
        if tensors.is_torch_tensor(value) and value.requires_grad:
            raise InvalidArgumentError(
                f"options.{name}: The function '{function}' is not differentiable with respect to argument '{name}'. "
                "This input cannot have requires_grad True."
            )


def _shape(value: Any) -> tuple[int, ...]:
    """A tensor's, an array's or a nested list's shape (a ragged list: the shape numpy sees of it)."""
    if hasattr(value, "shape"):
        return tuple(int(s) for s in value.shape)
    try:
        return np.shape(value)
    except ValueError:
        return (-1,)  # ragged: not a shape torch could take; the request is refused when it is built


def request_of(request: LossRequest | None, fields: Mapping[str, Any]) -> LossRequest:
    """``evaluate``'s argument: a LossRequest, its fields given as keywords, or a LossRequest with
    some of its fields replaced by keywords (a name LossRequest does not have is a TypeError)."""
    if request is None:
        return LossRequest(**fields)
    return replace(request, **fields) if fields else request


def build(req: LossRequest, arena: Any = None) -> tuple[pb.EvaluateRequest, bool]:
    """LossRequest -> (wire request, whether to answer with torch tensors).

    With a :class:`~lossd_client.shm.SharedMemoryArena`, large input/target bytes travel
    through same-host shared memory instead of inline.
    """
    msg = request_head(req)
    with tensor_field("input"):
        if arena is None or not arena.place(req.input, msg.input):
            tensors.to_proto(req.input, msg.input)
    with tensor_field("target"):
        if arena is None or not arena.place(req.target, msg.target):
            tensors.to_proto(req.target, msg.target)
    return msg, tensors.is_torch_tensor(req.input)


def request_head(req: LossRequest) -> pb.EvaluateRequest:
    """The wire request without its input and target: id and options (weights included), each
    checked as torch checks it (InvalidArgumentError naming the field)."""
    if not isinstance(req.loss, str) or req.loss not in layout.LOSSES:
        raise InvalidArgumentError(f"loss: unknown loss {req.loss!r}; expected one of {', '.join(layout.LOSSES)}")
    size_average, reduce = _legacy_argument("size_average", req.size_average), _legacy_argument("reduce", req.reduce)
    legacy = size_average is not None or reduce is not None
    known = isinstance(req.reduction, str) and req.reduction in layout.REDUCTIONS
    if not known and not legacy:  # beside the legacy keywords torch ignores it
        raise InvalidArgumentError(f"{req.reduction} is not a valid value for reduction")
    msg = pb.EvaluateRequest(id=request_id(req.id))
    options = msg.options
    options.loss = layout.LOSSES[req.loss]
    options.reduction = layout.REDUCTIONS[req.reduction] if known else pb.MEAN
    ignore_index, label_smoothing = _int_argument("ignore_index", req.ignore_index), _float_argument("label_smoothing", req.label_smoothing)
    if req.loss in (layout.CROSS_ENTROPY, layout.NLL_LOSS) or ignore_index != DEFAULT_IGNORE_INDEX:
        options.ignore_index = ignore_index  # the other losses take none: the server refuses it naming the option
    options.log_target = torch_bool_argument("log_target", req.log_target)
    if size_average is not None:
        options.size_average = size_average
    if reduce is not None:
        options.reduce = reduce
    options.label_smoothing = label_smoothing
    if req.class_axis is not None:
        options.class_axis = _int_argument("class_axis", req.class_axis, bits=32)
    options.shift_targets = _bool_argument("shift_targets", req.shift_targets)
    for name in (req.extras,) if isinstance(req.extras, str) else req.extras:  # one name alone, or several
        if not isinstance(name, str) or name not in layout.EXTRAS:
            raise InvalidArgumentError(f"extras: unknown extra {name!r}; expected one of {', '.join(layout.EXTRAS)}")
        options.extras.append(layout.EXTRAS[name])
    options.sequence_stats = _bool_argument("sequence_stats", req.sequence_stats)
    if req.weight is not None:
        with tensor_field("options.weight"):
            tensors.to_proto(req.weight, options.weight)
    if req.pos_weight is not None:
        with tensor_field("options.pos_weight"):
            tensors.to_proto(req.pos_weight, options.pos_weight)
    return msg


class _NamedField:
    """The context manager of :func:`tensor_field` (a class: a generator-based one cost 2 us per
    use, four uses per request on evaluate_many's path)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if kind is not None and issubclass(kind, tensors.UnsupportedTensorError):
            raise InvalidArgumentError(f"{self.name}: {exc}") from exc
        return False


def tensor_field(name: str) -> _NamedField:
    """Raise a value that cannot be sent as a tensor (:class:`~lossd_client.tensors.UnsupportedTensorError`:
    its dtype, a sparse or other non-dense layout, a ragged list) as InvalidArgumentError naming the field."""
    return _NamedField(name)


#: What converting a caller's value to a Python scalar may raise besides TypeError: ValueError
#: (a numpy array of several values), RuntimeError (a torch tensor of several), OverflowError.
_CONVERSION_ERRORS = (TypeError, ValueError, RuntimeError, OverflowError)


def integer_argument(name: str, value: Any) -> int:
    """An integer argument as torch takes it: an int, a numpy integer or an integer 0-d tensor;
    never a bool, a float or a string (torch's TypeError, as InvalidArgumentError naming ``name``)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except _CONVERSION_ERRORS:
        raise InvalidArgumentError(f"options.{name}: argument '{name}' must be int, not {type(value).__name__}") from None


def request_id(value: Any, name: str = "id") -> str:
    """A request's id as sent: a str that UTF-8 can encode (a lone surrogate cannot), else
    InvalidArgumentError naming ``name``."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name}: must be str, not {type(value).__name__}")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(f"{name}: not encodable as UTF-8 ({exc.reason} at index {exc.start})") from None
    return value


def _int_argument(name: str, value: Any, bits: int = 64) -> int:
    """:func:`integer_argument` within the wire field's ``bits`` (torch: ValueError 'Overflow when
    unpacking long long'; protobuf: a bare ValueError)."""
    number = integer_argument(name, value)
    if not -(2 ** (bits - 1)) <= number < 2 ** (bits - 1):
        raise InvalidArgumentError(f"options.{name}: {number} is out of int{bits} range")
    return number


def _float_argument(name: str, value: Any) -> float:
    """A real argument as torch takes it: any real number, never a string or None; an int too
    large for a float is refused (torch's OverflowError)."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        return float(value)
    except OverflowError:
        raise InvalidArgumentError(f"options.{name}: {value} is too large to convert to float") from None
    except _CONVERSION_ERRORS:
        raise InvalidArgumentError(f"options.{name}: argument '{name}' must be float, not {type(value).__name__}") from None


def _bool_argument(name: str, value: Any) -> bool:
    """A flag by its truth value, as the client has always taken it; a value without one (an
    array of several elements) is InvalidArgumentError naming the option."""
    try:
        return bool(value)
    except _CONVERSION_ERRORS:
        raise InvalidArgumentError(f"options.{name}: argument '{name}' must be bool, not {type(value).__name__}") from None


def torch_bool_argument(name: str, value: Any) -> bool:
    """A bool option as torch's argument parser takes it (kl_div's ``log_target``): a Python bool
    only; an int, None, a string, a numpy bool or a 0-d tensor is torch's TypeError, as
    InvalidArgumentError naming the option (``log_target="False"`` was taken as True)."""
    if isinstance(value, bool):
        return value
    kind = type(value)
    name_of = kind.__name__ if kind.__name__ != "bool" else f"{kind.__module__}.bool"  # numpy.bool, as torch names it
    raise InvalidArgumentError(f"options.{name}: argument '{name}' must be bool, not {name_of}")


def flag_argument(name: str, value: Any) -> bool:
    """A flag of lossd's own API (perplexity's ``shift``, compare's ``shift_targets``): a bool or a
    numpy bool only; anything else ("no", 2, None) is InvalidArgumentError naming it, not its truth value."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidArgumentError(f"options.{name}: argument '{name}' must be bool, not {type(value).__name__}")


def _legacy_argument(name: str, value: Any) -> bool | None:
    """torch's deprecated ``size_average`` / ``reduce``: None (not given) or its truth value."""
    return None if value is None else _bool_argument(name, value)


@dataclass
class Encoded:
    """A serialised EvaluateRequest as the pieces of one message (the tensor bytes are views of
    the caller's arrays, joined once when the message is sent)."""

    parts: list[Any]
    nbytes: int
    as_torch: bool
    id: str = ""

    def framed(self, number: int) -> list[Any]:
        """The pieces as a length-delimited field ``number`` of an enclosing message."""
        return [protowire.key(number, self.nbytes), *self.parts]

    def tobytes(self) -> bytes:
        return b"".join(self.parts)


def encode(req: LossRequest) -> Encoded:
    """LossRequest -> the serialised EvaluateRequest, without routing the tensor bytes through
    protobuf objects: the small fields are serialised by protobuf (:func:`request_head`),
    ``input.data`` and ``target.data`` are raw fields cut from the caller's arrays.
    protobuf copies a bytes field on every assignment and again when serialising; for a 16-request
    EvaluateBatch of 64x1000 fp32 that was 8 ms of client CPU per message."""
    with tensor_field("input"):
        wire_input = tensors.as_wire_bytes(req.input)
    with tensor_field("target"):
        tensors_ = [wire_input, tensors.as_wire_bytes(req.target)]
    parts: list[Any] = [request_head(req).SerializeToString()]
    for number, (wire, shape, data) in zip((2, 3), tensors_, strict=True):
        head = pb.Tensor(dtype=wire, shape=shape).SerializeToString()
        data_key = protowire.key(3, len(data)) if len(data) else b""
        parts += [protowire.key(number, len(head) + len(data_key) + len(data)) + head + data_key, data]
    return Encoded(parts, sum(len(p) for p in parts), tensors.is_torch_tensor(req.input), req.id)


def chunk_layout(msg: pb.EvaluateRequest) -> tuple[int, int, bool]:
    """(units, bytes per input unit, whether the target is streamed with the rows)."""
    loss = layout.LOSS_NAMES.get(msg.options.loss, layout.CROSS_ENTROPY)
    class_axis = msg.options.class_axis if msg.options.HasField("class_axis") else None
    units, per_unit = _rows(loss, msg.input.shape, class_axis)
    streamed = layout.target_travels_with_rows(loss, msg.input.shape, msg.target.shape)
    return units, per_unit * layout.ITEMSIZE.get(msg.input.dtype, 1), streamed


def chunk_messages(msg: pb.EvaluateRequest, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.EvaluateChunk]:
    """Split one request into a ChunkHeader and row chunks of about ``chunk_bytes`` each."""
    units, unit_bytes, streamed = chunk_layout(msg)
    header = pb.ChunkHeader(id=msg.id, input_dtype=msg.input.dtype, input_shape=msg.input.shape)
    header.options.CopyFrom(msg.options)
    header.target.dtype = msg.target.dtype
    header.target.shape[:] = msg.target.shape
    target_unit_bytes = 0
    if streamed:
        target_unit_bytes = len(msg.target.data) // units if units else 0
    else:
        header.target.data = msg.target.data
    per_chunk = max(1, chunk_bytes // max(1, unit_bytes))
    data = memoryview(msg.input.data)
    tdata = memoryview(msg.target.data)
    first = pb.EvaluateChunk(header=header)
    if units == 0:
        yield first
        return
    for u0 in range(0, units, per_chunk):
        u1 = min(units, u0 + per_chunk)
        chunk = first if u0 == 0 else pb.EvaluateChunk()
        chunk.input_rows = data[u0 * unit_bytes : u1 * unit_bytes].tobytes()
        if streamed:
            chunk.target_rows = tdata[u0 * target_unit_bytes : u1 * target_unit_bytes].tobytes()
        yield chunk


#: Bytes of framing and header fields allowed for on top of the rows of one chunk message (also CompareChunk's).
CHUNK_OVERHEAD_BYTES = 256
_EMPTY = np.empty(0, dtype=np.float32)


def request_nbytes(req: LossRequest) -> int:
    """Tensor bytes the request puts on the wire, counted without serialising anything; a value
    that is no array is InvalidArgumentError naming its field (this is the first look at them)."""
    fields = {"input": req.input, "target": req.target, "options.weight": req.weight, "options.pos_weight": req.pos_weight}
    return tensors_nbytes(**fields)


def tensors_nbytes(*values: Any, **named: Any) -> int:
    """Bytes of the arrays or tensors (None skipped), counted without serialising anything; the
    ``named`` ones are named in the InvalidArgumentError of a value that is no array."""
    total = sum(tensors.nbytes(v) for v in values if v is not None)
    for name, value in named.items():
        if value is not None:
            with tensor_field(name):
                total += tensors.nbytes(value)
    return total


def _rows(loss: str, shape: Sequence[int], class_axis: int | None) -> tuple[int, int]:
    """layout.rows; an out-of-range class_axis is laid out as the default one: the server rejects
    the request's header with INVALID_ARGUMENT (naming options.class_axis) before any row."""
    try:
        return layout.rows(loss, shape, class_axis)
    except ValueError:
        return layout.rows(loss, shape)


def _bytes_field(number: int, payload: memoryview) -> list[Any]:
    return [protowire.key(number, len(payload)), payload]


def chunk_payloads(req: LossRequest, chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_message_bytes: int | None = None) -> Iterator[bytes]:
    """One request as serialised EvaluateChunk messages: a ChunkHeader, then whole-row chunks.

    Checks everything (and raises InvalidArgumentError) before returning the iterator.

    Rows are cut straight out of the caller's array, one copy per chunk; the whole request is
    never built as one protobuf message (serialising a 256 MB message costs seconds). Each message
    stays within ``max_message_bytes`` (the server's receive limit) when given.
    """
    with tensor_field("input"):
        wire, shape, data = tensors.as_wire_bytes(req.input)
    with tensor_field("target"):
        twire, tshape, tdata = tensors.as_wire_bytes(req.target)
    streamed = layout.target_travels_with_rows(req.loss, shape, tshape)
    header = _chunk_header(req, wire, shape, twire, tshape, streamed)
    first = pb.EvaluateChunk(header=header).SerializeToString()
    if max_message_bytes is not None and len(first) > max_message_bytes:
        raise _header_too_big(header, len(first), max_message_bytes)
    rows, per_row = _rows(req.loss, shape, req.class_axis)
    row_bytes = layout.row_bytes(per_row, wire)
    target_row_bytes = layout.row_bytes(per_row, twire) if streamed else 0
    per_chunk = rows_per_message(row_bytes + target_row_bytes, chunk_bytes, max_message_bytes, "input: one row", "of input and target")
    return row_payloads(first, data, tdata if streamed else None, rows, row_bytes, target_row_bytes, per_chunk)


def _chunk_header(req: LossRequest, wire: int, shape: Sequence[int], twire: int, tshape: Sequence[int], streamed: bool) -> pb.ChunkHeader:
    """EvaluateChunked's ChunkHeader: options (weights whole), input dtype and shape, and the
    target whole (class indices) or its dtype and shape only (``streamed`` with the rows)."""
    small, _ = build(replace(req, input=_EMPTY, target=_EMPTY if streamed else req.target))
    header = pb.ChunkHeader(id=req.id, input_dtype=wire, input_shape=shape)
    header.options.CopyFrom(small.options)
    if streamed:
        header.target.dtype = twire
        header.target.shape[:] = tshape
    else:
        header.target.CopyFrom(small.target)
    return header


def header_parts(req: LossRequest, max_message_bytes: int) -> int:
    """How many row parts (:func:`lossd_client.split.split_rows`) keep every part's ChunkHeader
    within ``max_message_bytes``: 1 unless what the header carries whole and a split cuts with the
    rows (class-index targets, BCE weights shaped like the input's rows) makes it bigger. Also 1
    when no split helps (the request cannot be cut, or one row's share alone is too big):
    :func:`chunk_payloads` then names what makes the header big."""
    try:
        if not split.splittable(req):
            return 1
        wire, shape, _ = tensors.as_wire_bytes(req.input)
        twire, tshape, _ = tensors.as_wire_bytes(req.target)
    except (tensors.UnsupportedTensorError, ValueError, TypeError):
        return 1
    streamed = layout.target_travels_with_rows(req.loss, shape, tshape)

    def header_bytes(rows: int) -> int:
        part = split.leading_slice(req, 0, rows)
        part_shape = [rows, *shape[1:]]
        part_tshape = [rows, *tshape[1:]] if tshape else tshape
        return pb.EvaluateChunk(header=_chunk_header(part, wire, part_shape, twire, part_tshape, streamed)).ByteSize()

    rows = shape[0]
    fixed = header_bytes(0)
    per_row = header_bytes(1) - fixed
    if per_row <= 0 or fixed + rows * per_row <= max_message_bytes:
        return 1
    rows_per_part = (max_message_bytes - fixed - HEADER_GROWTH_BYTES) // per_row
    return 1 if rows_per_part < 1 else -(-rows // rows_per_part)


#: What a part's header may grow by beyond ``fixed + rows * per_row`` in :func:`header_parts`
#: (longer length prefixes of its tensors' bytes and shapes).
HEADER_GROWTH_BYTES = 64

#: Most parts (EvaluateChunked calls) :func:`route` cuts one request into so that each part's
#: ChunkHeader fits the server's message limit (:func:`header_parts`); a request that needs more is
#: refused before anything is sent. The parts needed are about the bytes a header carries whole
#: (class indices, row weights) over the server's limit, so this refuses headers of more than about
#: 64 times the limit: at lossd's default --max-message-bytes (64 MiB) 4 GiB, 537 million int64
#: class indices, more than any request holds; only a limit near lossd's floor
#: (:data:`~lossd_client.layout.MIN_MESSAGE_BYTES`, a part of ~110 class indices) gets there. Every
#: part is a call of its own: on LossClient a gRPC future with a thread of its own (64 start in about
#: 0.1 s), on the server one of its --max-concurrent-calls with a read reservation. A server that
#: claimed a 300-byte limit had a 4.9 MB request cut into 5120 parts, whose futures took 18.1 s just
#: to start (probe 18).
MAX_HEADER_PARTS = 64


def _header_too_big(header: pb.ChunkHeader, size: int, max_message_bytes: int) -> InvalidArgumentError:
    """What makes a chunk header too big, named: the class-index target, or class / element
    weights (these travel in the header, never with the rows). Reached only where cutting the
    request by rows (:func:`header_parts`) cannot make it fit."""
    weights = max(("weight", "pos_weight"), key=lambda name: getattr(header.options, name).ByteSize())
    if getattr(header.options, weights).ByteSize() > header.target.ByteSize():
        return InvalidArgumentError(
            f"options.{weights}: the chunk header (options, with the {weights} sent whole, {size} bytes) does not fit in one "
            f"message of the server's max_message_bytes ({max_message_bytes}), even with the request cut by rows; "
            "raise the server's --max-message-bytes"
        )
    return InvalidArgumentError(
        f"target: the chunk header (options and the target sent whole, {size} bytes) does not fit in one "
        f"message of the server's max_message_bytes ({max_message_bytes}), even with the request cut by rows where it can be; "
        "split the request by sequences"
    )


def _too_many_parts(req: LossRequest, parts: int, max_message_bytes: int) -> InvalidArgumentError:
    """A request whose headers fit the server's limit only in more than :data:`MAX_HEADER_PARTS`
    parts, refused naming what the headers carry whole (the class-index target, else the weights)."""
    advice = "raise the server's --max-message-bytes"
    if split.class_indices(req):
        field, what, advice = "target", "the class-index target", advice + ", or split the request by sequences"
    else:
        weight = max(("weight", "pos_weight"), key=lambda name: 0 if getattr(req, name) is None else tensors.nbytes(getattr(req, name)))
        field, what = f"options.{weight}", f"the {weight} cut with the rows"
    return InvalidArgumentError(
        f"{field}: each part's chunk header carries its share of {what}, and for every header to fit in one message of the "
        f"server's max_message_bytes ({max_message_bytes}) the request would be cut into {parts} parts, over the "
        f"{MAX_HEADER_PARTS} calls one request may take; {advice}"
    )


def rows_per_message(row_bytes: int, chunk_bytes: int, max_message_bytes: int | None, what: str, of: str) -> int:
    """Whole rows per chunk message: as many as fit in ``chunk_bytes`` (the send granularity), at
    least one. A row bigger than ``chunk_bytes`` travels alone; only one bigger than the server's
    ``max_message_bytes`` (less the message's framing) cannot be sent: InvalidArgumentError."""
    if max_message_bytes is not None and row_bytes > max_message_bytes - CHUNK_OVERHEAD_BYTES:
        raise InvalidArgumentError(
            f"{what} ({row_bytes} bytes{' ' + of if of else ''}) does not fit in one message of the server's max_message_bytes "
            f"({max_message_bytes}); raise the server's --max-message-bytes"
        )
    budget = chunk_bytes if max_message_bytes is None else min(chunk_bytes, max_message_bytes - CHUNK_OVERHEAD_BYTES)
    return max(1, budget // max(1, row_bytes))


def row_payloads(
    first: bytes, data: memoryview, tdata: memoryview | None, rows: int, row_bytes: int, target_row_bytes: int, per_chunk: int
) -> Iterator[bytes]:
    """``first``, then messages of ``per_chunk`` whole rows: field 2 from ``data``, field 3 from
    ``tdata`` (EvaluateChunk's input_rows / target_rows, CompareChunk's reference_rows /
    candidate_rows), serialised by hand."""
    yield first
    if rows == 0 or len(data) == 0:
        if rows:
            yield b""
        return
    for r0 in range(0, rows, per_chunk):
        r1 = min(rows, r0 + per_chunk)
        parts = _bytes_field(2, data[r0 * row_bytes : r1 * row_bytes])
        if tdata is not None:
            parts += _bytes_field(3, tdata[r0 * target_row_bytes : r1 * target_row_bytes])
        yield b"".join(parts)


# --------------------------------------------------------------------------- routing
class RoundRobin:
    """Which of ``n`` connections the next call uses: 0, 1, ..., n-1, 0, ... (thread-safe)."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"connections must be >= 1, got {n}")
        self.n = n
        self._turns = itertools.count()

    def next(self) -> int:
        """The next call's connection."""
        return next(self._turns) % self.n

    def take(self, k: int) -> list[int]:
        """``k`` calls' connections, consecutive in the rotation (distinct while k <= n)."""
        return [self.next() for _ in range(k)]


@dataclass
class Call:
    """One evaluation ready to send: a unary ``message``, or the EvaluateChunked ``payloads`` of
    one or more ``streams`` (parts of the request sent at once, each over its own connection).

    A context manager: leaving it gives the shared-memory segments the call used back to their pool.
    """

    message: bytes | None  # a serialised EvaluateRequest
    payloads: Iterator[bytes] | None
    as_torch: bool
    arena: SharedMemoryArena | None = None
    #: Parts of one request cut along its rows (:func:`lossd_client.split.split_rows`), or None.
    parts: list[Iterator[bytes]] | None = None
    #: What joins the parts' answers: (reduction, request id, loss, class-index target).
    join: tuple[str, str, str, bool] | None = None
    #: What a valid answer to the request holds (each part's in ``part_answers``).
    expect: answers.Expected | None = None
    part_answers: list[answers.Expected] | None = None

    @property
    def chunked(self) -> bool:
        """Whether the request goes through EvaluateChunked (``streams``) instead of Evaluate."""
        return self.payloads is not None or self.parts is not None

    @property
    def streams(self) -> list[Iterator[bytes]]:
        """The EvaluateChunked calls to make at once, each an iterator of its serialised messages."""
        return self.parts if self.parts is not None else [self.payloads] if self.payloads is not None else []

    def parse(self, response: pb.EvaluateResponse) -> EvaluateResult:
        """The answer, as the caller's kind of array (see :func:`parse`), checked against the request."""
        return parse(response, self.as_torch, self.expect)

    def answer(self, responses: Sequence[pb.EvaluateResponse]) -> EvaluateResult:
        """The answer from the responses of every stream (one response unless the request was cut:
        each part's answer is checked against its part, a failed part's error raised)."""
        if self.join is None:
            return self.parse(responses[0])
        return self.parse(split.join_responses(responses, *self.join, expected=self.part_answers))

    def __enter__(self) -> Call:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.arena is not None:
            self.arena.close()


def needs_server_limit(req: LossRequest, *, shared_memory: bool, server_max: int | None, shm_min_bytes: int = 0) -> bool:
    """Whether :func:`route` needs the server's message limit (GetServerInfo) before it can decide
    (``shared_memory``: only the bytes that stay inline count, see :func:`inline_nbytes`)."""
    if server_max is not None:
        return False
    size = inline_nbytes(req, shm_min_bytes) if shared_memory else request_nbytes(req)
    return size > SMALL_REQUEST_BYTES


def needs_limit_before_streams(server_max: int | None) -> bool:
    """Whether ``evaluate_many`` asks the server's message limit before it opens its streams:
    whenever it is not known yet, whatever the items, since an item over SMALL_REQUEST_BYTES
    needs it (:func:`needs_server_limit`) and the source has not been read. Asked once the
    streams are open, it deadlocked: the server reserves a read's bytes of its memory budget for
    each open stream's next message, and waits in line for the bytes of GetServerInfo's read like
    any other; two new clients' ``evaluate_many`` on a budget of two reads each held one and
    waited for the other, until both gave way (RESOURCE_EXHAUSTED, idle_read_yield_s later), and
    64 clients in a soak waited 37.5 s on a budget of four."""
    return server_max is None


def inline_nbytes(req: LossRequest, shm_min_bytes: int) -> int:
    """Tensor bytes a shared-memory request still carries inline: input and target under
    ``shm_min_bytes`` (see SharedMemoryArena.place), and the class weights (never placed)."""
    small = [v for v in (req.input, req.target) if tensors.nbytes(v) < shm_min_bytes]
    return tensors_nbytes(*small, req.weight, req.pos_weight)


def route(
    req: LossRequest,
    *,
    server_max: int | None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    chunked_above_bytes: int = layout.CHUNKED_ABOVE_BYTES,
    segments: SegmentPool | None = None,
    shm_min_bytes: int = 0,
    parallel_streams: int = 1,
) -> Call:
    """How to send ``req``: through shared memory when ``segments`` are given (same host) and the
    bytes that stay inline fit the server's unary budget, else EvaluateChunked when its tensor
    bytes exceed the server's unary budget or
    ``chunked_above_bytes`` (cut along its rows into up to ``parallel_streams`` calls where the
    parts' answers join exactly: :mod:`lossd_client.split`), else one Evaluate message.
    ``server_max`` is the server's --max-message-bytes (see :func:`needs_server_limit`). Raises
    InvalidArgumentError for a request that cannot be sent.
    """
    if segments is not None and (server_max is None or inline_nbytes(req, shm_min_bytes) <= layout.unary_budget(server_max)):
        arena = SharedMemoryArena(shm_min_bytes, segments)
        try:
            msg, as_torch = build(req, arena)
        except BaseException:
            arena.close()
            raise
        return Call(msg.SerializeToString(), None, as_torch, arena, expect=answers.expected(req))
    size = request_nbytes(req)
    if size > SMALL_REQUEST_BYTES:
        if server_max is None:
            raise ValueError("route: a request of more than SMALL_REQUEST_BYTES needs the server's limit (see needs_server_limit)")
        if size > layout.unary_budget(server_max) or (size > chunked_above_bytes and _streams(req)):
            as_torch = tensors.is_torch_tensor(req.input)
            if (needed := header_parts(req, server_max)) > MAX_HEADER_PARTS:
                raise _too_many_parts(req, needed, server_max)
            parts = split.split_rows(req, max(parallel_streams, needed))
            if parts is None:
                return Call(None, chunk_payloads(req, chunk_bytes, server_max), as_torch, expect=answers.expected(req))
            streams = [chunk_payloads(part, chunk_bytes, server_max) for part in parts]
            reduction = layout.REDUCTION_NAMES[layout.REDUCTIONS[req.reduction]]
            join = (reduction, req.id, req.loss, split.class_indices(req))
            expect, part_answers = answers.expected(req), [answers.expected(part) for part in parts]
            return Call(None, None, as_torch, parts=streams, join=join, expect=expect, part_answers=part_answers)
    encoded = encode(req)
    return Call(encoded.tobytes(), None, encoded.as_torch, expect=answers.expected(req))


def _streams(req: LossRequest) -> bool:
    """Whether EvaluateChunked can carry the request (see layout.input_rows_are_output_rows)."""
    return layout.input_rows_are_output_rows(req.loss, np.shape(req.input), np.shape(req.target))


# --------------------------------------------------------------------------- answers
def parse(response: pb.EvaluateResponse, as_torch: bool, expect: answers.Expected | None = None) -> EvaluateResult:
    """A response -> EvaluateResult (torch tensors when ``as_torch``); raises the item's error as a
    LossdError, and InternalError naming the field where the answer does not fit ``expect``, what
    a valid answer to the request holds (:func:`lossd_client.answers.evaluate_answer`)."""
    answers.evaluate_answer(response, expect)
    result = EvaluateResult(
        loss=answers.decoded(response.loss, "loss", as_torch=as_torch),
        loss_sum=response.loss_sum,
        weight_sum=response.weight_sum,
        counted=response.counted,
        id=response.id,
    )
    for name, value in response.extras.items():
        result.extras[name] = answers.decoded(value, f"extras[{shown(name)}]", as_torch=as_torch)
    if response.HasField("sequences"):
        s = response.sequences
        result.sequences = SequenceStats(
            nll_sum=np.array(s.nll_sum, dtype=np.float64),
            tokens=np.array(s.tokens, dtype=np.int64),
            mean_nll=np.array(s.mean_nll, dtype=np.float64),
            perplexity=np.array(s.perplexity, dtype=np.float64),
            is_greedy=np.array(s.is_greedy, dtype=bool),
        )
    return result


def token_ids(tokens: Any, name: str = "tokens") -> np.ndarray:
    """Token ids of any integer dtype (numpy or torch: int32, uint16, ... as tokenizers hand them
    out) as an int64 numpy array (the caller's own when it is one), the one rule of the LM helpers
    (:func:`perplexity_request`, :func:`loglikelihood_request`, ``client.compare``), which are
    lossd's API, not torch mirrors (torch's losses take int64 or uint8 class indices only).
    Anything else (floats, bools, uint64 past int64) is InvalidArgumentError naming ``name``."""
    with tensor_field(name):
        if tensors.is_torch_tensor(tokens):
            tensors.check_dense(tokens)
        integer, dtype, arr = _integer_dtype(tokens)
        if integer and arr is None:  # a torch tensor
            if tokens.device.type == "meta":
                raise tensors.UnsupportedTensorError("a meta tensor has no data to send")
            torch = sys.modules["torch"]
            held = tokens.detach().cpu()  # uint64 as it is: a cast to int64 would wrap 2**64 - 100 to -100 (ignored)
            arr = held.numpy() if held.dtype == torch.uint64 else held.to(torch.int64).numpy()
    if not integer:
        raise InvalidArgumentError(f"{name}: expected token ids of an integer dtype, got {dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) >= 2**63:
        raise InvalidArgumentError(f"{name}: token id {int(arr.max())} is out of int64 range")
    return arr.astype(np.int64, copy=False)


def integer_token_ids(tokens: Any, name: str) -> Any:
    """:func:`token_ids` of tokens of an integer dtype; other tokens (None, floats, ...) as they
    are, for the caller to send or refuse as it always has."""
    if tokens is None:
        return None
    with tensor_field(name):
        integer = _integer_dtype(tokens)[0]
    return token_ids(tokens, name) if integer else tokens


def _integer_dtype(tokens: Any) -> tuple[bool, Any, np.ndarray | None]:
    """(whether ``tokens`` has an integer dtype, the dtype, the numpy array of a non-torch value)."""
    if tensors.is_torch_tensor(tokens):
        dtype = tokens.dtype
        return not (dtype.is_floating_point or dtype.is_complex or str(dtype) == "torch.bool"), dtype, None
    arr = tensors.as_array(tokens)
    return arr.dtype.kind in "iu", arr.dtype, arr


#: The request fields the LM helpers send their arguments as, by the arguments' names: their errors
#: name ``logits`` and ``tokens`` (:func:`lossd_client.errors.caller_fields`), not ``input`` and ``target``.
LM_FIELDS = {"input": "logits", "target": "tokens"}


def perplexity_request(logits: Any, tokens: Any, *, shift: bool, ignore_index: int) -> LossRequest:
    """(B, T, V) logits and (B, T) tokens -> the request behind :meth:`LossClient.perplexity`."""
    return LossRequest(
        logits,
        token_ids(tokens),
        reduction="sum",
        ignore_index=ignore_index,
        class_axis=-1,
        shift_targets=flag_argument("shift", shift),
        extras=("target_logprob",),
        sequence_stats=True,
    )


def loglikelihood_request(logits: Any, tokens: Any, continuation_start: Any) -> LossRequest:
    """Score tokens[continuation_start:] given the preceding context (lm-evaluation-harness).

    Every continuation token must be a token id (>= 0): one the loss would ignore (-100) would
    silently drop out of the sum, so it is InvalidArgumentError naming ``tokens``.
    """
    given = token_ids(tokens)
    if given.ndim == 0:
        raise InvalidArgumentError("tokens: expected token ids of one sequence (T,) or a batch (B, T), got a 0-d array")
    tok = np.array(given, copy=True)
    if tok.ndim == 1:
        tok = tok[None, :]
    starts = _continuation_starts(continuation_start, tok.shape[0])
    positions = np.arange(tok.shape[1])
    for row, start in enumerate(starts.tolist()):  # Python ints: a uint64 past int64 keeps its value
        if not 1 <= start <= tok.shape[1]:
            raise InvalidArgumentError(f"continuation_start: {start} is outside [1, {tok.shape[1]}] for sequence {row}")
        negative = np.flatnonzero(tok[row, start:] < 0)
        if negative.size:
            at = start + int(negative[0])
            raise InvalidArgumentError(
                f"tokens: continuation token {int(tok[row, at])} at sequence {row}, position {at} is not a token id "
                "(negative: the loss would ignore it and leave it out of the log-likelihood)"
            )
        tok[row, positions < start] = -100
    target = tok.reshape(given.shape)
    return LossRequest(logits, target, reduction="sum", class_axis=-1, shift_targets=True, sequence_stats=True, ignore_index=-100)


def _continuation_starts(continuation_start: Any, sequences: int) -> np.ndarray:
    """One start per sequence from an integer or one integer per sequence (numpy, torch, a list);
    anything else (a float, which would be truncated to another continuation, a bool, a string,
    None, another count) is InvalidArgumentError naming ``continuation_start``."""
    value = continuation_start
    with tensor_field("continuation_start"):
        if tensors.is_torch_tensor(value):
            value = value.detach().cpu().numpy()
        try:
            starts = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"continuation_start: expected an integer or one integer per sequence ({exc})") from None
    if starts.shape == (0,) == (sequences,) and not hasattr(value, "dtype"):
        starts = starts.astype(np.int64)  # [] for no sequences: numpy makes it float64
    if starts.dtype.kind not in "iu":
        got = repr(continuation_start) if starts.ndim == 0 else f"a {type(continuation_start).__name__} of {starts.dtype}"
        raise InvalidArgumentError(f"continuation_start: expected an integer or one integer per sequence, got {got}")
    if starts.ndim > 1 or (starts.ndim == 1 and starts.shape[0] != sequences):
        raise InvalidArgumentError(
            f"continuation_start: expected an integer or one per sequence ({sequences}), got shape {list(starts.shape)}"
        )
    return np.broadcast_to(starts, (sequences,))


def perplexity_result(result: EvaluateResult, request: LossRequest) -> PerplexityResult:
    """The answer to :func:`perplexity_request` ``request`` as a PerplexityResult.

    ``token_nll`` is ``-target_logprob`` where a token is scored, torch's sign included (a log-probability
    of 0, V = 1 or a one-hot row, gives -0.0 as ``F.cross_entropy(reduction='none')`` does), and +0.0
    where none is (as torch's ignored losses), not the -0.0 a negated 0 would be.
    """
    logprob, unscored = result.extras["target_logprob"], unscored_positions(request)
    if tensors.is_torch_tensor(logprob):
        import torch

        token_nll = torch.where(torch.from_numpy(unscored), 0.0, -logprob)
    else:
        token_nll = np.where(unscored, logprob.dtype.type(0.0), -logprob)[()]  # [()]: 0-d as the numpy scalar -logprob is
    s = result.sequences
    return PerplexityResult(
        token_nll=token_nll,
        sequence_nll_sum=s.nll_sum,
        sequence_tokens=s.tokens,
        sequence_perplexity=s.perplexity,
        nll_sum=result.loss_sum,
        tokens=result.counted,
    )


def unscored_positions(request: LossRequest) -> np.ndarray:
    """Where :func:`perplexity_request`'s ``request`` scores no token: its target is ``ignore_index``
    (with ``shift_targets`` position t's target is token t+1, and the last position has none)."""
    unscored = np.asarray(np.asarray(request.target) == _int_argument("ignore_index", request.ignore_index))  # 0-d: an array too
    if request.shift_targets:
        unscored = np.concatenate((unscored[..., 1:], np.ones_like(unscored[..., :1])), axis=-1)
    return unscored


def loglikelihood_result(result: EvaluateResult) -> LoglikelihoodResult:
    """The answer to :func:`loglikelihood_request` as a LoglikelihoodResult."""
    s = result.sequences
    return LoglikelihoodResult(logprob=0.0 - s.nll_sum, is_greedy=s.is_greedy)  # an empty continuation: 0.0, not -0.0


def server_info(msg: pb.ServerInfo) -> ServerInfo:
    """A GetServerInfo answer as a :class:`ServerInfo` (dtypes by name). A message limit under
    :data:`~lossd_client.layout.MIN_MESSAGE_BYTES` (0, negative), which no lossd server has, is
    InternalError naming the server's value. Such a limit used to be kept and routed by: a 0 failed
    every request over 512 bytes for the client's lifetime, telling the caller to split the request
    (probe 18)."""
    for name in ("max_receive_message_bytes", "max_send_message_bytes"):
        if (value := getattr(msg, name)) < layout.MIN_MESSAGE_BYTES:
            raise InternalError(
                f"the server's GetServerInfo answer has {name} = {value}, under the {layout.MIN_MESSAGE_BYTES} bytes every lossd "
                "server allows (its --max-message-bytes and --max-send-message-bytes): a broken server, or not a lossd server"
            )
    values = {f.name: getattr(msg, f.name) for f in dataclasses.fields(ServerInfo)}
    for name in ("input_dtypes", "target_dtypes"):
        values[name] = tuple(layout.dtype_name(d) for d in values[name])
    return ServerInfo(**values)


def health_status(reply: Any) -> str:
    """A grpc.health.v1 HealthCheckResponse's status name: SERVING, NOT_SERVING, ..."""
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# --------------------------------------------------------------------------- evaluate_many
ACCEPTED_ITEMS = "a LossRequest, a mapping with LossRequest's field names, or an (input, target) pair"


def as_loss_request(item: Any, index: int) -> LossRequest:
    """Item ``index`` of ``evaluate_many`` as a LossRequest; TypeError naming it for anything else."""
    if isinstance(item, LossRequest):
        return item
    if isinstance(item, Mapping):
        try:
            return LossRequest(**item)
        except TypeError as exc:  # a missing, unknown or non-string key
            raise TypeError(
                f"evaluate_many: item {index} is a mapping that does not fit LossRequest ({exc}); expected {ACCEPTED_ITEMS}"
            ) from None
    if isinstance(item, tuple) and len(item) == 2:
        return LossRequest(*item)
    got = f"a tuple of {len(item)} items" if isinstance(item, tuple) else f"{type(item).__module__}.{type(item).__qualname__}"
    raise TypeError(f"evaluate_many: item {index} is {got}; expected {ACCEPTED_ITEMS}")


def pack_size(window: int, pack: int | None, streams: int = 1) -> int:
    """Requests per message: ``window // (4 * streams)`` by default (several messages in flight on
    each stream), at most ``window`` and :data:`~lossd_client.layout.MAX_PACKED_ITEMS`."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    size = max(1, window // (4 * streams)) if pack is None else max(1, min(pack, window))
    return min(size, layout.MAX_PACKED_ITEMS)


def stream_count(window: int, pack: int | None, connections: int) -> int:
    """How many streams one ``evaluate_many`` opens: one per connection, but no more than the
    messages its window keeps in flight (with the default pack, every connection)."""
    if pack is None:
        return min(connections, window)
    return max(1, min(connections, -(-window // pack_size(window, pack))))


class Merge:
    """The answers of an ``evaluate_many``'s streams read into one inbox, without the I/O.

    Each stream's reader puts :meth:`message` for every response, :meth:`failed` if its call
    fails and :meth:`end` once it is over; the client puts :data:`LANE` when a new stream must be
    opened (see :class:`~lossd_client.lanes.Lanes`) and :data:`WAKE` when the source has ended.
    The consumer hands every item it takes to :meth:`take` until ``lanes.done``.
    """

    LANE = ("lane", None)
    WAKE = ("wake", None)

    def __init__(self, lanes: Lanes, may_resend: Callable[[BaseException], bool] = gave_way) -> None:
        """``may_resend``: whether a stream's failure lets what it carried go again (a give-way)."""
        self.lanes = lanes
        self._may_resend = may_resend

    @staticmethod
    def message(response: Any) -> tuple[str, Any]:
        """The item a reader puts for one response."""
        return ("message", response)

    @staticmethod
    def failed(exc: BaseException, lane: int) -> tuple[str, Any]:
        """The item a reader puts when stream ``lane``'s call fails."""
        return ("failed", (exc, lane))

    @staticmethod
    def end(lane: int) -> tuple[str, Any]:
        """The item a reader puts when stream ``lane``'s call is over."""
        return ("end", lane)

    def take(self, item: tuple[str, Any]) -> Any | None:
        """The response an item carries; None for the others (a stream that ended, or gave way:
        what it carried unanswered is queued again). Raises a stream's error, or a give-way past
        :data:`~lossd_client.lanes.MAX_RESENDS`."""
        kind, value = item
        if kind == "message":
            return value
        if kind == "failed":
            exc, lane = value
            if not self._may_resend(exc):
                raise exc
            self.lanes.gave_way(lane, exc)
        elif kind == "end":
            self.lanes.ended(value)
        return None


def _without_tracebacks(exc: BaseException) -> BaseException:
    """``exc`` kept for later without its tracebacks (and its cause's), whose frames hold the
    rejected item's arrays: 200,000 rejected items took 1 GB until they were yielded."""
    link: BaseException | None = exc
    while link is not None:
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return exc


#: What :meth:`Stream.add` returns for an item the client rejected and answers itself.
REJECTED = object()
#: Put among a stream's received messages when :meth:`Stream.settle` answered an item: carries no answer,
#: but wakes the reader so that the answer is yielded without waiting for the server's next one.
SETTLED = object()


class Stream:
    """One ``evaluate_many`` call without its I/O: the items in submission order, packed into
    messages, and the answers handed back in that order.

    The client feeds items with :meth:`add` while it holds a window slot, sends
    :meth:`message` of each batch, and gives every message it receives to :meth:`ready`.
    An item that cannot be built, or a source that fails, is recorded (:meth:`fail`) and
    raised by :meth:`finish` after the answers to the items before it; with ``return_exceptions``
    an item the client rejects (a :class:`LossdError`, e.g. an unknown reduction) is answered in
    its place like one the server rejects, and the stream goes on (:data:`REJECTED`). An item too
    large for one message is evaluated by the client alone and its answer given to :meth:`settle`.
    """

    def __init__(self, window: int, pack: int | None, return_exceptions: bool, streams: int = 1) -> None:
        self.pack = pack_size(window, pack, streams)
        self.window = window
        self.return_exceptions = return_exceptions
        self.failure: Exception | None = None
        self._sent: dict[str, tuple[bool, answers.Expected]] = {}  # each request sent: (torch answer, what its answer holds)
        self._caller_ids: dict[str, str] = {}  # the wire numbers the items; results carry the caller's id
        self._order: list[str] = []
        self._ready: dict[str, pb.EvaluateResponse] = {}
        self._done: dict[str, EvaluateResult | LossdError] = {}  # answered by the client: rejected or evaluated alone
        self._next = 0

    @property
    def method(self) -> str:
        """The RPC: EvaluateStream (one request per message) or EvaluatePacked."""
        return "EvaluateStream" if self.pack == 1 else "EvaluatePacked"

    def add(self, item: Any, server_max: int | None = None) -> Encoded | LossRequest | object | None:
        """The next item's wire request, numbered: :meth:`request` then :meth:`place`."""
        req = self.request(item)
        return req if req is None or req is REJECTED else self.place(req, server_max)  # type: ignore[arg-type]

    def request(self, item: Any) -> LossRequest | object | None:
        """The next item as a LossRequest, numbered (its id); :data:`REJECTED` when the client rejected
        it and its error is its answer (nothing to send); None when it cannot be built (then :meth:`fail`)."""
        rid = str(len(self._order))
        try:
            request = as_loss_request(item, len(self._order))
            req = replace(request, id=rid)
        except Exception as exc:  # noqa: BLE001 - a LossdError is answered in place or raised in order, others by finish()
            return self._refused(rid, exc)
        self._caller_ids[rid] = request.id
        self._order.append(rid)
        return req

    def place(self, req: LossRequest, server_max: int | None = None) -> Encoded | LossRequest | object | None:
        """A numbered request's wire request; ``req`` itself when its tensors exceed the unary budget of
        ``server_max`` (the server's message limit): the client then evaluates it alone, as
        ``evaluate()`` does (EvaluateChunked), and hands the answer to :meth:`settle`.
        :data:`REJECTED` or None as for :meth:`request`."""
        try:
            encoded = encode(req)  # views of the tensor bytes: cheap even for a large request
        except Exception as exc:  # noqa: BLE001 - as in request()
            return self._refused(req.id, exc, numbered=True)
        # the serialised size bounds the tensor bytes: counting those (2 us) only when it is over
        if server_max is not None and encoded.nbytes > (budget := layout.unary_budget(server_max)) and request_nbytes(req) > budget:
            return req
        self._sent[req.id] = (encoded.as_torch, answers.expected(req))
        return encoded

    def settle(self, rid: str, answer: EvaluateResult | LossdError) -> None:
        """The answer to an item the client evaluated itself (see :meth:`place`): yielded in its place
        (an error raised there, unless ``return_exceptions``)."""
        self._done[rid] = _without_tracebacks(answer) if isinstance(answer, LossdError) else answer

    def _refused(self, rid: str, exc: Exception, numbered: bool = False) -> object | None:
        if not isinstance(exc, LossdError) or not self.return_exceptions:
            self.fail(exc)
            return None
        self._done[rid] = _without_tracebacks(exc)
        if not numbered:
            self._order.append(rid)
        return REJECTED

    def fail(self, exc: Exception) -> None:
        """Stop taking items: ``exc`` is raised by :meth:`finish` after the answers sent before it."""
        self.failure = exc

    def full(self, batch: Sequence[Encoded]) -> bool:
        """Whether a message holds enough: ``pack`` requests, or PACK_BYTES of them (large messages
        cost fresh multi-megabyte buffers on both sides: 16 requests of 64x1000 fp32 per message
        took 397 us of client CPU per request, 4 took 212 us; see PACK_BYTES for the server)."""
        return len(batch) >= self.pack or sum(encoded.nbytes for encoded in batch) >= PACK_BYTES

    def message(self, batch: Sequence[Encoded]) -> bytes:
        """What one stream message carries, serialised: the request, or an EvaluateBatch of them."""
        if self.pack == 1:
            return batch[0].tobytes()
        return b"".join(part for encoded in batch for part in encoded.framed(1))

    def answers(self, message: Any) -> Sequence[pb.EvaluateResponse]:
        """The responses one received message carries (each frees one window slot); none for
        :data:`SETTLED`, which the client puts among them when it answered an item itself."""
        if message is SETTLED:
            return ()
        return [message] if self.pack == 1 else message.responses

    def ready(self, responses: Iterable[pb.EvaluateResponse] = ()) -> Iterator[EvaluateResult | LossdError]:
        """Results that are next in input order, once their answers are in (with no responses:
        the client's rejections that are next, as at the end of the stream). An answer for an id
        that was never sent or is already answered is InternalError."""
        for response in responses:
            rid = response.id
            if rid not in self._sent:
                answers.raise_item_error(response)
                raise InternalError(f"answer for unknown id {shown(rid)}")
            if rid in self._ready:
                raise answers.malformed(f"a second answer for id {shown(rid)}")
            self._ready[rid] = response
        while self._next < len(self._order):
            rid = self._order[self._next]
            if rid in self._done:
                self._next += 1
                answer = self._done.pop(rid)
                caller_id = self._caller_ids.pop(rid, "")
                if isinstance(answer, LossdError):
                    if not self.return_exceptions:
                        raise answer
                else:
                    answer.id = caller_id
                yield answer
            elif rid in self._ready:
                self._next += 1
                yield self._result(self._ready.pop(rid), *self._sent.pop(rid), self._caller_ids.pop(rid))
            else:
                return

    def _result(
        self, response: pb.EvaluateResponse, as_torch: bool, expect: answers.Expected, caller_id: str
    ) -> EvaluateResult | LossdError:
        try:
            result = parse(response, as_torch, expect)
            result.id = caller_id
            return result
        except LossdError as exc:
            if self.return_exceptions:
                return exc
            raise

    def finish(self) -> None:
        """At the end of the stream: raise the recorded failure, or a LossdError if answers are missing."""
        if self.failure is not None:
            raise self.failure
        if self._next < len(self._order):
            raise LossdError(f"the stream ended with {len(self._order) - self._next} of {len(self._order)} results missing")
