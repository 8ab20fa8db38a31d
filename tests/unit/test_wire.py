"""The zero-copy request walker means exactly what protobuf's parser means, on any bytes."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from google.protobuf.internal.encoder import _VarintBytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lossd_client import tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client.layout import MAX_DIMS, MAX_PACKED_ITEMS
from lossd_server import codec, convert, engine, wire

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
    assert got.dtype == msg.dtype and bytes(got.data) == msg.data
    assert_same_shape(got.shape, msg.shape)
    assert (got.shm is None) == (not msg.HasField("shm"))
    if got.shm is not None:
        assert got.shm == msg.shm


def assert_same_shape(got: tuple[int, ...], sizes) -> None:
    """The walker keeps the first MAX_DIMS + 1 sizes of a longer shape and how many it declares."""
    assert wire.declared_dims(got) == len(sizes) and tuple(got) == tuple(sizes)[: MAX_DIMS + 1]


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
    assert (got.header.id, got.header.options, got.header.input_dtype) == (h.id, h.options, h.input_dtype)
    assert_same_shape(got.header.input_shape, h.input_shape)
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


def packed_shape_tensor(sizes: int, field_number: int = 2) -> bytes:
    """A Tensor field (``field_number``) of FLOAT32 whose packed shape has ``sizes`` sizes of 1."""
    tensor = b"\x08\x01" + b"\x12" + _VarintBytes(sizes) + b"\x01" * sizes
    return bytes([field_number << 3 | 2]) + _VarintBytes(len(tensor)) + tensor


def test_a_shape_of_millions_of_sizes_is_counted_not_built():
    import tracemalloc

    sizes = 2_000_000
    data = packed_shape_tensor(sizes) + b"\x1a\x00"
    tracemalloc.start()
    got = wire.parse(pb.EvaluateRequest, data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert wire.declared_dims(got.input.shape) == sizes and len(tuple(got.input.shape)) == MAX_DIMS + 1
    assert peak < 4 * 1024 * 1024, f"parsing held {peak} bytes: the sizes were built"  # a list of them: 16 MB
    with pytest.raises(codec.TensorError, match=f"input.shape: expected at most {MAX_DIMS} dimensions, got {sizes}"):
        codec.shape_of("input", got.input.shape)
    # the same shape through protobuf's parser (an unusual encoding elsewhere in the message)
    slow = wire.parse(pb.EvaluateRequest, data + pb.EvaluateRequest(input=pb.Tensor(dtype=pb.FLOAT32)).SerializeToString())
    assert wire.declared_dims(slow.input.shape) == sizes and len(tuple(slow.input.shape)) == MAX_DIMS + 1


def test_a_truncated_long_packed_shape_is_malformed():
    data = packed_shape_tensor(1000)[:-1] + b"\x80"
    assert isinstance(wire.parse(pb.EvaluateRequest, data), wire.Malformed)


def test_long_option_shapes_and_extras_are_refused_before_protobuf_builds_them():
    weight = packed_shape_tensor(500_000, field_number=5)
    got = wire.parse(pb.EvaluateRequest, b"\x22" + _VarintBytes(len(weight)) + weight)
    assert isinstance(got, wire.Malformed) and got.field == "options.weight.shape", got
    assert got.error == f"expected at most {MAX_DIMS} dimensions, got 500000"
    extras = b"\x4a" + _VarintBytes(100_000) + b"\x01" * 100_000
    got = wire.parse(pb.EvaluateRequest, b"\x22" + _VarintBytes(len(extras)) + extras)
    assert isinstance(got, wire.Malformed) and got.field == "options.extras", got
    assert got.error == f"100000 values, more than MAX_EXTRA_VALUES={wire.MAX_EXTRA_VALUES}"
    few = pb.LossOptions(extras=[1] * (wire.MAX_EXTRA_VALUES + 1))  # a short span: protobuf parses it, convert refuses it
    with pytest.raises(engine.InvalidInput, match="options.extras: 65 values, more than MAX_EXTRA_VALUES=64"):
        convert.decode_options(few)
    ok = pb.LossOptions(extras=[1] * wire.MAX_EXTRA_VALUES)
    assert convert.decode_options(ok)[0].extras == (convert.EXTRA_NAMES[1],)


def test_a_message_of_too_many_fields_is_refused_naming_the_limit():
    data = request().SerializeToString() + b"\x78\x05" * wire.MAX_FIELDS
    got = wire.parse(pb.EvaluateRequest, data)
    assert isinstance(got, wire.Malformed) and f"MAX_FIELDS={wire.MAX_FIELDS}" in got.error, got
    agree(pb.EvaluateRequest, request().SerializeToString() + b"\x78\x05" * (wire.MAX_FIELDS - 10))


def test_an_unusual_encoding_goes_to_protobuf_only_up_to_its_size_limit():
    twice = pb.EvaluateRequest(input=pb.Tensor(dtype=pb.FLOAT64, shape=[9])).SerializeToString()
    small = request().SerializeToString() + twice
    agree(pb.EvaluateRequest, small)  # merged, as protobuf merges it
    big = pb.EvaluateRequest(id="x", input=pb.Tensor(dtype=pb.FLOAT32, data=bytes(wire.FALLBACK_MAX_BYTES))).SerializeToString()
    got = wire.parse(pb.EvaluateRequest, big + twice)
    assert isinstance(got, wire.Malformed) and f"FALLBACK_MAX_BYTES={wire.FALLBACK_MAX_BYTES}" in got.error, got


@pytest.mark.parametrize(
    "message_type, make",
    [
        (pb.EvaluateRequest, lambda text: pb.EvaluateRequest(id=text)),
        (pb.EvaluateBatch, lambda text: pb.EvaluateBatch(requests=[pb.EvaluateRequest(id=text)])),
        (pb.EvaluateChunk, lambda text: pb.EvaluateChunk(header=pb.ChunkHeader(id=text))),
        (pb.CompareRequest, lambda text: pb.CompareRequest(id=text)),
        (pb.CompareChunk, lambda text: pb.CompareChunk(header=pb.CompareHeader(id=text))),
    ],
)
def test_an_id_over_max_id_bytes_is_measured_never_decoded(message_type, make):
    """A 20 MB id of ASCII and one emoji decoded to an 80 MB str (4 bytes a character) before the
    server refused it for its length; over max_id_bytes it is now a LongText of its UTF-8 size."""
    import tracemalloc

    text = "x" * 20_000_000 + "\U0001f600"
    data = make(text).SerializeToString()
    deserialize = wire.deserializer(message_type, max_id_bytes=1024)
    tracemalloc.start()
    received = deserialize(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    parsed = received.message[0] if isinstance(received.message, list) else received.message
    long_id = parsed.header.id if hasattr(parsed, "header") else parsed.id
    assert isinstance(long_id, wire.LongText) and long_id == "" and long_id.nbytes == len(text.encode())
    assert peak < 1024 * 1024, f"parsing held {peak} bytes: the id was decoded"
    assert received.nbytes == len(data) + wire.REQUEST_OVERHEAD_BYTES
    # within the limit it is decoded as protobuf decodes it; a wide one is counted as what it holds
    short = "\U0001f600" * 256  # 1024 bytes of UTF-8, 1 KiB of characters at 4 bytes each
    data = make(short).SerializeToString()
    received = deserialize(data)
    parsed = received.message[0] if isinstance(received.message, list) else received.message
    decoded = parsed.header.id if hasattr(parsed, "header") else parsed.id
    assert decoded == short and sys.getsizeof(decoded) > 1024
    assert received.nbytes == len(data) + wire.REQUEST_OVERHEAD_BYTES + sys.getsizeof(decoded) - wire.SHORT_ID_BYTES
    assert wire.deserializer(message_type)(make("r1").SerializeToString()).nbytes == len(make("r1").SerializeToString()) + wire.REQUEST_OVERHEAD_BYTES


def _shm_input(name: str) -> pb.EvaluateRequest:
    return pb.EvaluateRequest(input=pb.Tensor(dtype=pb.FLOAT32, shape=[3], shm=pb.SharedMemoryRef(name=name, length=12, token=b"t" * 16)))


@pytest.mark.parametrize(
    "message_type, make, field",
    [
        (pb.EvaluateRequest, _shm_input, "input.shm"),
        (pb.EvaluateRequest, lambda name: pb.EvaluateRequest(target=_shm_input(name).input), "target.shm"),
        (pb.EvaluateBatch, lambda name: pb.EvaluateBatch(requests=[_shm_input(name)]), "input.shm"),
        (pb.EvaluateChunk, lambda name: pb.EvaluateChunk(header=pb.ChunkHeader(target=_shm_input(name).input)), "header.target.shm"),
        (pb.CompareRequest, lambda name: pb.CompareRequest(candidate=_shm_input(name).input), "candidate.shm"),
        (pb.CompareChunk, lambda name: pb.CompareChunk(header=pb.CompareHeader(target=_shm_input(name).input)), "header.target.shm"),
        (pb.EvaluateRequest, lambda name: pb.EvaluateRequest(options=pb.LossOptions(weight=_shm_input(name).input)), "options.weight.shm"),
        (pb.EvaluateRequest, lambda name: pb.EvaluateRequest(options=pb.LossOptions(pos_weight=_shm_input(name).input)), "options.pos_weight.shm"),
    ],
)
def test_a_shared_memory_reference_longer_than_any_valid_one_is_refused_unread(message_type, make, field):
    """protobuf copied such a reference and decoded its name (a 60 MB name: 900 MiB of the server's
    memory over idle); the walker refuses it naming the reference, building nothing from it."""
    import tracemalloc

    longest_valid = make("/lossd-" + "a" * 200)
    assert _shm_input("/lossd-" + "a" * 200).input.shm.ByteSize() + 22 <= wire.MAX_SHM_REF_BYTES  # two 64-bit sizes
    got = wire.parse(message_type, longest_valid.SerializeToString())
    assert not isinstance(got, wire.Malformed), got
    data = make("lossd-" + "a" * 20_000_000 + "\U0001f600").SerializeToString()
    tracemalloc.start()
    got = wire.parse(message_type, data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(got, wire.Malformed) and got.field == field, got
    assert f"a valid reference takes at most {wire.MAX_SHM_REF_BYTES}" in got.error and len(got.error) < 300, got
    assert peak < 1024 * 1024, f"parsing held {peak} bytes: the reference was copied"


@pytest.mark.parametrize("message_type", [pb.EvaluateRequest, pb.EvaluateChunk])
def test_long_class_weights_are_views_of_the_message_and_the_other_options_protobufs(message_type):
    """protobuf copied LossOptions' class weights three times (a 60 MB weight held 340 MiB of the
    server's memory); past OPTIONS_CHECKED_FROM_BYTES they are views like the input's bytes."""
    import tracemalloc

    classes = 250_000
    options = pb.LossOptions(loss=pb.CROSS_ENTROPY, reduction=pb.SUM, ignore_index=7, label_smoothing=0.25, extras=[1, 2])
    tensors.to_proto(np.linspace(0, 1, classes, dtype=np.float32), options.weight)
    tensors.to_proto(np.ones(3, np.float64), options.pos_weight)
    if message_type is pb.EvaluateRequest:
        msg = pb.EvaluateRequest(id="w", options=options)
    else:
        msg = pb.EvaluateChunk(header=pb.ChunkHeader(id="w", options=options))
    data = msg.SerializeToString()
    tracemalloc.start()
    got = wire.parse(message_type, data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 1024, f"parsing held {peak} bytes: the weights were copied"
    got_options = got.header.options if message_type is pb.EvaluateChunk else got.options
    assert isinstance(got_options, wire.WireOptions)
    assert got_options.weight.data.obj is data and bytes(got_options.weight.data) == options.weight.data
    assert_same_tensor(got_options.weight, options.weight)
    assert_same_tensor(got_options.pos_weight, options.pos_weight)
    assert got_options.HasField("weight") and got_options.HasField("pos_weight") and got_options.HasField("ignore_index")
    assert not got_options.HasField("class_axis")
    assert got_options.ByteSize() == options.ByteSize()
    rest = pb.LossOptions()
    rest.CopyFrom(options)
    rest.ClearField("weight")
    rest.ClearField("pos_weight")
    assert got_options.rest == rest
    assert (got_options.loss, got_options.reduction, got_options.ignore_index, got_options.label_smoothing, list(got_options.extras)) == (
        pb.CROSS_ENTROPY, pb.SUM, 7, 0.25, [1, 2],
    )  # fmt: skip
    # decoded as protobuf's would be
    spec, weight, pos_weight = convert.decode_options(got_options)
    want_spec, want_weight, want_pos_weight = convert.decode_options(options)
    assert spec == want_spec and torch.equal(weight, want_weight) and torch.equal(pos_weight, want_pos_weight)


@pytest.mark.parametrize("message_type, weighted", [(pb.EvaluateRequest, False), (pb.EvaluateRequest, True), (pb.CompareRequest, False)])
def test_the_unknown_fields_of_long_options_are_dropped_not_copied(message_type, weighted):
    """protobuf keeps a sub-message's unknown fields (the span's copy, and one inside protobuf):
    60 MB of them in LossOptions or CompareOptions held 170 MiB more of the server's memory. Past
    OPTIONS_CHECKED_FROM_BYTES only the known fields go to protobuf, which means the same."""
    import tracemalloc

    unknown = _VarintBytes(100 << 3 | 2) + _VarintBytes(20_000_000) + b"u" * 20_000_000 + _VarintBytes(101 << 3) + b"\x07"
    if message_type is pb.EvaluateRequest:
        options = pb.LossOptions(reduction=pb.SUM, ignore_index=-3, extras=[2])
        if weighted:
            tensors.to_proto(np.ones(3, np.float32), options.weight)
        number = 4
    else:
        options = pb.CompareOptions(top_k=3, ignore_index=-3)
        number = 5
    span = options.SerializeToString() + unknown
    data = bytes([number << 3 | 2]) + _VarintBytes(len(span)) + span
    want = message_type.FromString(data).options
    tracemalloc.start()
    got = wire.parse(message_type, data).options
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1024 * 1024, f"parsing held {peak} bytes: the unknown fields were copied"
    rest = got.rest if isinstance(got, wire.WireOptions) else got
    if weighted:
        assert_same_tensor(got.weight, want.weight)
        want.ClearField("weight")
    assert rest.ListFields() == want.ListFields() and rest.ByteSize() < 100
