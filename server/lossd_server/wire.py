"""Request messages parsed without copying their tensor bytes.

protobuf's Python API copies a bytes field every time it is read (and the parser copies it once
more), so a 62.5 MiB request used to cost the server four times its size. Here the messages that
carry bulk bytes (EvaluateRequest, EvaluateBatch, EvaluateChunk, CompareRequest, CompareChunk and
their Tensor / header parts) are walked field by field and ``Tensor.data``, ``input_rows`` and ``target_rows`` become
``memoryview`` slices of the received bytes: the tensors the engine reads *are* the request.
The small parts (LossOptions, CompareOptions, SharedMemoryRef) go through protobuf itself, except
the class weights of LossOptions over OPTIONS_CHECKED_FROM_BYTES, which are views too (:class:`WireOptions`).

Anything this walker does not handle exactly as protobuf would (a sub-message field given twice,
which protobuf merges, groups, a known field with another wire type) is handed to protobuf's own
parser instead, so every message means what protobuf says it means; only the copies differ.
Bytes protobuf cannot parse are answered INVALID_ARGUMENT (see :class:`Malformed`).

What a message may make the server build is bounded by its bytes *before* it is built: a shape
keeps at most MAX_DIMS + 1 sizes however many it declares (counted at C speed, never
materialised: 16 million one-byte sizes used to take 4 s of the event loop and 313 MiB); a message
level has at most MAX_FIELDS fields; LossOptions, which protobuf parses (keeping every repeated
number as 8 bytes), are checked for long shapes and extras first; and protobuf's parser sees a
message with an unusual encoding only up to FALLBACK_MAX_BYTES.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client.layout import MAX_DIMS, MAX_PACKED_ITEMS

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5

#: Fields one message level may carry: an EvaluateBatch has MAX_PACKED_ITEMS requests, every other
#: lossd message a few fields (a shape sent unpacked, one field per size, at most MAX_DIMS of them).
MAX_FIELDS = 4 * MAX_PACKED_ITEMS
#: Values ``LossOptions.extras`` may list (repeats are allowed and count once).
MAX_EXTRA_VALUES = 64
#: Largest message handed to protobuf's own parser when this walker cannot read it.
FALLBACK_MAX_BYTES = 4 * 1024 * 1024
#: LossOptions and CompareOptions spans at most this long are handed to protobuf unchecked (what
#: it builds from them is a few KiB at most); longer ones are checked first, and only their known
#: fields are handed to protobuf (LossOptions' class weights become views, like the input).
OPTIONS_CHECKED_FROM_BYTES = 1024
#: Longest valid SharedMemoryRef name: "/" and "lossd-" and 200 letters, digits, '_' or '-'.
MAX_SHM_NAME_CHARS = 207
#: Bytes of the longest valid SharedMemoryRef (name, 16-byte token, two 64-bit varints, tags),
#: rounded up: a longer one is refused before protobuf copies and decodes it.
MAX_SHM_REF_BYTES = 512
_CONTINUATION_BYTES = bytes(range(0x80, 0x100))
_COUNT_STEP = 1 << 20


class _Unusual(Exception):
    """Valid protobuf, perhaps, but not the plain form this walker handles: use protobuf."""


class DecodeError(ValueError):
    """Bytes that are not a valid message."""


class _Refused(ValueError):
    """A message refused before protobuf sees it; ``field`` names the part, when one is to blame."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class LongShape(tuple):
    """The first MAX_DIMS + 1 sizes of a shape that declares ``declared`` of them; the rest were
    counted, never built (see :func:`bounded_shape`)."""

    declared: int

    def __new__(cls, dims, declared: int) -> LongShape:
        self = super().__new__(cls, dims)
        self.declared = declared
        return self


class LongText(str):
    """A string field (an id) longer than the server's max_id_bytes, which refuses it: never
    decoded (a 100 MB id of ASCII and one emoji became a 400 MB str), it is the empty string
    with the field's UTF-8 size in ``nbytes``."""

    nbytes: int

    def __new__(cls, nbytes: int) -> LongText:
        self = super().__new__(cls, "")
        self.nbytes = nbytes
        return self


def declared_dims(shape) -> int:
    """How many sizes ``shape`` declares (a LongShape holds only the first few)."""
    return shape.declared if isinstance(shape, LongShape) else len(shape)


def bounded_shape(sizes) -> tuple[int, ...]:
    """A protobuf repeated field of sizes as a tuple, or a LongShape past MAX_DIMS."""
    n = len(sizes)
    return tuple(sizes) if n <= MAX_DIMS else LongShape(sizes[: MAX_DIMS + 1], n)


@dataclass(slots=True)
class WireTensor:
    """A lossd.v1.Tensor whose ``data`` is a view of the received message."""

    dtype: int = 0
    shape: tuple[int, ...] = ()
    data: memoryview = memoryview(b"")
    shm: pb.SharedMemoryRef | None = None


class WireOptions:
    """LossOptions whose class weights (``weight``, ``pos_weight``: None when absent) are views of
    the received message; every other field is read from ``rest``, protobuf's parse of the others.
    ``ByteSize()`` is the options' size on the wire."""

    __slots__ = ("rest", "weight", "pos_weight", "nbytes")

    def __init__(self, rest: pb.LossOptions, weight: WireTensor | None, pos_weight: WireTensor | None, nbytes: int) -> None:
        self.rest, self.weight, self.pos_weight, self.nbytes = rest, weight, pos_weight, nbytes

    def __getattr__(self, name: str):
        return getattr(self.rest, name)

    def HasField(self, name: str) -> bool:  # noqa: N802 - protobuf's spelling
        if name in ("weight", "pos_weight"):
            return getattr(self, name) is not None
        return self.rest.HasField(name)

    def ByteSize(self) -> int:  # noqa: N802 - protobuf's spelling
        return self.nbytes


@dataclass(slots=True)
class WireRequest:
    """An EvaluateRequest; ``input`` / ``target`` are None when the field is absent."""

    id: str = ""
    input: WireTensor | None = None
    target: WireTensor | None = None
    options: pb.LossOptions | WireOptions = field(default_factory=pb.LossOptions)


@dataclass(slots=True)
class WireHeader:
    """A ChunkHeader."""

    id: str = ""
    options: pb.LossOptions | WireOptions = field(default_factory=pb.LossOptions)
    input_dtype: int = 0
    input_shape: tuple[int, ...] = ()
    target: WireTensor | None = None


@dataclass(slots=True)
class WireChunk:
    """An EvaluateChunk."""

    header: WireHeader | None = None
    input_rows: memoryview = memoryview(b"")
    target_rows: memoryview = memoryview(b"")


@dataclass(slots=True)
class WireCompareRequest:
    """A CompareRequest; absent tensors are None."""

    id: str = ""
    reference: WireTensor | None = None
    candidate: WireTensor | None = None
    target: WireTensor | None = None
    options: pb.CompareOptions = field(default_factory=pb.CompareOptions)


@dataclass(slots=True)
class WireCompareHeader:
    """A CompareHeader."""

    id: str = ""
    options: pb.CompareOptions = field(default_factory=pb.CompareOptions)
    reference_dtype: int = 0
    reference_shape: tuple[int, ...] = ()
    candidate_dtype: int = 0
    candidate_shape: tuple[int, ...] = ()
    target: WireTensor | None = None


@dataclass(slots=True)
class WireCompareChunk:
    """A CompareChunk."""

    header: WireCompareHeader | None = None
    reference_rows: memoryview = memoryview(b"")
    candidate_rows: memoryview = memoryview(b"")


#: What one parsed request holds beyond its bytes until it is answered, counted in the memory
#: budget so that many tiny requests cannot hold more than it: its Python objects (about 820 bytes,
#: tracemalloc), its budget share, its task and its answer's message. Measured: 4 streams of 32
#: in-flight EvaluatePacked messages of 1024 tiny requests peaked at 340 MiB over the idle server,
#: about 2.7 KB per request read.
REQUEST_OVERHEAD_BYTES = 4096
#: Of REQUEST_OVERHEAD_BYTES, what covers a request's id as a str (an ASCII id of up to 79
#: characters); a longer or wider id is counted beyond it (an id over the server's max_id_bytes
#: is never decoded: :class:`LongText`).
SHORT_ID_BYTES = 128


@dataclass(slots=True)
class Received:
    """What a request deserializer returns: the parsed message and the memory it holds (its size
    on the wire, plus REQUEST_OVERHEAD_BYTES per message, or per request of an EvaluateBatch)."""

    message: object
    nbytes: int


@dataclass(slots=True)
class Malformed:
    """Stands in for bytes that are not a valid ``kind`` message (answered INVALID_ARGUMENT);
    ``field``: the part to blame, when there is one."""

    kind: str
    error: str
    field: str | None = None


# --------------------------------------------------------------------------- primitives
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    byte = buf[pos]
    if byte < 0x80:
        return byte, pos + 1
    result, shift = byte & 0x7F, 7
    while True:
        pos += 1
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if shift > 63:
                raise DecodeError("varint longer than 10 bytes")
            return result & 0xFFFFFFFFFFFFFFFF, pos + 1
        shift += 7
        if shift > 63:
            raise DecodeError("varint longer than 10 bytes")


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _fields(buf: bytes, start: int, end: int):
    """(field number, wire type, value, at) for each field in buf[start:end]; value is an int for
    varints and a (start, stop) pair for length-delimited fields, ``at`` where the field begins."""
    pos = start
    budget = MAX_FIELDS
    while pos < end:
        at = pos
        budget -= 1
        if budget < 0:
            raise _Refused(f"more than MAX_FIELDS={MAX_FIELDS} fields in one message level; no lossd message needs that many")
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0 or number >= 1 << 29 or key > 0xFFFFFFFF:
            raise DecodeError("invalid field number")
        if wire_type == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire_type, value, at
        elif wire_type == _LENGTH:
            size, pos = _varint(buf, pos)
            stop = pos + size
            if stop > end:
                raise DecodeError("truncated length-delimited field")
            yield number, wire_type, (pos, stop), at
            pos = stop
        elif wire_type == _FIXED64:
            pos += 8
            yield number, wire_type, None, at
        elif wire_type == _FIXED32:
            pos += 4
            yield number, wire_type, None, at
        else:
            raise _Unusual("group or unknown wire type")
        if pos > end:
            raise DecodeError("truncated field")


def _expect(wire_type: int, wanted: int) -> None:
    if wire_type != wanted:
        raise _Unusual("known field with another wire type")


def _text(buf: bytes, span: tuple[int, int], text_max: int) -> str:
    if span[1] - span[0] > text_max:
        return LongText(span[1] - span[0])
    try:
        return buf[span[0] : span[1]].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"invalid UTF-8 in a string field: {exc}") from None


def _count_varints(buf: bytes, start: int, stop: int) -> int:
    """Varints in the packed span ``buf[start:stop]``: the bytes without the continuation bit,
    counted a MiB at a time (C speed, bounded scratch); DecodeError if the span is truncated."""
    if start < stop and buf[stop - 1] >= 0x80:
        raise DecodeError("truncated packed field")
    count = 0
    for a in range(start, stop, _COUNT_STEP):
        count += len(buf[a : min(stop, a + _COUNT_STEP)].translate(None, _CONTINUATION_BYTES))
    return count


class _Shape:
    """Sizes of a shape as they are read, keeping at most MAX_DIMS + 1 of them."""

    __slots__ = ("dims", "declared")

    def __init__(self) -> None:
        self.dims: list[int] = []
        self.declared = 0

    def shape(self) -> tuple[int, ...]:
        return tuple(self.dims) if self.declared == len(self.dims) else LongShape(self.dims, self.declared)


def _shape_into(out: _Shape, buf: bytes, wire_type: int, value) -> None:
    dims = out.dims
    if wire_type == _VARINT:
        out.declared += 1
        if len(dims) <= MAX_DIMS:
            dims.append(_int64(value))
    elif wire_type == _LENGTH:
        pos, stop = value
        if stop - pos > 10 * (MAX_DIMS + 1):  # more sizes than any shape may have: count them
            out.declared += _count_varints(buf, pos, stop)
            while len(dims) <= MAX_DIMS:
                v, pos = _varint(buf, pos)
                dims.append(_int64(v))
            return
        while pos < stop:
            v, pos = _varint(buf, pos)
            out.declared += 1
            if len(dims) <= MAX_DIMS:
                dims.append(_int64(v))
        if pos != stop:
            raise DecodeError("truncated packed field")
    else:
        raise _Unusual("shape with another wire type")


# --------------------------------------------------------------------------- messages
def _tensor(buf: bytes, view: memoryview, start: int, stop: int, field: str) -> WireTensor:
    t = WireTensor()
    shape = _Shape()
    seen_shm = False
    for number, wire_type, value, _ in _fields(buf, start, stop):
        if number == 1:
            _expect(wire_type, _VARINT)
            t.dtype = _int32(value)
        elif number == 2:
            _shape_into(shape, buf, wire_type, value)
        elif number == 3:
            _expect(wire_type, _LENGTH)
            t.data = view[value[0] : value[1]]
        elif number == 4:
            _expect(wire_type, _LENGTH)
            if seen_shm:
                raise _Unusual("repeated sub-message")
            seen_shm = True
            _check_shm_ref(value, f"{field}.shm")
            t.shm = pb.SharedMemoryRef.FromString(buf[value[0] : value[1]])
    t.shape = shape.shape()
    return t


def _check_shm_ref(span: tuple[int, int], field: str) -> None:
    """Refuse a SharedMemoryRef longer than any valid one before protobuf copies and decodes it
    (a 60 MB name held the server's memory 900 MiB over idle, and its error echoed it)."""
    if span[1] - span[0] > MAX_SHM_REF_BYTES:
        raise _Refused(
            f"takes {span[1] - span[0]} bytes; a valid reference takes at most {MAX_SHM_REF_BYTES} "
            f"(a name of at most {MAX_SHM_NAME_CHARS} characters and a 16-byte token)",
            field,
        )


def _options(buf: bytes, view: memoryview, span: tuple[int, int]) -> pb.LossOptions | WireOptions:
    """LossOptions, parsed by protobuf up to OPTIONS_CHECKED_FROM_BYTES; longer ones (their class
    weights) are checked first, and their weights become views of the message like the input
    (protobuf copied them three times: a 60 MB weight held 340 MiB of the server's memory)."""
    start, stop = span
    if stop - start <= OPTIONS_CHECKED_FROM_BYTES:
        return pb.LossOptions.FromString(buf[start:stop])
    _check_options(buf, start, stop)
    weights: dict[int, WireTensor] = {}
    for number, wire_type, value, _ in _fields(buf, start, stop):
        if number in (5, 6):
            _expect(wire_type, _LENGTH)
            if number in weights:
                raise _Unusual("repeated sub-message")
            weights[number] = _tensor(buf, view, *value, "options.weight" if number == 5 else "options.pos_weight")
    rest = _known_fields(pb.LossOptions, buf, start, stop, skip=(5, 6))
    return WireOptions(rest, weights.get(5), weights.get(6), stop - start)


def _known_fields(message_type: type, buf: bytes, start: int, stop: int, skip: tuple[int, ...] = ()):
    """``message_type`` parsed by protobuf from the fields of ``buf[start:stop]`` it knows, less
    ``skip``: the unknown fields of a long sub-message, which protobuf would keep (a copy of the
    span and one more inside protobuf: 60 MB of them held 170 MiB more of the server's memory), are
    dropped; lossd never reads nor sends them on."""
    known = message_type.DESCRIPTOR.fields_by_number
    fields = list(_fields(buf, start, stop))
    ends = [f[3] for f in fields[1:]] + [stop]
    parts = [buf[at:end] for (number, _, _, at), end in zip(fields, ends, strict=True) if number in known and number not in skip]
    return message_type.FromString(b"".join(parts))


def _check_options(buf: bytes, start: int, stop: int) -> None:
    """Refuse LossOptions whose weight shapes or extras protobuf would build millions of numbers
    from; within the limits protobuf parses them (and words any error) as usual."""
    extras = 0
    for number, wire_type, value, _ in _fields(buf, start, stop):
        if number == 9 and wire_type == _VARINT:
            extras += 1
        elif number == 9 and wire_type == _LENGTH:
            extras += _count_varints(buf, *value)
        elif number in (5, 6) and wire_type == _LENGTH:
            shape = _Shape()
            tensor = "options.weight" if number == 5 else "options.pos_weight"
            for part, part_type, part_value, _ in _fields(buf, *value):
                if part == 2 and part_type in (_VARINT, _LENGTH):
                    _shape_into(shape, buf, part_type, part_value)
                elif part == 4 and part_type == _LENGTH:
                    _check_shm_ref(part_value, f"{tensor}.shm")
            if shape.declared > MAX_DIMS:
                raise _Refused(f"expected at most {MAX_DIMS} dimensions, got {shape.declared}", f"{tensor}.shape")
    if extras > MAX_EXTRA_VALUES:
        raise _Refused(f"{extras} values, more than MAX_EXTRA_VALUES={MAX_EXTRA_VALUES}", "options.extras")


def _request(buf: bytes, view: memoryview, start: int, stop: int, text_max: int) -> WireRequest:
    r = WireRequest()
    seen: set[int] = set()
    for number, wire_type, value, _ in _fields(buf, start, stop):
        if number == 1:
            _expect(wire_type, _LENGTH)
            r.id = _text(buf, value, text_max)
            continue
        if number not in (2, 3, 4):
            continue
        _expect(wire_type, _LENGTH)
        if number in seen:
            raise _Unusual("repeated sub-message")
        seen.add(number)
        if number == 2:
            r.input = _tensor(buf, view, *value, "input")
        elif number == 3:
            r.target = _tensor(buf, view, *value, "target")
        else:
            r.options = _options(buf, view, value)
    return r


def _header(buf: bytes, view: memoryview, start: int, stop: int, text_max: int) -> WireHeader:
    h = WireHeader()
    shape = _Shape()
    seen: set[int] = set()
    for number, wire_type, value, _ in _fields(buf, start, stop):
        if number == 1:
            _expect(wire_type, _LENGTH)
            h.id = _text(buf, value, text_max)
        elif number == 3:
            _expect(wire_type, _VARINT)
            h.input_dtype = _int32(value)
        elif number == 4:
            _shape_into(shape, buf, wire_type, value)
        elif number in (2, 5):
            _expect(wire_type, _LENGTH)
            if number in seen:
                raise _Unusual("repeated sub-message")
            seen.add(number)
            if number == 2:
                h.options = _options(buf, view, value)
            else:
                h.target = _tensor(buf, view, *value, "header.target")
    h.input_shape = shape.shape()
    return h


def _chunk(buf: bytes, view: memoryview, text_max: int) -> WireChunk:
    c = WireChunk()
    for number, wire_type, value, _ in _fields(buf, 0, len(buf)):
        if number == 1:
            _expect(wire_type, _LENGTH)
            if c.header is not None:
                raise _Unusual("repeated sub-message")
            c.header = _header(buf, view, *value, text_max)
        elif number in (2, 3):
            _expect(wire_type, _LENGTH)
            rows = view[value[0] : value[1]]
            if number == 2:
                c.input_rows = rows
            else:
                c.target_rows = rows
    return c


class TooManyItems(ValueError):
    """An EvaluateBatch with more than MAX_PACKED_ITEMS requests (parsing stops there)."""

    def __init__(self) -> None:
        super().__init__(
            f"requests: more than MAX_PACKED_ITEMS={MAX_PACKED_ITEMS} requests in one message; send at most {MAX_PACKED_ITEMS} per message"
        )


def _batch(buf: bytes, view: memoryview, text_max: int) -> list[WireRequest]:
    requests = []
    for number, wire_type, value, _ in _fields(buf, 0, len(buf)):
        if number == 1:
            _expect(wire_type, _LENGTH)
            if len(requests) == MAX_PACKED_ITEMS:
                raise TooManyItems
            requests.append(_request(buf, view, *value, text_max))
    return requests


def _batch_of(msg: pb.EvaluateBatch) -> list[WireRequest]:
    if len(msg.requests) > MAX_PACKED_ITEMS:
        raise TooManyItems
    return [_request_of(r) for r in msg.requests]


def _walk(buf: bytes, view: memoryview, start: int, stop: int, text_max: int, out, fields: dict[int, tuple[str, object]], prefix: str = ""):
    """Fill ``out`` from the message in ``buf[start:stop]``, as protobuf would: ``fields`` maps a
    field number to (attribute, kind), the kind being "text", "enum", "shape", "bytes" (a view),
    "tensor", a protobuf message class (parsed by protobuf) or a walker of a sub-message; unknown
    fields are skipped, the last scalar wins, a sub-message given twice (merged by protobuf)
    hands the message to protobuf."""
    shapes: dict[str, _Shape] = {}
    seen: set[int] = set()
    for number, wire_type, value, _ in _fields(buf, start, stop):
        if number not in fields:
            continue
        name, kind = fields[number]
        if kind == "enum":
            _expect(wire_type, _VARINT)
            setattr(out, name, _int32(value))
        elif kind == "shape":
            _shape_into(shapes.setdefault(name, _Shape()), buf, wire_type, value)
        else:
            _expect(wire_type, _LENGTH)
            if kind == "text":
                setattr(out, name, _text(buf, value, text_max))
            elif kind == "bytes":
                setattr(out, name, view[value[0] : value[1]])
            elif number in seen:
                raise _Unusual("repeated sub-message")
            else:
                seen.add(number)
                setattr(out, name, _part(kind, buf, view, value, text_max, prefix + name))
    for name, shape in shapes.items():
        setattr(out, name, shape.shape())
    return out


def _part(kind: object, buf: bytes, view: memoryview, span: tuple[int, int], text_max: int, field: str):
    """A sub-message of :func:`_walk`: a tensor, a protobuf message, or what a walker makes of it."""
    if kind == "tensor":
        return _tensor(buf, view, *span, field)
    if isinstance(kind, type):
        if span[1] - span[0] > OPTIONS_CHECKED_FROM_BYTES:
            return _known_fields(kind, buf, *span)
        return kind.FromString(buf[span[0] : span[1]])
    return kind(buf, view, *span, text_max)


_COMPARE_REQUEST = {1: ("id", "text"), 2: ("reference", "tensor"), 3: ("candidate", "tensor"), 4: ("target", "tensor"), 5: ("options", pb.CompareOptions)}  # fmt: skip
_COMPARE_HEADER = {
    1: ("id", "text"), 2: ("options", pb.CompareOptions), 3: ("reference_dtype", "enum"), 4: ("reference_shape", "shape"),
    5: ("candidate_dtype", "enum"), 6: ("candidate_shape", "shape"), 7: ("target", "tensor"),
}  # fmt: skip


def _compare_header(buf: bytes, view: memoryview, start: int, stop: int, text_max: int) -> WireCompareHeader:
    return _walk(buf, view, start, stop, text_max, WireCompareHeader(), _COMPARE_HEADER, "header.")


_COMPARE_CHUNK = {1: ("header", _compare_header), 2: ("reference_rows", "bytes"), 3: ("candidate_rows", "bytes")}


# --------------------------------------------------------------------------- protobuf fallback
def tensor_of(msg: pb.Tensor) -> WireTensor:
    return WireTensor(msg.dtype, bounded_shape(msg.shape), memoryview(msg.data), msg.shm if msg.HasField("shm") else None)


def _request_of(msg: pb.EvaluateRequest) -> WireRequest:
    return WireRequest(
        msg.id,
        tensor_of(msg.input) if msg.HasField("input") else None,
        tensor_of(msg.target) if msg.HasField("target") else None,
        msg.options,
    )


def _chunk_of(msg: pb.EvaluateChunk) -> WireChunk:
    header = None
    if msg.HasField("header"):
        h = msg.header
        header = WireHeader(
            h.id, h.options, h.input_dtype, bounded_shape(h.input_shape), tensor_of(h.target) if h.HasField("target") else None
        )
    return WireChunk(header, memoryview(msg.input_rows), memoryview(msg.target_rows))


def _optional_tensor(msg, name: str) -> WireTensor | None:
    return tensor_of(getattr(msg, name)) if msg.HasField(name) else None


def _compare_request_of(msg: pb.CompareRequest) -> WireCompareRequest:
    tensors = [_optional_tensor(msg, name) for name in ("reference", "candidate", "target")]
    return WireCompareRequest(msg.id, *tensors, msg.options)


def _compare_chunk_of(msg: pb.CompareChunk) -> WireCompareChunk:
    header = None
    if msg.HasField("header"):
        h = msg.header
        header = WireCompareHeader(
            h.id,
            h.options,
            h.reference_dtype,
            bounded_shape(h.reference_shape),
            h.candidate_dtype,
            bounded_shape(h.candidate_shape),
            _optional_tensor(h, "target"),
        )
    return WireCompareChunk(header, memoryview(msg.reference_rows), memoryview(msg.candidate_rows))


_FAST: dict[type, Callable] = {
    pb.EvaluateRequest: lambda buf, view, text_max: _request(buf, view, 0, len(buf), text_max),
    pb.EvaluateBatch: _batch,
    pb.EvaluateChunk: _chunk,
    pb.CompareRequest: lambda buf, view, text_max: _walk(buf, view, 0, len(buf), text_max, WireCompareRequest(), _COMPARE_REQUEST),
    pb.CompareChunk: lambda buf, view, text_max: _walk(buf, view, 0, len(buf), text_max, WireCompareChunk(), _COMPARE_CHUNK),
}
_SLOW: dict[type, Callable] = {
    pb.EvaluateRequest: _request_of,
    pb.EvaluateBatch: _batch_of,
    pb.EvaluateChunk: _chunk_of,
    pb.CompareRequest: _compare_request_of,
    pb.CompareChunk: _compare_chunk_of,
}


def parse(message_type: type, data: bytes, text_max: int | None = None):
    """``data`` as a Wire* value of ``message_type``, or :class:`Malformed`. A string field (an
    id) of more than ``text_max`` bytes is not decoded: it becomes a :class:`LongText`."""
    kind = message_type.DESCRIPTOR.full_name
    try:
        try:
            return _FAST[message_type](data, memoryview(data), len(data) if text_max is None else text_max)
        except (_Unusual, DecodeError, IndexError) as exc:
            if len(data) > FALLBACK_MAX_BYTES:
                why = str(exc) if isinstance(exc, ValueError) else "truncated field"
                return Malformed(
                    kind, f"{why} (such messages are read only up to FALLBACK_MAX_BYTES={FALLBACK_MAX_BYTES}; this one has {len(data)})"
                )
            # protobuf's own parser decides (and words the error) whenever the walk stops
            return _SLOW[message_type](message_type.FromString(data))
    except _Refused as exc:
        return Malformed(kind, str(exc), exc.field)
    except Exception as exc:  # noqa: BLE001 - any decode failure is the client's bad input
        return Malformed(kind, str(exc) or type(exc).__name__)


def deserializer(message_type: type, max_id_bytes: int | None = None) -> Callable[[bytes], Received]:
    """A gRPC request deserializer that never raises (gRPC would answer UNKNOWN). An id over
    ``max_id_bytes`` (the server's limit, which refuses it) is never decoded (see :class:`LongText`)."""

    def deserialize(data: bytes) -> Received:
        parsed = parse(message_type, data, max_id_bytes)
        requests = parsed if isinstance(parsed, list) else [parsed]
        ids = sum(_id_nbytes(getattr(r, "header", None) or r) for r in requests)
        return Received(parsed, len(data) + len(requests) * REQUEST_OVERHEAD_BYTES + ids)

    return deserialize


def _id_nbytes(message: object) -> int:
    """What a parsed message's decoded id holds beyond the SHORT_ID_BYTES of REQUEST_OVERHEAD_BYTES
    (an id of non-ASCII characters takes up to 4 bytes each, as a str)."""
    text = getattr(message, "id", None)
    if not text:
        return 0
    return max(0, sys.getsizeof(text) - SHORT_ID_BYTES)
