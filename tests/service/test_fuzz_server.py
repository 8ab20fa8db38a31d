"""Hypothesis throws arbitrary bytes and arbitrary well-formed requests at a real server.

Every call must be answered with a status, and the server must stay up (health SERVING, a good
request still evaluates). Well-formed EvaluateRequest messages must never get INTERNAL or
UNKNOWN: whatever they carry is either evaluated or rejected as INVALID_ARGUMENT.

Undecodable bytes are answered INVALID_ARGUMENT too: the server registers its handlers with a
deserializer that turns a protobuf DecodeError into a rejected request (grpc's own would answer
UNKNOWN before lossd's code runs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from serverproc import ServerProcess, start_server

CALL_TIMEOUT_S = 30
ITEMSIZE = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.FLOAT64: 8, pb.INT64: 8, pb.INT32: 4, pb.INT16: 2, pb.INT8: 1, pb.UINT8: 1, pb.BOOL: 1}
WELL_FORMED_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    proc = start_server()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.address) as ch:
        yield ch


def good_request() -> pb.EvaluateRequest:
    x = np.array([[1.0, 2.0, 3.0]], dtype="<f4")
    msg = pb.EvaluateRequest(id="good")
    msg.input.dtype, msg.input.data = pb.FLOAT32, x.tobytes()
    msg.input.shape[:] = [1, 3]
    msg.target.dtype, msg.target.data = pb.INT64, np.array([2], "<i8").tobytes()
    msg.target.shape[:] = [1]
    return msg


def assert_still_serving(channel: grpc.Channel, server: ServerProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert server.proc.poll() is None, server.log()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reply = pb_grpc.LossServiceStub(channel).Evaluate(good_request(), timeout=CALL_TIMEOUT_S)
    # F.cross_entropy([[1, 2, 3]], [2]) = log(e + e^2 + e^3) - 3
    assert np.frombuffer(reply.loss.data, "<f4")[0] == pytest.approx(math.log(math.e + math.e**2 + math.e**3) - 3, rel=1e-6)


def status_of(call, request, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=CALL_TIMEOUT_S, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


# ---------------------------------------------------------------------------- garbage bytes
@FUZZ
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_get_a_status(channel: grpc.Channel, data: bytes) -> None:
    raw = channel.unary_unary("/lossd.v1.LossService/Evaluate", request_serializer=None, response_deserializer=None)
    code, details = status_of(raw, data)
    event(code.name)
    assert code in WELL_FORMED_CODES, (code, details)
    if code != grpc.StatusCode.OK:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)


# ---------------------------------------------------------------------------- well-formed requests
DTYPES = st.one_of(st.sampled_from(sorted(ITEMSIZE)), st.integers(0, 40))
DIMS = st.one_of(st.integers(0, 5), st.integers(-3, -1), st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]))


@st.composite
def wire_tensor(draw: st.DrawFn) -> pb.Tensor:
    dtype = draw(DTYPES)
    shape = draw(st.lists(DIMS, max_size=4))
    msg = pb.Tensor(dtype=dtype, shape=shape)
    exact = all(0 <= s <= 5 for s in shape) and dtype in ITEMSIZE
    nbytes = math.prod(shape) * ITEMSIZE[dtype] if exact else 0
    if exact and draw(st.integers(0, 3)):
        msg.data = draw(st.binary(min_size=nbytes, max_size=nbytes))
    else:
        msg.data = draw(st.binary(max_size=64))
    return msg


@st.composite
def sensible_tensor(draw: st.DrawFn, dtype: int, shape: tuple[int, ...]) -> pb.Tensor:
    """A valid tensor with random values (often NaN / inf / out-of-range integers)."""
    n = math.prod(shape) * ITEMSIZE[dtype]
    return pb.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(min_size=n, max_size=n)))


NUMPY = {pb.FLOAT32: "<f4", pb.FLOAT64: "<f8", pb.FLOAT16: "<f2"}


@st.composite
def valid_request(draw: st.DrawFn) -> pb.EvaluateRequest:
    """Mostly valid requests with random options, so evaluation paths run too."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c = draw(st.integers(1, 5))
    lead = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    shape = (lead[0], c, *lead[1:]) if lead else (c,)
    dtype = draw(st.sampled_from(sorted(NUMPY)))
    msg = pb.EvaluateRequest(id="v")
    msg.input.CopyFrom(pb.Tensor(dtype=dtype, shape=shape, data=rng.standard_normal(shape).astype(NUMPY[dtype]).tobytes()))
    kind = draw(st.sampled_from(["class", "prob"]))
    if kind == "class":
        tshape = (lead[0], *lead[1:]) if lead else ()
        t = rng.integers(-1, c, tshape).astype("<i8")
        msg.target.CopyFrom(pb.Tensor(dtype=pb.INT64, shape=tshape, data=t.tobytes()))
        msg.options.ignore_index = -1
    else:
        msg.target.CopyFrom(pb.Tensor(dtype=dtype, shape=shape, data=rng.random(shape).astype(NUMPY[dtype]).tobytes()))
    o = msg.options
    o.loss = draw(st.sampled_from([pb.CROSS_ENTROPY, pb.NLL, pb.BINARY_CROSS_ENTROPY_WITH_LOGITS]))
    o.reduction = draw(st.integers(0, 3))
    o.label_smoothing = draw(st.sampled_from([0.0, 0.0, 0.25, 1.0]))
    if draw(st.booleans()):
        o.weight.CopyFrom(pb.Tensor(dtype=dtype, shape=[c], data=rng.random(c).astype(NUMPY[dtype]).tobytes()))
    if draw(st.integers(0, 3)) == 0:
        o.class_axis = draw(st.sampled_from([-1, 0, 1]))
    o.shift_targets = draw(st.integers(0, 3)) == 0
    o.extras.extend(draw(st.lists(st.integers(1, 4), max_size=4)))
    o.sequence_stats = draw(st.integers(0, 3)) == 0
    return msg


@st.composite
def requests(draw: st.DrawFn) -> pb.EvaluateRequest:
    mode = draw(st.integers(0, 2))
    if mode == 0:
        return draw(valid_request())
    msg = pb.EvaluateRequest(id=draw(st.text(max_size=8)))
    if mode == 1:
        # plausible shapes and dtypes with arbitrary bytes
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
        msg.input.CopyFrom(draw(sensible_tensor(draw(st.sampled_from([pb.FLOAT32, pb.FLOAT64, pb.FLOAT16, pb.BFLOAT16])), shape)))
        tshape = draw(st.sampled_from([shape, shape[:1] + shape[2:], shape[1:]]))
        msg.target.CopyFrom(draw(sensible_tensor(draw(st.sampled_from(sorted(ITEMSIZE))), tshape)))
    else:
        if draw(st.integers(0, 9)):
            msg.input.CopyFrom(draw(wire_tensor()))
        if draw(st.integers(0, 9)):
            msg.target.CopyFrom(draw(wire_tensor()))
    o = msg.options
    o.loss = draw(st.integers(0, 5))
    o.reduction = draw(st.integers(0, 5))
    if draw(st.booleans()):
        o.ignore_index = draw(st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 5)))
    o.label_smoothing = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.1, 1.0, -0.5])))
    if draw(st.integers(0, 3)) == 0:
        o.weight.CopyFrom(draw(wire_tensor()))
    if draw(st.integers(0, 4)) == 0:
        o.pos_weight.CopyFrom(draw(wire_tensor()))
    if draw(st.integers(0, 4)) == 0:
        o.class_axis = draw(st.integers(-(2**31), 2**31 - 1) | st.integers(-4, 4))
    o.shift_targets = draw(st.integers(0, 4)) == 0
    if draw(st.integers(0, 4)) == 0:
        o.extras.extend(draw(st.lists(st.integers(0, 6), max_size=4)))
    o.sequence_stats = draw(st.integers(0, 4)) == 0
    return msg


@FUZZ
@given(request=requests())
def test_well_formed_requests_never_get_internal(channel: grpc.Channel, request: pb.EvaluateRequest) -> None:
    stub = pb_grpc.LossServiceStub(channel)
    code, details = status_of(stub.Evaluate, request)
    event(code.name)
    assert code in WELL_FORMED_CODES, (code, details)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(items=st.lists(requests(), min_size=1, max_size=5))
def test_stream_of_random_requests_answers_every_item(channel: grpc.Channel, items: list[pb.EvaluateRequest]) -> None:
    for i, item in enumerate(items):
        item.id = str(i)
    stub = pb_grpc.LossServiceStub(channel)
    replies = list(stub.EvaluateStream(iter(items), timeout=CALL_TIMEOUT_S))
    assert sorted(r.id for r in replies) == sorted(str(i) for i in range(len(items)))
    for r in replies:
        if r.HasField("error"):
            assert r.error.code in (grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), r.error


@st.composite
def chunk_streams(draw: st.DrawFn) -> list[pb.EvaluateChunk]:
    """A random request as EvaluateChunked messages: its header (target whole or shape only), then
    row messages of random sizes (often not whole rows, too many or too few), maybe a second header."""
    request = draw(requests())
    header = pb.ChunkHeader(id=request.id, options=request.options, input_dtype=request.input.dtype, input_shape=request.input.shape)
    if request.HasField("target"):
        header.target.CopyFrom(request.target)
        if draw(st.booleans()):
            header.target.data = b""  # a target that travels with the rows
    messages = [pb.EvaluateChunk(header=header)]
    data, tdata = request.input.data, request.target.data
    for _ in range(draw(st.integers(0, 4))):
        cut = draw(st.integers(0, len(data)))
        tcut = draw(st.integers(0, len(tdata)))
        messages.append(pb.EvaluateChunk(input_rows=data[:cut], target_rows=tdata[:tcut] if draw(st.booleans()) else b""))
        data, tdata = data[cut:], tdata[tcut:]
    if draw(st.integers(0, 9)) == 0:
        messages.append(pb.EvaluateChunk(header=header))
    return messages


@FUZZ
@given(messages=chunk_streams())
def test_chunked_streams_never_get_internal(channel: grpc.Channel, messages: list[pb.EvaluateChunk]) -> None:
    code, details = status_of(pb_grpc.LossServiceStub(channel).EvaluateChunked, iter(messages))
    event(code.name)
    assert code in WELL_FORMED_CODES, (code, details)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(requests(), min_size=1, max_size=4), min_size=1, max_size=3))
def test_packed_stream_of_random_requests_answers_every_item(channel: grpc.Channel, batches: list[list[pb.EvaluateRequest]]) -> None:
    n = 0
    for batch in batches:
        for item in batch:
            item.id = str(n)
            n += 1
    replies = list(pb_grpc.LossServiceStub(channel).EvaluatePacked(iter(pb.EvaluateBatch(requests=b) for b in batches), timeout=CALL_TIMEOUT_S))
    answered = [r for message in replies for r in message.responses]
    assert sorted(r.id for r in answered) == sorted(str(i) for i in range(n))
    for r in answered:
        if r.HasField("error"):
            assert r.error.code in (grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), r.error


@st.composite
def compare_requests(draw: st.DrawFn) -> pb.CompareRequest:
    """Two models' logits: valid ones with random options, or arbitrary wire tensors and options."""
    msg = pb.CompareRequest(id=draw(st.text(max_size=8)))
    o = msg.options
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        shape = (*draw(st.lists(st.integers(0, 3), max_size=2)), draw(st.integers(0, 5)))
        for field in (msg.reference, msg.candidate):
            dtype = draw(st.sampled_from(sorted(NUMPY)))
            field.CopyFrom(pb.Tensor(dtype=dtype, shape=shape, data=rng.standard_normal(shape).astype(NUMPY[dtype]).tobytes()))
        if draw(st.booleans()):
            t = rng.integers(-1, max(shape[-1], 1), shape[:-1]).astype("<i8")
            msg.target.CopyFrom(pb.Tensor(dtype=pb.INT64, shape=shape[:-1], data=t.tobytes()))
            o.ignore_index = -1
    else:
        for field in (msg.reference, msg.candidate, msg.target):
            if draw(st.integers(0, 3)):
                field.CopyFrom(draw(wire_tensor()))
        if draw(st.booleans()):
            o.ignore_index = draw(st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 5)))
    o.shift_targets = draw(st.integers(0, 3)) == 0
    o.top_k = draw(st.one_of(st.integers(0, 6), st.sampled_from([2**31, 2**32 - 1])))
    return msg


@FUZZ
@given(request=compare_requests())
def test_compare_requests_never_get_internal(channel: grpc.Channel, request: pb.CompareRequest) -> None:
    code, details = status_of(pb_grpc.LossServiceStub(channel).Compare, request)
    event(code.name)
    assert code in WELL_FORMED_CODES, (code, details)


@FUZZ
@given(request=compare_requests(), data=st.data())
def test_compare_chunked_streams_never_get_internal(channel: grpc.Channel, request: pb.CompareRequest, data: st.DataObject) -> None:
    header = pb.CompareHeader(
        id=request.id,
        options=request.options,
        reference_dtype=request.reference.dtype,
        reference_shape=request.reference.shape,
        candidate_dtype=request.candidate.dtype,
        candidate_shape=request.candidate.shape,
    )
    if request.HasField("target"):
        header.target.CopyFrom(request.target)
    messages = [pb.CompareChunk(header=header)]
    ref, cand = request.reference.data, request.candidate.data
    for _ in range(data.draw(st.integers(0, 4))):
        cut, ccut = data.draw(st.integers(0, len(ref))), data.draw(st.integers(0, len(cand)))
        messages.append(pb.CompareChunk(reference_rows=ref[:cut], candidate_rows=cand[:ccut]))
        ref, cand = ref[cut:], cand[ccut:]
    if data.draw(st.integers(0, 9)) == 0:
        messages.append(pb.CompareChunk(header=header))
    code, details = status_of(pb_grpc.LossServiceStub(channel).CompareChunked, iter(messages))
    event(code.name)
    assert code in WELL_FORMED_CODES, (code, details)


def test_server_still_serving_after_fuzzing(channel: grpc.Channel, fuzz_server: ServerProcess) -> None:
    """Runs last in this module: after every fuzz example above, the server is healthy."""
    assert_still_serving(channel, fuzz_server)
    errors = [line for line in fuzz_server.log().splitlines() if " ERROR " in line]
    assert not errors, "\n".join(errors[:20])
