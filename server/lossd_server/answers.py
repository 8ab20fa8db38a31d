"""Answers over ``--inline-batch-bytes``: their wire bytes built in pieces on a thread, the call
checked between the pieces, and passed through by the methods' serializers.

A small answer is a protobuf message that gRPC serializes (on the event loop, where it is cheap).
A large one is not: gRPC serializes the returned message on the event loop (a 436 MB answer of
per-sequence statistics held it 1.1 s, health checks included), and protobuf holds the GIL for the
whole of each call (``tolist`` of a field, filling a repeated field, ``SerializeToString``), so
doing them on a thread does not free the loop either: serializing 218 MB on a thread held the loop
0.24 s, as long as it took. Nor could a caller that went away stop them: 2.9 s of CPU went on after
a 0.5 s deadline. So a large answer is written as wire bytes here (:func:`field`, :func:`tensor`,
:func:`packed`: the bytes protobuf writes, in its order, tested equal), from the result's tensors a
:data:`PIECE_BYTES` slice at a time (each slice a short hold of the GIL, the call's checkpoint
between them), then joined (``bytes.join`` releases the GIL when every part is ``bytes``); the
handler returns those bytes, which :func:`serializer` passes to gRPC unchanged.

Copies of an answer alive at once stay at most :data:`ANSWER_COPIES`: while the parts are joined,
the result's tensors, the parts and the joined bytes; then the joined bytes and gRPC's buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch
from lossd_client.protowire import key

from . import codec
from .budget import Reservation

#: Copies of an answer alive at once: the result tensors, the encoded message, gRPC's buffer.
ANSWER_COPIES = 3
#: Bytes of a large answer's tensor written at a time, between two checkpoints of its call.
PIECE_BYTES = 8 * 1024 * 1024
#: Values of an int64 field (a varint each) written at a time.
PIECE_VARINTS = 1024 * 1024

Checkpoint = Callable[[], None] | None


class Encoding(NamedTuple):
    """How one kind of answer is encoded: ``message(request_id, result)``, the protobuf message
    of a small answer, which gRPC serializes; ``parts(request_id, result, checkpoint)``, the wire
    bytes of the same message in parts, for a large one."""

    message: Callable[[str, object], object]
    parts: Callable[[str, object, Checkpoint], list[bytes]]


def serializer(message_type: type) -> Callable[[object], bytes]:
    """``message_type``'s serializer for a method's registration: an answer already serialized
    (``bytes``, see :func:`encode_answer`) goes to gRPC unchanged."""
    serialize = message_type.SerializeToString

    def answer(message: object) -> bytes:
        return message if type(message) is bytes else serialize(message)

    return answer


async def encode_answer(
    encoding: Encoding,
    request_id: str,
    result: object,
    answer_nbytes: int,
    inline_bytes: int,
    held: Reservation,
    checkpoint: Checkpoint = None,
):
    """The answer: ``encoding.message`` (a protobuf message) when its size bound ``answer_nbytes``
    is at most ``inline_bytes`` (--inline-batch-bytes), else its wire bytes, built on a thread
    (:func:`wire_bytes`), stopped by ``checkpoint`` once the call is over. ``held`` counts the
    answer (and keeps it counted until the thread ends, should the call be cancelled meanwhile)."""
    if answer_nbytes <= inline_bytes:
        return encoding.message(request_id, result)
    if checkpoint is not None:
        checkpoint()
    return await held.run_in_thread(wire_bytes, encoding.parts, request_id, result, checkpoint)


def wire_bytes(parts: Callable[[str, object, Checkpoint], list[bytes]], request_id: str, result: object, checkpoint: Checkpoint) -> bytes:
    """``parts(request_id, result, checkpoint)`` joined, after a last checkpoint."""
    written = parts(request_id, result, checkpoint)
    if checkpoint is not None:
        checkpoint()
    return b"".join(written)


def joined(messages: Iterable[object | bytes], number: int, checkpoint: Checkpoint = None) -> bytes:
    """A message whose repeated field ``number`` holds ``messages`` (protobuf messages, or their
    wire bytes), in order: EvaluatePacked's answer, serialized item by item on a thread (each item
    is at most --inline-batch-bytes, or bytes already), ``checkpoint`` between them. Alive at once:
    the items, their bytes and the joined bytes (a large item's bytes are its own), at most
    ANSWER_COPIES; gRPC's buffer comes once the items are gone."""
    written: list[bytes] = []
    for message in messages:
        if checkpoint is not None:
            checkpoint()
        body = message if type(message) is bytes else message.SerializeToString()
        written += (key(number, len(body)), body)
    if checkpoint is not None:
        checkpoint()
    return b"".join(written)


# ---------------------------------------------------------------- wire format
def size(written: list[bytes]) -> int:
    return sum(len(b) for b in written)


def field(number: int, written: list[bytes]) -> list[bytes]:
    """``written`` (a message's bytes, in parts) as its field ``number``."""
    return [key(number, size(written)), *written]


def tensor(number: int, value: torch.Tensor, checkpoint: Checkpoint) -> list[bytes]:
    """``value`` as a Tensor message in field ``number``, as :func:`codec.encode` writes it."""
    head, data = codec.header(value)
    body = [head.SerializeToString()]
    if data.numel():
        body += [key(3, data.numel())] + _slices(data, checkpoint)  # Tensor.data = 3
    return field(number, body)


def packed(number: int, values: torch.Tensor, checkpoint: Checkpoint) -> list[bytes]:
    """A packed repeated field ``number`` of ``values`` (1-d float64, int64 or bool): omitted when
    empty, as protobuf does."""
    values = values.detach().cpu().contiguous()
    if not values.numel():
        return []
    if values.dtype == torch.int64:
        body = []
        for start in range(0, values.numel(), PIECE_VARINTS):
            if checkpoint is not None:
                checkpoint()
            body.append(varints(values[start : start + PIECE_VARINTS].numpy()))
    else:  # float64, bool: their little-endian bytes
        body = _slices(values.view(torch.uint8), checkpoint)
    return field(number, body)


def varints(values: np.ndarray) -> bytes:
    """int64 values as packed varints (a negative one takes 10 bytes, as protobuf writes it)."""
    v = values.view(np.uint64)
    if not len(v) or int(v.max()) < 0x80:
        return v.astype(np.uint8).tobytes()
    lengths = np.ones(len(v), np.int64)
    for k in range(1, 10):
        lengths += v >= np.uint64(1 << 7 * k)
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(starts[-1] + lengths[-1]), np.uint8)
    for k in range(10):
        at = np.flatnonzero(lengths > k)
        if not len(at):
            break
        low = ((v[at] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        out[starts[at] + k] = low | np.where(lengths[at] > k + 1, np.uint8(0x80), np.uint8(0))
    return out.tobytes()


def _slices(data: torch.Tensor, checkpoint: Checkpoint) -> list[bytes]:
    """A 1-d uint8 tensor's bytes, PIECE_BYTES at a time, ``checkpoint`` before each."""
    written = []
    for start in range(0, data.numel(), PIECE_BYTES):
        if checkpoint is not None:
            checkpoint()
        written.append(data[start : start + PIECE_BYTES].numpy().tobytes())
    return written
