"""The zero-copy request walker means exactly what protobuf's parser means, on any bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lossd_client import tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client.layout import MAX_PACKED_ITEMS
from lossd_server import wire

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def request() -> pb.EvaluateRequest:
    msg = pb.EvaluateRequest(id="r1", options=pb.LossOptions(reduction=pb.NONE, ignore_index=3, label_smoothing=0.1))
    tensors.to_proto(np.arange(6, dtype=np.float32).reshape(2, 3), msg.input)
    tensors.to_proto(np.array([1, -5]), msg.target)
    tensors.to_proto(np.ones(3, np.float32), msg.options.weight)
    return msg


def chunk() -> pb.EvaluateChunk:
    header = pb.ChunkHeader(id="c", input_dtype=pb.BFLOAT16, input_shape=[4, 5], options=pb.LossOptions(class_axis=-1))
    tensors.to_proto(np.array([1, 2, 3, 4]), header.target)
    return pb.EvaluateChunk(header=header, input_rows=b"\x01" * 40, target_rows=b"")


def assert_same_tensor(got: wire.WireTensor | None, msg: pb.Tensor | None) -> None:
    if msg is None:
        assert got is None
        return
    assert got.dtype == msg.dtype and got.shape == tuple(msg.shape) and bytes(got.data) == msg.data
    assert (got.shm is None) == (not msg.HasField("shm"))
    if got.shm is not None:
        assert got.shm == msg.shm


def field(msg, name):
    return getattr(msg, name) if msg.HasField(name) else None


def assert_same_request(got: wire.WireRequest, msg: pb.EvaluateRequest) -> None:
    assert got.id == msg.id and got.options == msg.options
    assert_same_tensor(got.input, field(msg, "input"))
    assert_same_tensor(got.target, field(msg, "target"))


def assert_same_chunk(got: wire.WireChunk, msg: pb.EvaluateChunk) -> None:
    assert bytes(got.input_rows) == msg.input_rows and bytes(got.target_rows) == msg.target_rows
    if not msg.HasField("header"):
        assert got.header is None
        return
    h = msg.header
    assert (got.header.id, got.header.options, got.header.input_dtype, got.header.input_shape) == (
        h.id,
        h.options,
        h.input_dtype,
        tuple(h.input_shape),
    )
    assert_same_tensor(got.header.target, field(h, "target"))


def agree(message_type, data: bytes) -> None:
    try:
        msg = message_type.FromString(data)
    except Exception:  # noqa: BLE001 - protobuf's verdict: not a message
        assert isinstance(wire.parse(message_type, data), wire.Malformed)
        return
    got = wire.parse(message_type, data)
    assert not isinstance(got, wire.Malformed), got
    if message_type is pb.EvaluateRequest:
        assert_same_request(got, msg)
    elif message_type is pb.EvaluateChunk:
        assert_same_chunk(got, msg)
    else:
        assert len(got) == len(msg.requests)
        for g, m in zip(got, msg.requests, strict=True):
            assert_same_request(g, m)


def test_plain_messages_are_views_of_the_received_bytes():
    data = request().SerializeToString()
    got = wire.parse(pb.EvaluateRequest, data)
    assert_same_request(got, request())
    assert got.input.data.obj is data, "Tensor.data must be a view of the message, not a copy"
    c = chunk().SerializeToString()
    assert wire.parse(pb.EvaluateChunk, c).input_rows.obj is c


def test_negative_and_huge_dims_keep_their_value():
    msg = request()
    msg.input.shape[:] = [-1, 2**40, 2**63 - 1]
    assert wire.parse(pb.EvaluateRequest, msg.SerializeToString()).input.shape == (-1, 2**40, 2**63 - 1)


def test_a_sub_message_given_twice_is_merged_as_protobuf_merges_it():
    data = request().SerializeToString() + pb.EvaluateRequest(input=pb.Tensor(dtype=pb.FLOAT64, shape=[9])).SerializeToString()
    agree(pb.EvaluateRequest, data)
    assert wire.parse(pb.EvaluateRequest, data).input.shape == (2, 3, 9)


def test_unknown_fields_are_skipped():
    data = request().SerializeToString() + b"\x78\x05" + b"\x82\x01\x03abc" + b"\x89\x01" + b"\0" * 8
    agree(pb.EvaluateRequest, data)


def mutate(base: bytes, edits: list[tuple[float, int, int]]) -> bytes:
    out = bytearray(base)
    for op, position, value in edits:
        i = position % (len(out) + 1)
        if op < 0.4 and out:
            out[min(i, len(out) - 1)] = value
        elif op < 0.7 and out:
            del out[min(i, len(out) - 1) : min(i, len(out) - 1) + 1 + value % 4]
        else:
            out.insert(i, value)
    return bytes(out)


EDITS = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=5)


@SETTINGS
@given(EDITS)
def test_mutated_requests_agree_with_protobuf(edits):
    agree(pb.EvaluateRequest, mutate(request().SerializeToString(), edits))


@SETTINGS
@given(EDITS)
def test_mutated_chunks_agree_with_protobuf(edits):
    agree(pb.EvaluateChunk, mutate(chunk().SerializeToString(), edits))


@SETTINGS
@given(EDITS)
def test_mutated_batches_agree_with_protobuf(edits):
    agree(pb.EvaluateBatch, mutate(pb.EvaluateBatch(requests=[request(), request()]).SerializeToString(), edits))


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_agree_with_protobuf(data):
    for message_type in (pb.EvaluateRequest, pb.EvaluateChunk, pb.EvaluateBatch):
        agree(message_type, data)


def test_a_batch_of_more_than_max_packed_items_is_malformed_naming_the_limit():
    full = pb.EvaluateBatch(requests=[request()] * MAX_PACKED_ITEMS).SerializeToString()
    received = wire.deserializer(pb.EvaluateBatch)(full)
    assert len(received.message) == MAX_PACKED_ITEMS
    assert received.nbytes == len(full) + MAX_PACKED_ITEMS * wire.REQUEST_OVERHEAD_BYTES  # what the parsed requests hold
    one = request().SerializeToString()
    assert wire.deserializer(pb.EvaluateRequest)(one).nbytes == len(one) + wire.REQUEST_OVERHEAD_BYTES
    one_more = full + pb.EvaluateBatch(requests=[request()]).SerializeToString()
    got = wire.parse(pb.EvaluateBatch, one_more)
    assert isinstance(got, wire.Malformed) and f"MAX_PACKED_ITEMS={MAX_PACKED_ITEMS}" in got.error, got
    with pytest.raises(wire.TooManyItems):  # protobuf's parser, taken on unusual encodings, applies it too
        wire._SLOW[pb.EvaluateBatch](pb.EvaluateBatch.FromString(one_more))
