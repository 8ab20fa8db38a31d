"""The Compare RPCs without gRPC: the zero-copy parser of Compare messages means what protobuf
means, the client's row chunks assemble on the server into exactly the unary comparison, sizes
and checkpoints of the engine's comparison plan, and chunk mistakes named by field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chunk_feed import feed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lossd_client import compare, tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_server import compare_convert, engine, wire
from lossd_server.compare_chunks import CompareAssembler
from lossd_server.engine import comparison

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def compare_request() -> pb.CompareRequest:
    msg = pb.CompareRequest(id="c1", options=pb.CompareOptions(ignore_index=3, shift_targets=True, top_k=2))
    tensors.to_proto(np.arange(24, dtype=np.float32).reshape(2, 3, 4), msg.reference)
    tensors.to_proto(np.ones((2, 3, 4), np.float16), msg.candidate)
    tensors.to_proto(np.array([[1, 2, 3], [0, 0, 1]]), msg.target)
    return msg


def compare_chunk(with_header: bool) -> pb.CompareChunk:
    header = pb.CompareHeader(id="h", options=pb.CompareOptions(top_k=1), reference_dtype=pb.BFLOAT16, reference_shape=[4, 5])
    header.candidate_dtype, header.candidate_shape[:] = pb.FLOAT32, [4, 5]
    tensors.to_proto(np.array([1, 2, 3, 4]), header.target)
    return pb.CompareChunk(header=header if with_header else None, reference_rows=b"\x01" * 20, candidate_rows=b"\x02" * 40)


def plain(value):
    """A Wire* value as plain data (tensors by dtype, shape, bytes and shm), for comparing two of them."""
    if isinstance(value, wire.WireTensor):
        return (value.dtype, value.shape, bytes(value.data), value.shm)
    if isinstance(value, memoryview):
        return bytes(value)
    if hasattr(value, "__slots__"):
        return {name: plain(getattr(value, name)) for name in value.__slots__}
    return value


@SETTINGS
@given(st.sampled_from(["request", "chunk", "header-only", "rows-only"]), st.binary(max_size=12), st.integers(0, 40))
def test_compare_messages_parse_as_protobuf_parses_them(kind: str, junk: bytes, cut: int) -> None:
    msg = compare_request() if kind == "request" else compare_chunk(kind != "rows-only")
    if kind == "header-only":
        msg.ClearField("reference_rows")
    data = msg.SerializeToString()
    mutated = data[:cut] + junk + data[cut:]  # protobuf may accept it (unknown fields, merged fields) or not
    for blob in (data, mutated, data + data):
        got = wire.parse(type(msg), blob)
        try:
            want = wire._SLOW[type(msg)](type(msg).FromString(blob))  # what protobuf's own parser makes of it
        except Exception:  # noqa: BLE001 - protobuf refuses: so does the walker
            assert isinstance(got, wire.Malformed)
            continue
        assert plain(got) == plain(want)


@st.composite
def comparisons(draw: st.DrawFn) -> tuple[compare.CompareInputs, int]:
    lead = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=2)))
    vocab = draw(st.integers(1, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    reference = (torch.randn((*lead, vocab), generator=g) * 3).to(draw(st.sampled_from(DTYPES)))
    candidate = (reference.double() + torch.randn((*lead, vocab), generator=g, dtype=torch.float64)).to(draw(st.sampled_from(DTYPES)))
    tokens = None
    if draw(st.booleans()):
        tokens = torch.randint(0, vocab, lead, generator=g)
        tokens[torch.rand(lead, generator=g) < 0.2] = -100
    shift = tokens is not None and draw(st.booleans())
    inputs = compare.CompareInputs(reference, candidate, tokens, shift_targets=shift, top_k=draw(st.integers(0, vocab)))
    return inputs, draw(st.sampled_from([1, 30, 100, 1 << 20]))


def assemble(inputs: compare.CompareInputs, chunk_bytes: int) -> comparison.Comparison:
    messages = [wire.parse(pb.CompareChunk, p) for p in compare.payloads(inputs, chunk_bytes=chunk_bytes)]
    return feed(CompareAssembler(messages[0].header, max_top_k=16), messages)


@SETTINGS
@given(comparisons())
def test_client_row_chunks_assemble_into_the_unary_comparison(case: tuple[compare.CompareInputs, int]) -> None:
    inputs, chunk_bytes = case
    decoded = compare_convert.decode_request(wire.parse(pb.CompareRequest, compare.request(inputs).SerializeToString()), max_top_k=16)
    whole = decoded.plan.evaluate(decoded.reference, decoded.candidate)
    chunked = assemble(inputs, chunk_bytes)
    for name in compare_convert.DENSE_OUTPUTS:
        a, b = getattr(chunked.result, name), getattr(whole.result, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    for name in compare_convert.TOP_K_OUTPUTS:
        a, b = getattr(chunked, name), getattr(whole, name)
        assert (a is None) == (inputs.top_k == 0) and (a is None or (torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)))
    assert chunked.result.totals.tokens == whole.result.totals.tokens == int(whole.result.counted.sum())
    assert chunked.result.totals.sum_kl == pytest.approx(whole.result.totals.sum_kl, rel=1e-12, abs=1e-300)
    response = compare_convert.encode_result("x", whole)
    assert response.ByteSize() <= decoded.plan.answer_nbytes()


def _assembler(**fields) -> CompareAssembler:
    base = {"reference_dtype": pb.FLOAT32, "reference_shape": [3, 4], "candidate_dtype": pb.FLOAT16, "candidate_shape": [3, 4]}
    header = pb.CompareHeader(**{**base, **fields})
    return CompareAssembler(wire.parse(pb.CompareChunk, pb.CompareChunk(header=header).SerializeToString()).header, max_top_k=2)


@pytest.mark.parametrize(
    ("rows", "field"),
    [
        ({"reference_rows": b"\0" * 15, "candidate_rows": b""}, "reference_rows"),  # not whole rows
        ({"reference_rows": b"\0" * 16, "candidate_rows": b"\0" * 16}, "candidate_rows"),  # 1 row of the reference, 2 of the candidate
        ({"reference_rows": b"\0" * 64, "candidate_rows": b"\0" * 32}, "reference_rows"),  # more rows than the header's shape
    ],
)
def test_chunk_mistakes_name_the_field(rows: dict[str, bytes], field: str) -> None:
    assembler = _assembler()
    with pytest.raises(engine.InvalidInput) as info:
        assembler.rows(wire.parse(pb.CompareChunk, pb.CompareChunk(**rows).SerializeToString()))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"reference_dtype": pb.INT64}, "header.reference_dtype"),
        ({"candidate_dtype": pb.DTYPE_UNSPECIFIED}, "header.candidate_dtype"),
        ({"candidate_dtype": 99}, "header.candidate_dtype"),
        ({"reference_shape": [-3, 4]}, "header.reference_shape"),
        ({"reference_shape": [2**59, 4], "candidate_shape": [2**59, 4]}, "header.reference_shape"),  # 2**63 bytes of float32
        ({"candidate_shape": [1] * 33}, "header.candidate_shape"),
        ({"reference_shape": [], "candidate_shape": []}, "header.reference_shape"),
        ({"candidate_shape": [4, 3]}, "header.candidate_shape"),
        ({"candidate_shape": [3, 5]}, "header.candidate_shape"),
        ({"options": pb.CompareOptions(top_k=3)}, "header.options.top_k"),
        ({"options": pb.CompareOptions(shift_targets=True)}, "header.options.shift_targets"),
        ({"target": tensors.to_proto(np.zeros(4, np.int64))}, "header.target"),
        ({"target": pb.Tensor(dtype=pb.INT64, shape=[3], data=b"\0" * 23)}, "header.target.data"),
    ],
)
def test_header_mistakes_name_the_headers_field(fields: dict, field: str) -> None:
    """As protobuf names them (header.reference_dtype, not reference or header.reference.dtype)."""
    with pytest.raises(ValueError) as info:  # noqa: PT011 - codec.TensorError or InvalidInput, both name the field
        _assembler(**fields)
    assert info.value.field == field and str(info.value).startswith(field + ": "), str(info.value)


def test_an_incomplete_call_names_the_rows_field() -> None:
    assembler = _assembler()
    assembler.rows(wire.parse(pb.CompareChunk, pb.CompareChunk(reference_rows=b"\0" * 16, candidate_rows=b"\0" * 8).SerializeToString()))
    with pytest.raises(engine.InvalidInput) as info:
        assembler.check_complete()
    assert info.value.field == "reference_rows" and "1 of 3 rows" in str(info.value)


def test_the_checkpoint_runs_between_row_ranges() -> None:
    x = torch.randn(40, 16)
    plan = comparison.plan_comparison(x.shape, x.dtype, x.shape, x.dtype)
    calls = []
    plan.evaluate(x, x, chunk_bytes=10 * 16 * 4, checkpoint=lambda: calls.append(1))
    assert len(calls) == 4
