"""lossd_client.split without a server: which requests are cut, where, and how answers join."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from lossd_client import LossRequest, core, layout, reduction, split, tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb

WIRE = {torch.float32: pb.FLOAT32, torch.float64: pb.FLOAT64, torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16}


def _doubles() -> list[float]:
    """Random doubles of every magnitude, values just off the 16-bit ties, and the edges."""
    g = np.random.default_rng(0)
    values = list(g.standard_normal(2000) * 10.0 ** g.integers(-40, 40, 2000))
    for base in (1.0, 3.0, 1000.0, 2.0**-20):
        for tie in (2.0**-8, 2.0**-11):  # bfloat16 / float16 half-ulp of 1
            for off in (2.0**-40, -(2.0**-40), 0.0):
                values.append(base * (1 + tie + off))
    return values + [0.0, -0.0, math.inf, -math.inf, math.nan, 1e300, -1e300, 3.4e38, 3.4028235e38 * (1 + 2**-25), 65520.0, 1e-45, 1e-320]


@pytest.mark.parametrize("dtype", list(WIRE), ids=str)
def test_scalar_bytes_round_as_the_servers_torch(dtype):
    """engine.finish rounds a float64 total with torch.tensor(value, float64).to(dtype) (16-bit via float32)."""
    for value in _doubles():
        want = torch.tensor(value, dtype=torch.float64).to(dtype)
        got = tensors.torch_from_proto(pb.Tensor(dtype=WIRE[dtype], data=split.scalar_bytes(value, WIRE[dtype])))
        assert got.dtype == dtype
        same_bytes = got.reshape(1).view(torch.uint8).tolist() == want.reshape(1).view(torch.uint8).tolist()
        assert same_bytes or (got.isnan() and want.isnan()), (value, got, want)


@pytest.mark.parametrize("dtype", list(WIRE), ids=str)
def test_reduction_rounds_totals_as_torch_does(dtype):
    """lossd_client.reduction.rounded (numpy, no torch) is torch's float64 -> dtype conversion,
    overflow to ±inf included: the test of whether torch's total in that dtype overflows."""
    name = str(dtype).removeprefix("torch.")
    edges = [torch.finfo(dtype).max * k for k in (1.0, 1.0 + 2**-12, 1.0 + 2**-9, 1.0 + 2**-8, 1.0 + 2**-6, 1.5)]
    for value in _doubles() + edges + [-v for v in edges]:
        want = torch.tensor(value, dtype=torch.float64).to(dtype).item()
        got = reduction.rounded(value, name)
        assert got == want or (math.isnan(got) and math.isnan(want)), (value, got, want)


@pytest.mark.parametrize("dtype", list(WIRE), ids=str)
def test_quotient_is_torchs_division_where_a_total_overflows_its_dtype(dtype):
    """Where a total rounds to ±inf in the dtype torch sums it in, the mean is torch's division of
    the rounded totals in that dtype (inf, -inf, nan or a signed zero); elsewhere the float64
    quotient, untouched."""
    name, top = str(dtype).removeprefix("torch."), torch.finfo(dtype).max
    totals = [0.0, -0.0, 1.0, -3.0, 0.75 * top, -0.75 * top, 1.5 * top, -1.5 * top, 3 * top, math.inf, -math.inf, math.nan]
    for num in totals:
        for den in totals:
            got = reduction.quotient(num, den, name, name)
            n, d = (torch.tensor(v, dtype=torch.float64).to(dtype) for v in (num, den))
            if n.isinf() or d.isinf():
                want = (n / d).item()
            else:
                want = reduction.divide(num, den)
            assert (math.isnan(got) and math.isnan(want)) or (got == want and math.copysign(1, got) == math.copysign(1, want)), (num, den)
    assert reduction.quotient(1.5 * top, 2.0, name, None) == math.inf  # (in float64, 1.5 * top is inf itself)
    assert reduction.quotient(1.0, 1.5 * top, name, None) == 1.0 / (1.5 * top)  # an unrounded count: never inf


def test_join_divides_as_torch_where_the_joined_total_overflows():
    """Parts whose float32 totals fit, joined into one that does not: torch's inf / nan (probe 14 F2)."""
    big = 3e38
    parts = [pb.EvaluateResponse(loss_sum=big, weight_sum=w, counted=1) for w in (1.0, 1.0)]
    for p in parts:
        p.loss.dtype = pb.FLOAT32
    mean = tensors.torch_from_proto(split.join_responses(parts, "mean").loss)
    assert mean.item() == torch.tensor([big, big]).mean().item() == math.inf
    weights = [pb.EvaluateResponse(loss_sum=1.0, weight_sum=big, counted=1) for _ in range(2)]
    for p in weights:
        p.loss.dtype = pb.FLOAT32
    assert mean.isinf() and tensors.torch_from_proto(split.join_responses(weights, "mean").loss).item() == 0.0
    halves = [pb.EvaluateResponse(loss_sum=40000.0, weight_sum=1.0, counted=1) for _ in range(2)]
    for p in halves:
        p.loss.dtype = pb.FLOAT16
    # a 16-bit result is torch's float32 computation, cast (torch's own float16 nll_loss total is inf)
    for loss in (layout.BCE_WITH_LOGITS, layout.NLL_LOSS):
        want = torch.tensor([40000.0, 40000.0]).mean().half().item()
        assert tensors.torch_from_proto(split.join_responses(halves, "mean", loss=loss).loss).item() == want == 40000.0


def test_divide_follows_ieee_for_a_zero_weight():
    assert math.isnan(split.divide(0.0, 0.0)) and math.isnan(split.divide(math.nan, 0.0))
    assert split.divide(2.0, 0.0) == math.inf and split.divide(-2.0, 0.0) == -math.inf
    assert split.divide(3.0, 2.0) == 1.5


def _req(x_shape, t_shape=None, *, dtype=np.int64, **kw) -> LossRequest:
    x = np.zeros(x_shape, np.float32)
    t = np.zeros(t_shape if t_shape is not None else x_shape, dtype)
    return LossRequest(x, t, **kw)


@pytest.mark.parametrize(
    "req, cut",
    [
        (_req((8, 5), (8,)), True),
        (_req((8, 5, 3), (8, 3)), True),  # class axis 1: rows lead
        (_req((8, 5), (8,), reduction="mean", label_smoothing=0.1), False),  # two sums behind the mean
        (_req((8, 5), (8,), reduction="sum", label_smoothing=0.1), True),
        (_req((8, 5), (8,), reduction="none", label_smoothing=0.1), True),
        (_req((8, 5), (8,), reduction="elementwise_mean", label_smoothing=0.1), False),
        (_req((8, 5), (8,), reduction="mean", label_smoothing=-0.5), True),  # ignored for class indices, as torch
        (_req((5,), ()), False),  # (C): one row
        (_req((1, 5), (1,)), False),  # one row
        (_req((8, 5), (5,), class_axis=0), False),  # the leading axis is the class axis
        (_req((8, 5), (7,)), False),  # target not cut with the rows: the server names the mismatch
        (_req((8, 5), (8,), dtype=np.int32), False),  # rejected by the server, as torch
        (_req((8, 5), dtype=np.float32), True),  # probabilities
        (_req((8, 5), dtype=np.float32, loss="nll_loss"), False),
        (_req((4, 6, 9), (4, 6), class_axis=-1, shift_targets=True), True),  # whole sequences per part
        (_req((24, 9), (24,), shift_targets=True), False),  # the shift runs along the leading axis
        (_req((24, 9), (24,), sequence_stats=True), False),
        (_req((24, 9), (24,), extras=("entropy",)), False),  # one sequence: its extras ride with it, never cut
        (_req((4, 6, 9), (4, 6), class_axis=-1, extras=("entropy",), sequence_stats=True), True),
        (_req((8, 5), dtype=np.float32, loss="binary_cross_entropy_with_logits"), True),
        (_req((8,), dtype=np.float32, loss="binary_cross_entropy_with_logits"), True),
        (_req((8, 5), dtype=np.float32, loss="binary_cross_entropy_with_logits", weight=np.ones((8, 5), np.float32)), True),
        (_req((8, 5), dtype=np.float32, loss="binary_cross_entropy_with_logits", weight=np.ones((1, 5), np.float32)), True),
        (_req((8, 5), dtype=np.float32, loss="binary_cross_entropy_with_logits", weight=np.ones((3, 5), np.float32)), False),
        (_req((8, 5), dtype=np.float32, loss="binary_cross_entropy_with_logits", pos_weight=np.ones((2, 8, 5), np.float32)), False),
    ],
)
def test_what_is_cut(req, cut):
    assert split.splittable(req) is cut
    parts = split.split_rows(req, 3)
    assert (parts is not None) is cut


def test_parts_are_consecutive_row_slices_as_equal_as_can_be():
    x = np.arange(7 * 4 * 3, dtype=np.float32).reshape(7, 4, 3)
    t = np.arange(7 * 3).reshape(7, 3) % 4
    weight = np.ones((7, 1, 3), np.float32)
    parts = split.split_rows(LossRequest(x, t), 3)
    assert [p.input.shape[0] for p in parts] == [2, 2, 3]
    assert np.array_equal(np.concatenate([p.input for p in parts]), x) and np.array_equal(np.concatenate([p.target for p in parts]), t)
    assert all(np.shares_memory(p.input, x) for p in parts)  # views of the caller's array, never copies
    assert len(split.split_rows(LossRequest(x, t), 50)) == 7  # at most one part per row
    assert split.split_rows(LossRequest(x, t), 1) is None
    bce = split.split_rows(LossRequest(x, x, loss="binary_cross_entropy_with_logits", weight=weight, pos_weight=np.ones(3)), 2)
    assert [p.weight.shape for p in bce] == [(3, 1, 3), (4, 1, 3)] and all(p.pos_weight.shape == (3,) for p in bce)


def test_torch_inputs_are_cut_as_views():
    x = torch.randn(6, 10, 5)
    parts = split.split_rows(LossRequest(x, torch.randint(0, 5, (6, 10)), class_axis=-1), 4)
    assert [p.input.shape[0] for p in parts] == [1, 2, 1, 2]
    assert all(p.input.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for p in parts)


def _response(losses: list[float], loss_sum: float, weight_sum: float, counted: int, shape: tuple[int, ...]) -> pb.EvaluateResponse:
    r = pb.EvaluateResponse(loss_sum=loss_sum, weight_sum=weight_sum, counted=counted)
    tensors.to_proto(np.array(losses, np.float32).reshape(shape), r.loss)
    tensors.to_proto(np.array(losses, np.float32).reshape(shape) * 2, r.extras["entropy"])
    r.sequences.nll_sum.extend([loss_sum])
    r.sequences.tokens.extend([counted])
    return r


def test_join_concatenates_in_order_and_adds_totals_exactly():
    a = _response([1, 2, 3, 4], 0.1, 1e16, 3, (2, 2))
    b = _response([5, 6], 0.2, 1.0, 2, (1, 2))
    c = _response([7, 8], 0.3, -1e16, 1, (1, 2))
    joined = split.join_responses([a, b, c], "none", "req-1")
    assert joined.id == "req-1" and joined.counted == 6
    assert joined.loss_sum == math.fsum([0.1, 0.2, 0.3]) and joined.weight_sum == 1.0  # exactly rounded, not (1e16 + 1) - 1e16
    result = core.parse(joined, as_torch=False)
    assert result.loss.shape == (4, 2) and result.loss.ravel().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert result.extras["entropy"].ravel().tolist() == [2, 4, 6, 8, 10, 12, 14, 16]
    assert result.sequences.nll_sum.tolist() == [0.1, 0.2, 0.3] and result.sequences.tokens.tolist() == [3, 2, 1]


def test_join_recomputes_sum_and_mean_in_the_answers_dtype():
    parts = [pb.EvaluateResponse(loss_sum=s, weight_sum=w, counted=1) for s, w in ((1.0, 2.0), (2.0, 1.0))]
    for p in parts:
        p.loss.dtype = pb.BFLOAT16
    mean = tensors.torch_from_proto(split.join_responses(parts, "mean").loss)
    assert mean.dtype == torch.bfloat16 and mean.item() == torch.tensor(1.0, dtype=torch.bfloat16).item()
    assert struct.unpack("<H", split.join_responses(parts, "sum").loss.data)[0] == torch.tensor(3.0, dtype=torch.bfloat16).view(torch.int16).item()
    empty = [pb.EvaluateResponse(loss_sum=0.0, weight_sum=0.0)] * 2
    for p in empty:
        p.loss.dtype = pb.FLOAT32
    assert math.isnan(tensors.numpy_from_proto(split.join_responses(empty, "mean").loss))


def test_route_cuts_only_chunked_requests_and_keeps_the_reduction():
    req = LossRequest(np.zeros((16, 64), np.float32), np.zeros(16, np.int64), reduction="elementwise_mean", id="x")
    small = core.route(req, server_max=1 << 20, parallel_streams=4)
    assert not small.chunked and small.parts is None  # 4 KiB: one unary message
    big = core.route(req, server_max=1 << 20, chunked_above_bytes=1024, parallel_streams=4)
    assert big.chunked and len(big.streams) == 4 and big.join == ("mean", "x", "cross_entropy", True)
    whole = core.route(req, server_max=1 << 20, chunked_above_bytes=1024, parallel_streams=1)
    assert whole.chunked and len(whole.streams) == 1 and whole.join is None
    assert layout.REDUCTIONS["elementwise_mean"] == pb.MEAN


def test_round_robin_and_streams_per_evaluate_many():
    turns = core.RoundRobin(3)
    assert [turns.next() for _ in range(4)] == [0, 1, 2, 0] and turns.take(3) == [1, 2, 0]
    with pytest.raises(ValueError):
        core.RoundRobin(0)
    assert core.stream_count(64, None, 4) == 4 and core.pack_size(64, None, streams=4) == 4
    assert core.stream_count(2, None, 4) == 2  # never more streams than requests in flight
    assert core.stream_count(64, 32, 4) == 2  # two messages of 32 in flight
    assert core.pack_size(64, None) == 16  # one connection: unchanged


def test_every_per_sequence_field_is_joined():
    """A field added to SequenceStats must be joined too (or the split refused): this list is what join_responses concatenates."""
    assert [f.name for f in pb.SequenceStats.DESCRIPTOR.fields] == list(split.SEQUENCE_FIELDS)


@pytest.mark.parametrize(("loss", "class_indices", "negative"), [("cross_entropy", False, True), ("cross_entropy", True, False), ("kl_div", True, False)])
def test_join_signs_a_zero_total_as_torch(loss, class_indices, negative):
    """torch's sums start from +0.0; cross_entropy with probabilities negates its sum: -0.0."""
    parts = [pb.EvaluateResponse(loss_sum=z, weight_sum=2.0, counted=2) for z in (0.0, -0.0)]
    for p in parts:
        p.loss.dtype = pb.FLOAT32
    for name in ("sum", "mean"):
        joined = tensors.torch_from_proto(split.join_responses(parts, name, loss=loss, class_indices=class_indices).loss)
        assert joined.item() == 0.0 and joined.signbit().item() == negative
