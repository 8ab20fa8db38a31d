"""The client's rules of what a valid answer holds (lossd_client.answers), against the server's own answers.

For every loss, reduction, dtype combination and shape of a grid, the request as the client encodes
it is decoded, planned and evaluated by the server's engine and encoded as the server answers it.
The client's expectation, derived from the request alone, must be derived (the client can tell
what any request the server answers holds) and must accept that answer: no valid answer is ever
refused. The same expectations then refuse the answer with one field changed.
"""

from __future__ import annotations

import itertools
import re
import warnings

import grpc
import numpy as np
import pytest
import torch
from lossd_client import answers, compare, core, layout, split
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client.errors import InternalError, LossdError, from_status_value
from lossd_client.types import LossRequest
from lossd_server import codec, compare_convert, convert, engine, wire

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
EXTRAS = ("target_logprob", "entropy", "target_rank", "argmax_correct")


def server_answer(req: LossRequest) -> pb.EvaluateResponse | None:
    """The server's answer to ``req`` (None where the client or the server refuses it)."""
    try:
        msg, _ = core.build(req)
        decoded = convert.decode_request(wire.parse(pb.EvaluateRequest, msg.SerializeToString()))
    except (LossdError, engine.InvalidInput, codec.TensorError):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = engine.run(decoded.plan, decoded.input, decoded.target)
    return convert.encode_result(req.id, result)


def accepted(req: LossRequest) -> tuple[pb.EvaluateResponse, answers.Expected] | None:
    """The server's answer and the client's expectation, which must hold it."""
    response = server_answer(req)
    if response is None:
        return None
    expect = answers.expected(req)
    assert expect.loss_shape is not None, req
    answers.evaluate_answer(response, expect)
    core.parse(response, tensors_as_torch(req), expect)
    return response, expect


def tensors_as_torch(req: LossRequest) -> bool:
    return isinstance(req.input, torch.Tensor)


def class_cases():
    shapes = [
        ((3, 4), (3,), None),
        ((4,), (), None),
        ((4,), (1,), None),
        ((2, 4, 3), (2, 3), None),
        ((2, 3, 4), (2, 3), -1),
        ((0, 4), (0,), None),
    ]
    for loss, (xs, ts, axis), xd, td, wd, reduction in itertools.product(
        (layout.CROSS_ENTROPY, layout.NLL_LOSS),
        shapes,
        FLOATS,
        (torch.int64, torch.uint8),
        (None, torch.float32, torch.float64),
        ("mean", "sum", "none"),
    ):
        x = torch.randn(xs).to(xd)
        t = torch.randint(0, 3, ts).to(td)
        w = None if wd is None else torch.ones(x.shape[axis if axis is not None else (0 if len(xs) == 1 else 1)], dtype=wd)
        yield LossRequest(x, t, loss, reduction=reduction, weight=w, class_axis=axis, id="a")


def lm_cases():
    for xd, shift, extras, ignored in itertools.product(FLOATS, (False, True), (EXTRAS, ("entropy",), ()), (False, True)):
        t = torch.randint(0, 5, (2, 3))
        if ignored:
            t[0] = -100
        for x, tt in ((torch.randn(2, 3, 5).to(xd), t), (torch.randn(3, 5).to(xd), t[0]), (torch.randn(0, 3, 5).to(xd), t[:0])):
            yield LossRequest(x, tt, reduction="none", class_axis=-1, shift_targets=shift, extras=extras, sequence_stats=True, id="lm")


def prob_bce_cases():
    for xd, td, wd, reduction in itertools.product(FLOATS, FLOATS, (None, *FLOATS), ("mean", "sum", "none")):
        for xs in ((3, 4), (0, 4), (2, 4, 2)):
            x, t = torch.randn(xs).to(xd), torch.rand(xs).to(td)
            yield LossRequest(x, t, reduction=reduction, weight=None if wd is None else torch.ones(4, dtype=wd), label_smoothing=0.1)
            yield LossRequest(
                x, t, layout.BCE_WITH_LOGITS, reduction=reduction, pos_weight=None if wd is None else torch.ones(xs[-1], dtype=wd)
            )
        yield LossRequest(torch.randn(()).to(xd), torch.rand(()).to(td), layout.BCE_WITH_LOGITS, reduction=reduction)


def kl_cases():
    shapes = (((3, 4), (3, 4)), ((), (3, 4)), ((3, 4), ()), ((), ()), ((1, 4), (3, 1)), ((4,), (3, 4)), ((0, 4), (0, 4)))
    for xd, td, (xs, ts), reduction in itertools.product(FLOATS, FLOATS, shapes, ("mean", "sum", "none", "batchmean")):
        x, t = torch.randn(xs).to(xd), torch.rand(ts).to(td)
        yield LossRequest(x, t, layout.KL_DIV, reduction=reduction)
    for size_average, reduce in itertools.product((None, False, True), (None, False, True)):
        yield LossRequest(
            torch.randn(3, 4), torch.rand(3, 4), layout.KL_DIV, reduction="batchmean", size_average=size_average, reduce=reduce
        )
        yield LossRequest(torch.randn(3, 4), torch.randint(0, 4, (3,)), size_average=size_average, reduce=reduce)


@pytest.mark.parametrize("cases", [class_cases, lm_cases, prob_bce_cases, kl_cases])
def test_every_answer_of_the_server_fits_what_the_client_expects_of_it(cases) -> None:
    torch.manual_seed(0)
    answered = [accepted(req) for req in cases()]
    assert sum(a is not None for a in answered) >= len(answered) // 4  # the grid is mostly requests torch takes


def test_an_answer_with_one_field_changed_is_refused_naming_it() -> None:
    req = LossRequest(torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)), class_axis=-1, extras=("entropy",), sequence_stats=True, id="r")
    response, expect = accepted(req)
    changes = {
        "loss has shape [3], the request implies [] (reduction='mean')": lambda r: r.loss.shape.append(3),
        "loss has dtype float64, the request implies float32": lambda r: setattr(r.loss, "dtype", pb.FLOAT64),
        "loss has 3 bytes of data, its shape [] of float32 holds 4": lambda r: setattr(r.loss, "data", b"123"),
        "loss is missing": lambda r: r.ClearField("loss"),
        "id is 'evil', the request's is 'r'": lambda r: setattr(r, "id", "evil"),
        "extras['entropy'] has shape [7]": lambda r: r.extras["entropy"].CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[7], data=bytes(28))),
        "extras has 'bogus', which the request does not ask for": lambda r: r.extras["bogus"].CopyFrom(r.extras["entropy"]),
        "extras['entropy'] is missing": lambda r: r.ClearField("extras"),
        "sequences.is_greedy has 1 values, the request implies 2": lambda r: r.sequences.is_greedy.pop(),
        "sequences are missing": lambda r: r.ClearField("sequences"),
    }
    for text, change in changes.items():
        wrong = pb.EvaluateResponse()
        wrong.CopyFrom(response)
        change(wrong)
        with pytest.raises(InternalError, match=f"^the server's answer: {re.escape(text)}"):
            core.parse(wrong, False, expect)


def test_a_shape_no_tensor_has_is_refused_where_the_request_implies_none() -> None:
    for shape, data in (([2**40], bytes(4)), ([-1], bytes(16)), ([1] * 70, bytes(4)), ([0, 2**62], b"")):
        response = pb.EvaluateResponse(loss=pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=data))
        with pytest.raises(InternalError, match="^the server's answer: loss "):
            core.parse(response, False)


def test_a_part_that_failed_fails_the_whole_request_and_a_part_that_does_not_fit_its_part_is_refused() -> None:
    req = LossRequest(torch.randn(4, 3), torch.randint(0, 3, (4,)), reduction="none", id="w")
    parts = split.split_rows(req, 2)
    good = [accepted(part)[0] for part in parts]
    expects = [answers.expected(part) for part in parts]
    failed = pb.EvaluateResponse(id="w", error=pb.ItemError(code=grpc.StatusCode.INTERNAL.value[0], message="part failed"))
    with pytest.raises(InternalError, match="^part failed$"):
        split.join_responses([good[0], failed], "none", "w", expected=expects)
    short = pb.EvaluateResponse()
    short.CopyFrom(good[1])
    short.loss.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[1], data=bytes(4)))
    with pytest.raises(InternalError, match=r"^the server's answer: loss has shape \[1\], the request implies \[2\]"):
        split.join_responses([good[0], short], "none", "w", expected=expects)
    joined = split.join_responses(good, "none", "w", expected=expects)
    assert core.parse(joined, True, answers.expected(req)).loss.shape == (4,)


def test_an_item_error_with_code_ok_or_an_unknown_code_is_an_error_and_long_messages_are_cut() -> None:
    error = from_status_value(0, "fine")
    assert isinstance(error, InternalError) and error.code != grpc.StatusCode.OK and "code 0 (OK)" in str(error) and "'fine'" in str(error)
    unknown = from_status_value(9999, "weird")
    assert type(unknown) is LossdError and unknown.code == grpc.StatusCode.UNKNOWN and str(unknown) == "weird"
    long = from_status_value(grpc.StatusCode.INTERNAL.value[0], "x" * 10**6)
    assert len(str(long)) < 5000 and str(long).endswith("(1000000 characters in all)")


def comparison_cases():
    rng = np.random.default_rng(0)
    for rd, cd, shape, tokens, top_k in itertools.product(
        (np.float32, np.float16, np.float64), (np.float32, np.float64), ((2, 3, 5), (5,), (0, 5)), (False, True), (0, 2)
    ):
        ref, cand = rng.standard_normal(shape).astype(rd), rng.standard_normal(shape).astype(cd)
        tok = rng.integers(0, 5, shape[:-1]) if tokens else None
        yield compare.CompareInputs(ref, cand, tok, top_k=top_k, id="c")


def test_every_comparison_of_the_server_fits_what_the_client_expects_of_it() -> None:
    for inputs in comparison_cases():
        call = compare.route(inputs, server_max=1 << 20)
        decoded = compare_convert.decode_request(wire.parse(pb.CompareRequest, call.message.SerializeToString()), max_top_k=16)
        response = compare_convert.encode_result("c", decoded.plan.evaluate(decoded.reference, decoded.candidate))
        assert call.expect is not None and call.expect.shape is not None
        answers.comparison_answer(response, call.expect)
        call.parse(response)
        wrong = pb.CompareResponse()
        wrong.CopyFrom(response)
        wrong.kl.shape.append(1)
        with pytest.raises(InternalError, match=r"^the server's answer: kl has shape \["):
            call.parse(wrong)
