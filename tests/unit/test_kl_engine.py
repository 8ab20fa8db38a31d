"""kl_div as an engine loss, without gRPC: the client's wire options decoded by the server
(convert), planned and run by the engine (engine.plan / engine.run) and streamed in row chunks
through the chunk assembler, against torch.nn.functional.kl_div (checks: tests/kl_cases.py)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from chunk_feed import feed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kl_cases import assert_within, cases, check_values, result_magnitude, torch_kl_div
from lossd_client import LossRequest, core, layout
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client.errors import InvalidArgumentError
from lossd_server import convert, engine, wire
from lossd_server.chunks import ChunkAssembler
from lossd_server.engine import kl_div as kd

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def request(x: torch.Tensor, t: torch.Tensor, options: dict[str, Any]) -> LossRequest:
    return LossRequest(x, t, layout.KL_DIV, **options)


def planned(req: LossRequest) -> tuple[engine.KlDivLossPlan, torch.Tensor, torch.Tensor]:
    """The request as the client encodes it and the server decodes and plans it."""
    msg, _ = core.build(req)
    decoded = convert.decode_request(wire.parse(pb.EvaluateRequest, msg.SerializeToString()))
    return decoded.plan, decoded.input, decoded.target


def wire_options(options: dict[str, Any]) -> bool:
    """Options a LossRequest can carry (torch itself takes any string, the wire only its reductions)."""
    return options["reduction"] in layout.REDUCTIONS


@SETTINGS
@given(cases())
def test_the_wire_and_the_engine_give_torchs_answer(case: tuple[torch.Tensor, torch.Tensor, dict[str, Any]]) -> None:
    x, t, options = case
    if not wire_options(options):
        return
    try:
        torch_kl_div(x, t, **options)
    except Exception:  # noqa: BLE001 - torch rejects: so does lossd, naming a field
        with pytest.raises((engine.InvalidInput, InvalidArgumentError, ValueError)):
            planned(request(x, t, options))
        return
    plan, xi, ti = planned(request(x, t, options))
    result = engine.run(plan, xi, ti, chunk_bytes=64)
    check_values(result.loss, x, t, options)
    assert result.counted == math.prod(torch.broadcast_shapes(x.shape, t.shape))
    kplan = kd.plan_kl_div(x.shape, x.dtype, t.shape, t.dtype, **options)
    assert result.weight_sum == kplan.denominator
    if kplan.reduction != "none":  # the totals reproduce the answer: what combining requests relies on
        combined = torch.tensor(kd.divide(result.loss_sum, result.weight_sum), dtype=torch.float64).to(result.loss.dtype)
        torch.testing.assert_close(result.loss, combined, rtol=0, atol=0, equal_nan=True)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.sampled_from([1, 7, 64, 1 << 20]))
def test_row_chunks_through_the_assembler_equal_the_whole(
    case: tuple[torch.Tensor, torch.Tensor, dict[str, Any]], chunk_bytes: int
) -> None:
    x, t, options = case
    if not wire_options(options):
        return
    req = request(x, t, options)
    try:
        plan, xi, ti = planned(req)
    except (engine.InvalidInput, InvalidArgumentError, ValueError):
        return
    whole = engine.run(plan, xi, ti)
    messages = [wire.parse(pb.EvaluateChunk, p) for p in core.chunk_payloads(req, chunk_bytes=chunk_bytes)]
    if not layout.input_rows_are_output_rows(layout.KL_DIV, x.shape, t.shape):
        with pytest.raises(engine.InvalidInput) as info:
            ChunkAssembler(messages[0].header)
        assert info.value.field == "header.input_shape"
        return
    chunked = feed(ChunkAssembler(messages[0].header), messages, chunk_bytes=32)
    assert (chunked.counted, chunked.weight_sum) == (whole.counted, whole.weight_sum)
    if plan.needs_losses():
        torch.testing.assert_close(chunked.loss, whole.loss, rtol=0, atol=0, equal_nan=True)
    else:
        eps = torch.finfo(whole.loss.dtype).eps
        bound = eps * whole.loss.double().abs() + 64 * torch.finfo(torch.float64).eps * result_magnitude(plan.call, x, t)
        assert_within(chunked.loss, whole.loss, bound + torch.finfo(whole.loss.dtype).smallest_normal * eps)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"weight": np.ones(3, np.float32)}, "options.weight"),
        ({"label_smoothing": 0.1}, "options.label_smoothing"),
        ({"class_axis": -1}, "options.class_axis"),
        ({"extras": ("entropy",)}, "options.extras"),
        ({"sequence_stats": True}, "options.sequence_stats"),
        ({"shift_targets": True}, "options.shift_targets"),
    ],
)
def test_options_of_the_other_losses_are_rejected_by_name(fields: dict[str, Any], field: str) -> None:
    req = LossRequest(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), layout.KL_DIV, **fields)
    with pytest.raises(engine.InvalidInput) as info:
        planned(req)
    assert info.value.field == field


def test_ignore_index_on_the_wire_is_rejected_by_name() -> None:
    msg, _ = core.build(LossRequest(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), layout.KL_DIV))
    assert not msg.options.HasField("ignore_index")  # the client sends none for kl_div
    msg.options.ignore_index = 0
    with pytest.raises(engine.InvalidInput) as info:
        convert.decode_request(wire.parse(pb.EvaluateRequest, msg.SerializeToString()))
    assert info.value.field == "options.ignore_index"


def test_kl_div_options_on_other_losses() -> None:
    x, t = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    with pytest.raises(engine.InvalidInput) as info:
        planned(LossRequest(x, t, log_target=True))
    assert info.value.field == "options.log_target"
    with pytest.raises(engine.InvalidInput) as info:
        planned(LossRequest(x, t, reduction="batchmean"))
    assert info.value.field == "options.reduction"
    # torch's legacy keywords decide the reduction of every loss when they travel on the wire
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        plan, xi, ti = planned(LossRequest(x, t, reduction="batchmean", size_average=size_average, reduce=reduce))
        want = torch.nn.functional.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        torch.testing.assert_close(engine.run(plan, xi, ti).loss, want)


def test_legacy_keywords_beside_batchmean_divide_by_the_batch_as_torch() -> None:
    x, t = torch.randn(5, 4).log_softmax(1), torch.rand(5, 4)
    for size_average, reduce in [(False, None), (None, False), (True, None)]:
        plan, xi, ti = planned(request(x, t, {"reduction": "batchmean", "size_average": size_average, "reduce": reduce}))
        want, _ = torch_kl_div(x, t, reduction="batchmean", size_average=size_average, reduce=reduce)
        torch.testing.assert_close(engine.run(plan, xi, ti).loss, want, rtol=1e-6, atol=0)


def test_the_checkpoint_runs_between_row_ranges() -> None:
    x, t = torch.randn(50, 8).log_softmax(1), torch.rand(50, 8)
    plan = engine.plan(engine.LossSpec(loss=engine.KL_DIV, reduction="sum"), x.shape, x.dtype, t)
    calls = []
    engine.run(plan, x, t, chunk_bytes=8 * 4 * 10, checkpoint=lambda: calls.append(1))
    assert len(calls) == 5  # 10 rows of 8 float32 elements per range

    def stop() -> None:
        raise RuntimeError("abandoned")

    with pytest.raises(RuntimeError, match="abandoned"):
        engine.run(plan, x, t, checkpoint=stop)


def test_answer_and_working_sizes_bound_what_none_returns() -> None:
    x, t = torch.randn(30, 7, dtype=torch.float64), torch.rand(7)
    plan = engine.plan(engine.LossSpec(loss=engine.KL_DIV, reduction="none"), x.shape, x.dtype, t)
    loss = engine.run(plan, x, t).loss
    assert plan.answer_nbytes() >= loss.numel() * loss.element_size() and plan.working_nbytes() >= 2 * loss.numel() * 8
    summed = engine.plan(engine.LossSpec(loss=engine.KL_DIV, reduction="batchmean"), x.shape, x.dtype, t)
    assert summed.answer_nbytes() == 1024 and summed.working_nbytes() == 0


@pytest.mark.parametrize(
    "input_shape,target_shape",
    [
        ((2**40, 1, 0), (1, 2**40, 0)),
        ((2**32, 1, 0), (1, 2**32, 0)),
        ((1, 2**31, 0), (2**31, 1, 0)),
        ((0, 2**40, 1, 0), (1, 1, 2**40, 0)),
        ((2**31, 1, 0), (1, 2**31, 0)),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_empty_broadcast_whose_sizes_overflow_torchs_storage_check_is_refused_as_torch_refuses_it(
    input_shape, target_shape, reduction
) -> None:
    """Empty operands broadcast to sizes whose running product passes 2**64 before their zero: torch
    refuses the output's storage; the engine answered INTERNAL ("numel: integer multiplication overflow")."""
    x, t = torch.empty(input_shape), torch.empty(target_shape)
    try:
        expected = torch.nn.functional.kl_div(x, t, reduction=reduction)
    except RuntimeError as exc:
        with pytest.raises(engine.InvalidInput) as info:
            engine.evaluate(engine.LossSpec(loss="kl_div", reduction=reduction), x, t)
        assert info.value.field == "target"
        assert str(exc) in str(info.value)
        return
    got = engine.evaluate(engine.LossSpec(loss="kl_div", reduction=reduction), x, t)
    assert got.loss.shape == expected.shape
