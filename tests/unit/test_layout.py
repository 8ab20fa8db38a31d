"""lossd_client.layout: the rules client and server share, checked against torch, numpy, the proto
and the server's own chunk assembler (the client's rows must be the server's rows)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import LossRequest, core, layout
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_server import codec, convert, engine, wire
from lossd_server.chunks import ChunkAssembler

CE, NLL, BCE, KL = layout.CROSS_ENTROPY, layout.NLL_LOSS, layout.BCE_WITH_LOGITS, layout.KL_DIV


# --------------------------------------------------------------------------- wire tables
def test_dtype_table_covers_the_proto_and_agrees_with_numpy_and_torch():
    assert set(layout.DTYPE_NAMES) == set(pb.DType.values()) - {pb.DTYPE_UNSPECIFIED}
    for wire_dtype, name in layout.DTYPE_NAMES.items():
        assert pb.DType.Name(wire_dtype) == name.upper()
        assert layout.DTYPES[name] == wire_dtype
        torch_dtype = getattr(torch, name)
        assert str(torch_dtype) == f"torch.{name}" and torch_dtype.itemsize == layout.ITEMSIZE[wire_dtype]
        if name != "bfloat16":  # numpy has none (ml_dtypes provides it)
            assert np.dtype(name).name == name and np.dtype(name).itemsize == layout.ITEMSIZE[wire_dtype]
    assert layout.dtype_name(pb.BFLOAT16) == "bfloat16" and layout.dtype_name(99) == "dtype 99"


def test_name_tables_cover_every_enum_value_both_ways():
    assert set(layout.LOSS_NAMES) == set(pb.LossKind.values())
    assert set(layout.REDUCTION_NAMES) == set(pb.Reduction.values())
    assert set(layout.EXTRA_NAMES) == set(pb.Extra.values()) - {0}
    assert list(layout.LOSSES) == [CE, NLL, BCE, layout.KL_DIV]
    assert layout.LOSS_NAMES[pb.LOSS_KIND_UNSPECIFIED] == CE and layout.REDUCTION_NAMES[pb.REDUCTION_UNSPECIFIED] == "mean"
    for name, value in layout.LOSSES.items():
        assert layout.LOSS_NAMES[value] == name
    assert layout.REDUCTIONS == {"mean": pb.MEAN, "sum": pb.SUM, "none": pb.NONE, "batchmean": pb.BATCHMEAN, "elementwise_mean": pb.MEAN}
    for name, value in layout.EXTRAS.items():
        assert layout.EXTRA_NAMES[value] == name


def test_the_server_uses_the_same_tables():
    assert convert.LOSS_NAMES is layout.LOSS_NAMES
    assert convert.REDUCTION_NAMES is layout.REDUCTION_NAMES
    assert convert.EXTRA_NAMES is layout.EXTRA_NAMES
    assert codec.ITEMSIZE is layout.ITEMSIZE
    assert {w: str(d) for w, d in codec.WIRE_TO_TORCH.items()} == {w: f"torch.{n}" for w, n in layout.DTYPE_NAMES.items()}
    assert {w: torch.empty((), dtype=d).element_size() for w, d in codec.WIRE_TO_TORCH.items()} == layout.ITEMSIZE


# --------------------------------------------------------------------------- class axis and rows
def test_class_axis_default_and_normalised():
    assert [layout.default_class_axis(n) for n in (1, 2, 3, 5)] == [0, 1, 1, 1]
    assert layout.resolve_class_axis(3) == 1 and layout.resolve_class_axis(1) == 0
    assert layout.resolve_class_axis(3, -1) == 2 and layout.resolve_class_axis(3, 0) == 0 and layout.resolve_class_axis(3, -3) == 0
    for axis in (3, -4, 7):
        with pytest.raises(ValueError, match=f"axis {axis} is out of range for an input with 3 dimensions"):
            layout.resolve_class_axis(3, axis)


def test_the_server_names_an_out_of_range_class_axis_with_the_same_words():
    spec = engine.LossSpec(class_axis=5)
    with pytest.raises(engine.InvalidInput) as info:
        engine.plan(spec, (2, 3, 4), torch.float32, torch.zeros(2, 4, dtype=torch.int64))
    assert info.value.field == "options.class_axis"
    with pytest.raises(ValueError) as ours:
        layout.resolve_class_axis(3, 5)
    assert str(ours.value) in str(info.value)


@pytest.mark.parametrize(
    ("loss", "shape", "class_axis", "expected"),
    [
        (CE, (), None, (1, 1)),  # 0-d: one row (the server rejects it with torch's error)
        (CE, (7,), None, (1, 7)),  # (C): one row of C classes
        (CE, (4, 7), None, (4, 7)),
        (CE, (4, 7, 3), None, (4, 21)),  # (N, C, d): a row is one (C, d) slab
        (CE, (2, 5, 7), -1, (10, 7)),  # (B, T, V) with class_axis=-1: a row per token
        (CE, (2, 5, 7), 2, (10, 7)),
        (CE, (7, 2, 5), 0, (1, 70)),  # class axis 0: one row holds everything
        (NLL, (0, 7), None, (0, 7)),
        (BCE, (), None, (1, 1)),
        (BCE, (6,), None, (6, 1)),  # no class axis: rows along axis 0, as the server counts them
        (BCE, (6, 2, 3), None, (6, 6)),
        (BCE, (0,), None, (0, 1)),
        (KL, (), None, (1, 1)),  # kl_div: rows along axis 0, like BCE
        (KL, (6,), None, (6, 1)),
        (KL, (6, 2, 3), None, (6, 6)),
    ],
)
def test_rows(loss, shape, class_axis, expected):
    assert layout.rows(loss, shape, class_axis) == expected
    rows, per_row = expected
    unit = layout.row_shape(loss, shape, class_axis)
    assert unit == tuple(shape)[len(shape) - len(unit) :] and math.prod(unit) == per_row and rows * per_row == math.prod(shape)
    assert layout.row_bytes(per_row, pb.BFLOAT16) == 2 * per_row and layout.row_bytes(per_row, pb.FLOAT64) == 8 * per_row


def test_out_of_range_class_axis_raises_like_the_server():
    with pytest.raises(ValueError, match="out of range"):
        layout.rows(CE, (2, 3), 2)
    assert layout.rows(BCE, (2, 3), 5) == (2, 3)  # BCE has no class axis (the server rejects the option itself)


def test_target_travels_with_rows():
    assert layout.target_travels_with_rows(CE, (4, 3), (4, 3))  # probabilities
    assert layout.target_travels_with_rows(BCE, (4, 3), (4, 3))
    assert not layout.target_travels_with_rows(CE, (4, 3), (4,))  # class indices
    assert not layout.target_travels_with_rows(NLL, (4, 3), (4, 3))
    assert layout.target_travels_with_rows(KL, (4, 3), (4, 3))
    assert not layout.target_travels_with_rows(KL, (4, 3), (1, 3))  # broadcast along the rows: whole in the header


def test_input_rows_are_output_rows():
    for loss in (CE, NLL, BCE):
        assert layout.input_rows_are_output_rows(loss, (1, 3), (4, 3))
    by_rows = [((4, 3), (4, 3)), ((4, 3), (1, 3)), ((4, 3), (3,)), ((4, 3), ()), ((), ()), ((1, 3), (1, 3)), ((4, 1), (4, 5))]
    for input_shape, target_shape in by_rows:
        assert layout.input_rows_are_output_rows(KL, input_shape, target_shape), (input_shape, target_shape)
    for input_shape, target_shape in [((1, 3), (4, 3)), ((3,), (4, 3)), ((), (4,))]:
        assert not layout.input_rows_are_output_rows(KL, input_shape, target_shape), (input_shape, target_shape)


def test_unary_budget():
    assert layout.unary_budget(64 * 2**20) == 64 * 2**20 - 4096
    assert layout.unary_budget(1024) == 768
    assert layout.CHUNKED_ABOVE_BYTES == 4 * 2**20


def test_the_smallest_message_limit_is_the_servers_lower_bound():
    """The client refuses a ServerInfo whose limits are under MIN_MESSAGE_BYTES: no lossd server starts with one."""
    from lossd_server.config import BOUNDS

    assert BOUNDS["max_message_bytes"].low == BOUNDS["max_send_message_bytes"].low == layout.MIN_MESSAGE_BYTES


# --------------------------------------------------------------------------- client rows == server rows
def _torch_answer(loss, x, t, class_axis, reduction):
    if loss == BCE:
        return F.binary_cross_entropy_with_logits(x, t, reduction=reduction)
    if loss == KL:
        return F.kl_div(x, t, reduction=reduction)
    if class_axis is not None and x.dim() > 1:
        x = x.movedim(class_axis, 1)
    fn = F.nll_loss if loss == NLL else F.cross_entropy
    return fn(x, t, reduction=reduction)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


LAYOUTS = [
    (CE, torch.randn(9, 5, generator=_g(1)), torch.randint(0, 5, (9,), generator=_g(2)), None),
    (CE, torch.randn(6, 4, 3, generator=_g(3)), torch.randint(0, 4, (6, 3), generator=_g(4)), None),
    (CE, torch.randn(3, 5, 7, generator=_g(5)), torch.randint(0, 7, (3, 5), generator=_g(6)), -1),
    (CE, torch.randn(4, 3, 5, generator=_g(7)), torch.randint(0, 4, (3, 5), generator=_g(8)), 0),
    (CE, torch.randn(11, generator=_g(9)), torch.tensor(4), None),
    (CE, torch.randn(8, 6, generator=_g(10)), torch.rand(8, 6, generator=_g(11)).softmax(1), None),
    (NLL, torch.randn(7, 4, generator=_g(12)).log_softmax(1), torch.randint(0, 4, (7,), generator=_g(13)), None),
    (BCE, torch.randn(13, generator=_g(14)), torch.rand(13, generator=_g(15)), None),
    (BCE, torch.randn(5, 2, 3, generator=_g(16)), torch.rand(5, 2, 3, generator=_g(17)), None),
    (CE, torch.randn(0, 5), torch.zeros(0, dtype=torch.int64), None),
    (BCE, torch.randn(0), torch.rand(0), None),
    (KL, torch.randn(9, 5, generator=_g(18)).log_softmax(1), torch.rand(9, 5, generator=_g(19)), None),
    (KL, torch.randn(6, 4, 3, generator=_g(20)), torch.rand(4, 3, generator=_g(21)), None),  # target whole in the header
    (KL, torch.randn(7, generator=_g(22)), torch.rand(7, generator=_g(23)), None),
    (KL, torch.randn((), generator=_g(24)), torch.rand((), generator=_g(25)), None),
]


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize(("loss", "x", "t", "class_axis"), LAYOUTS, ids=[f"{c[0]}-{tuple(c[1].shape)}-{c[3]}" for c in LAYOUTS])
def test_client_chunks_are_the_rows_the_server_assembles(loss, x, t, class_axis, reduction):
    """Payloads cut by the client (a few rows per message) assemble on the server to torch's answer."""
    req = LossRequest(x, t, loss=loss, class_axis=class_axis, reduction=reduction)
    rows, per_row = layout.rows(loss, tuple(x.shape), class_axis)
    payloads = list(core.chunk_payloads(req, chunk_bytes=max(1, 3 * per_row * 4)))
    messages = [wire.parse(pb.EvaluateChunk, p) for p in payloads]
    assembler = ChunkAssembler(messages[0].header)
    partials = []
    for message in messages[1:]:
        chunk = assembler.rows(message)
        if chunk is not None:
            partials.append(assembler.evaluate(chunk, device=torch.device("cpu"), chunk_bytes=1024))
    assembler.check_complete()
    if rows > 3:
        assert len(partials) > 1  # the request really was cut into several row chunks
    torch.testing.assert_close(assembler.finish(partials).loss, _torch_answer(loss, x, t, class_axis, reduction))


def test_an_out_of_range_class_axis_reaches_the_server_which_names_it():
    req = LossRequest(torch.randn(4, 3, 5), torch.randint(0, 3, (4, 5)), class_axis=3)
    payloads = list(core.chunk_payloads(req, chunk_bytes=64))  # the client lays it out and sends it
    with pytest.raises(engine.InvalidInput) as info:
        ChunkAssembler(wire.parse(pb.EvaluateChunk, payloads[0]).header)
    assert info.value.field == "header.options.class_axis" and "out of range" in str(info.value)
