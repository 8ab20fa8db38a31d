"""Large answers written as wire bytes (lossd_server.answers): the very bytes protobuf writes for the
same message, whatever slices they are written in; the call's checkpoint stops them; the methods'
serializers pass such bytes through.
"""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
import torch
from lossd_client import compare
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_server import answers, compare_convert, convert, engine, wire
from lossd_server.batcher import Abandoned, DeadlinePassed
from lossd_server.budget import MemoryBudget
from lossd_server.engine.results import LossResult, SequenceStats

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@pytest.fixture(params=["whole", "sliced"])
def pieces(request, monkeypatch) -> str:
    """Default piece sizes, or tiny ones: a tensor's bytes and an int64 field's varints cut mid-value."""
    if request.param == "sliced":
        monkeypatch.setattr(answers, "PIECE_BYTES", 3)
        monkeypatch.setattr(answers, "PIECE_VARINTS", 2)
    return request.param


def sequences(n: int, gen: torch.Generator, tokens: torch.Tensor | None = None) -> SequenceStats:
    f64 = {"dtype": torch.float64}
    nll = torch.randn(n, generator=gen, **f64)
    if n:
        nll[0] = float("nan")
    tokens = torch.randint(0, 2000, (n,), generator=gen) if tokens is None else tokens
    return SequenceStats(nll, tokens, torch.randn(n, generator=gen, **f64), -torch.zeros(n, **f64), torch.rand(n, generator=gen) > 0.5)


def loss_results():
    """Results of every dtype and shape an answer holds, sequence statistics and extras among them."""
    gen = torch.Generator().manual_seed(0)
    varints = torch.tensor([0, 1, 127, 128, 300, 16383, 16384, 2**35, 2**63 - 1, -1, -(2**63)])
    for dtype, shape in itertools.product(FLOATS, [(), (0,), (5,), (3, 4), (2**40, 0)]):
        loss = torch.randn(shape if 0 not in shape else (0,), generator=gen).to(dtype).reshape(shape)
        yield LossResult(loss, 1.5, -0.0, 7)
    yield LossResult(torch.randn(6, 4, generator=gen)[:, ::2], 0.0, 3.0, 0)  # not contiguous
    for n in (0, 1, 5, 300):
        yield LossResult(torch.tensor(2.5), 2.0, 1.0, n, sequences(n, gen))
    yield LossResult(torch.tensor(1.0), 0.0, 0.0, 0, sequences(len(varints), gen, varints))
    extras = {"target_rank": torch.randint(0, 9, (3, 4), generator=gen), "argmax_correct": torch.rand(3, 4, generator=gen) > 0.5}
    extras |= {"target_logprob": torch.randn(3, 4, generator=gen).to(torch.bfloat16), "entropy": torch.randn(3, 4, generator=gen)}
    for name, value in extras.items():
        yield LossResult(torch.randn(3, 4, generator=gen), 1.0, 12.0, 12, sequences(3, gen), {name: value})
    yield LossResult(torch.randn(3, 4, generator=gen), 1.0, 12.0, 12, sequences(3, gen), extras)


@pytest.mark.parametrize("request_id", ["", "a", "idé-" + "x" * 200])
def test_an_evaluate_answer_is_the_bytes_protobuf_writes(pieces: str, request_id: str) -> None:
    for result in loss_results():
        want = convert.encode_result(request_id, result)
        got = b"".join(convert.answer_parts(request_id, result))
        if len(result.extras) <= 1:  # protobuf writes a map in an order of its own
            assert got == want.SerializeToString(), result
        assert pb.EvaluateResponse.FromString(got) == want


def test_an_engine_answer_is_the_bytes_protobuf_writes(pieces: str) -> None:
    """Results as the engine makes them: per-element losses, extras, sequence statistics."""
    gen = torch.Generator().manual_seed(1)
    for dtype, reduction in itertools.product(FLOATS, ("none", "mean")):
        x = torch.randn(4, 6, 5, generator=gen).to(dtype)
        t = torch.randint(0, 5, (4, 6), generator=gen)
        t[1, 2] = -100
        spec = engine.LossSpec(reduction=reduction, class_axis=-1, extras=("target_rank",), sequence_stats=True)
        result = engine.run(engine.plan(spec, x.shape, x.dtype, t), x, t)
        want = convert.encode_result("r", result).SerializeToString()
        assert b"".join(convert.answer_parts("r", result)) == want


def test_a_comparison_answer_is_the_bytes_protobuf_writes(pieces: str) -> None:
    rng = np.random.default_rng(0)
    for shape, tokens, top_k in itertools.product(((2, 3, 5), (5,), (0, 5)), (False, True), (0, 2)):
        ref, cand = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float16)
        tok = rng.integers(0, 5, shape[:-1]) if tokens else None
        message = compare.request(compare.CompareInputs(ref, cand, tok, top_k=top_k, id="c"))
        decoded = compare_convert.decode_request(wire.parse(pb.CompareRequest, message.SerializeToString()), max_top_k=16)
        result = decoded.plan.evaluate(decoded.reference, decoded.candidate)
        want = compare_convert.encode_result("c", result).SerializeToString()
        assert b"".join(compare_convert.answer_parts("c", result)) == want


def test_varints_are_protobufs() -> None:
    rng = np.random.default_rng(2)
    values = [0, 1, 127, 128, 2**14 - 1, 2**14, 2**62, 2**63 - 1, -1, -2, -(2**63)]
    values += [int(v) for v in rng.integers(-(2**63), 2**63 - 1, 500)] + [int(v) for v in rng.integers(0, 2**20, 500)]
    for chunk in (values, values[:4], [0] * 10, [127] * 3, []):
        payload = answers.varints(np.array(chunk, np.int64))
        want = pb.SequenceStats(tokens=chunk).SerializeToString()  # tokens = 2, packed
        assert (answers.key(2, len(payload)) + payload if chunk else b"") == want


def test_the_checkpoint_stops_the_encoding_between_pieces(monkeypatch) -> None:
    """A checkpoint that raises (the call went away, or its deadline passed) ends the encoding at
    once: before it starts, between slices, between fields, and before the parts are joined."""
    monkeypatch.setattr(answers, "PIECE_BYTES", 1024)
    monkeypatch.setattr(answers, "PIECE_VARINTS", 100)
    result = LossResult(torch.randn(1000), 1.0, 1.0, 10, sequences(1000, torch.Generator().manual_seed(3)))
    calls = []
    answers.wire_bytes(convert.answer_parts, "x", result, lambda: calls.append(1))
    # loss: 4 slices; nll_sum, mean_nll, perplexity: 8 each; tokens: 10; is_greedy: 1; the join: 1
    assert len(calls) == 4 + 3 * 8 + 10 + 1 + 1
    for stop_at in range(len(calls)):
        seen = []

        def checkpoint(seen=seen, stop_at=stop_at) -> None:
            if len(seen) == stop_at:
                raise DeadlinePassed("the deadline passed during evaluation; evaluation stopped")
            seen.append(1)

        with pytest.raises(DeadlinePassed):
            answers.wire_bytes(convert.answer_parts, "x", result, checkpoint)
        assert len(seen) == stop_at


def test_small_answers_are_messages_large_ones_bytes_built_on_a_thread() -> None:
    result = LossResult(torch.randn(100), 1.0, 1.0, 100, sequences(5, torch.Generator().manual_seed(4)))
    message = convert.encode_result("id", result)

    def gone() -> None:
        raise Abandoned("the call ended; evaluation stopped")

    async def run(inline_bytes: int, checkpoint=None):
        held = MemoryBudget(1 << 20).empty()
        return await answers.encode_answer(convert.ANSWER, "id", result, 600, inline_bytes, held, checkpoint)

    assert asyncio.run(run(600, gone)) == message  # small: the message, no checkpoint (nothing but the type check added)
    assert asyncio.run(run(599)) == message.SerializeToString()
    with pytest.raises(Abandoned):
        asyncio.run(run(599, gone))


def test_the_serializers_pass_bytes_through() -> None:
    serialize = answers.serializer(pb.EvaluateResponse)
    message = pb.EvaluateResponse(id="x", counted=3)
    assert serialize(message) == message.SerializeToString()
    data = message.SerializeToString()
    assert serialize(data) is data


def test_a_packed_answer_joined_item_by_item_is_protobufs() -> None:
    items = [convert.encode_result(str(i), r) for i, r in enumerate(loss_results())]
    items.append(convert.error_response("e", 3, "bad"))
    mixed = [m.SerializeToString() if i % 2 else m for i, m in enumerate(items)]
    got = answers.joined(mixed, 1)
    assert pb.EvaluateBatchResults.FromString(got) == pb.EvaluateBatchResults(responses=items)
    one_extra = [m for m in items if len(m.extras) <= 1]  # protobuf writes a map in an order of its own
    assert answers.joined(one_extra, 1) == pb.EvaluateBatchResults(responses=one_extra).SerializeToString()
    assert answers.joined([], 1) == pb.EvaluateBatchResults().SerializeToString() == b""
