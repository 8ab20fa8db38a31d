"""Bad raw wire requests against a real server: each is INVALID_ARGUMENT naming the field, and
the next good request on the same channel still succeeds."""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc

X = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], dtype=np.float32)
T = np.array([2, 0], dtype=np.int64)


def good_request() -> pb.EvaluateRequest:
    msg = pb.EvaluateRequest(id="good")
    tensors.to_proto(X, msg.input)
    tensors.to_proto(T, msg.target)
    msg.options.loss = pb.CROSS_ENTROPY
    return msg


def with_(mutate: Callable[[pb.EvaluateRequest], object]) -> pb.EvaluateRequest:
    msg = good_request()
    mutate(msg)
    return msg


def set_tensor(field: Callable[[pb.EvaluateRequest], pb.Tensor], value: np.ndarray):
    return lambda m: tensors.to_proto(value, field(m))


def shape(field: Callable[[pb.EvaluateRequest], pb.Tensor], dims: list[int]):
    def mutate(m: pb.EvaluateRequest) -> None:
        field(m).shape[:] = dims

    return mutate


def attr(path: str, value):
    def mutate(m: pb.EvaluateRequest) -> None:
        obj = m
        *parents, last = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, last, value)

    return mutate


def both(*mutations):
    def mutate(m: pb.EvaluateRequest) -> None:
        for f in mutations:
            f(m)

    return mutate


def inp(m):
    return m.input


def tgt(m):
    return m.target


def wgt(m):
    return m.options.weight


P = np.full((2, 3), 1 / 3, dtype=np.float32)

# (row id, request, field the message must name)
BAD = [
    ("input dtype unspecified", with_(attr("input.dtype", pb.DTYPE_UNSPECIFIED)), "input.dtype"),
    ("input dtype 99", with_(attr("input.dtype", 99)), "input.dtype"),
    ("target dtype 99", with_(attr("target.dtype", 99)), "target.dtype"),
    ("target dtype unspecified", with_(attr("target.dtype", 0)), "target.dtype"),
    ("weight dtype 99", with_(both(set_tensor(wgt, np.ones(3, np.float32)), attr("options.weight.dtype", 99))), "options.weight.dtype"),
    ("loss 99", with_(attr("options.loss", 99)), "options.loss"),
    ("reduction 99", with_(attr("options.reduction", 99)), "options.reduction"),
    ("extra 99", with_(lambda m: m.options.extras.append(99)), "options.extras"),
    ("input data too short", with_(attr("input.data", X.tobytes()[:-1])), "input.data"),
    ("input data too long", with_(attr("input.data", X.tobytes() + b"\0\0\0\0")), "input.data"),
    ("target data too short", with_(attr("target.data", T.tobytes()[:8])), "target.data"),
    ("weight data too long", with_(both(set_tensor(wgt, np.ones(3, np.float32)), attr("options.weight.data", b"\0" * 16))), "options.weight.data"),
    ("negative dim", with_(shape(inp, [-2, 3])), "input.shape"),
    ("negative target dim", with_(shape(tgt, [-2])), "target.shape"),
    ("element count overflow", with_(shape(inp, [2**40, 2**40])), "input.shape"),
    ("element count overflow target", with_(shape(tgt, [2**31, 2**31, 2**31])), "target.shape"),
    ("empty input whose strides overflow", with_(both(shape(inp, [0, 2, 2**62]), attr("input.data", b""))), "input.shape"),
    ("empty weight whose strides overflow", with_(lambda m: m.options.weight.MergeFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[0, 2**40, 2**40]))), "options.weight.shape"),
    ("0-d input for cross_entropy", with_(both(set_tensor(inp, np.float32(1.0)), set_tensor(tgt, np.int64(0)))), "input"),
    ("0-d input for nll_loss", with_(both(set_tensor(inp, np.float32(1.0)), set_tensor(tgt, np.int64(0)), attr("options.loss", pb.NLL))), "input"),
    ("class target >= C", with_(set_tensor(tgt, np.array([3, 0]))), "target"),
    ("class target negative", with_(set_tensor(tgt, np.array([-1, 0]))), "target"),
    ("class target == C with other ignore_index", with_(both(set_tensor(tgt, np.array([3, 0])), attr("options.ignore_index", 2))), "target"),
    ("int32 class target", with_(set_tensor(tgt, T.astype(np.int32))), "target"),
    ("int16 class target", with_(set_tensor(tgt, T.astype(np.int16))), "target"),
    ("bool class target", with_(set_tensor(tgt, T.astype(bool))), "target"),
    ("float class target for nll", with_(both(set_tensor(tgt, T.astype(np.float32)), attr("options.loss", pb.NLL))), "target"),
    ("float same-shape target for nll", with_(both(set_tensor(tgt, P), attr("options.loss", pb.NLL))), "target"),
    ("integer input", with_(set_tensor(inp, X.astype(np.int64))), "input"),
    ("class target batch mismatch", with_(set_tensor(tgt, np.array([0, 1, 2]))), "target"),
    ("probability target wrong shape", with_(set_tensor(tgt, np.full((2, 4), 0.25, np.float32))), "target"),
    ("probability target int64 same shape", with_(set_tensor(tgt, np.zeros((2, 3), np.int64))), "target"),
    ("weight wrong length", with_(set_tensor(wgt, np.ones(4, np.float32))), "options.weight"),
    ("weight 2-d", with_(set_tensor(wgt, np.ones((1, 3), np.float32))), "options.weight"),
    ("weight wrong dtype", with_(set_tensor(wgt, np.ones(3, np.float64))), "options.weight"),
    ("weight integer dtype", with_(set_tensor(wgt, np.ones(3, np.int64))), "options.weight"),
    ("label_smoothing > 1", with_(attr("options.label_smoothing", 1.5)), "options.label_smoothing"),
    ("label_smoothing inf", with_(attr("options.label_smoothing", math.inf)), "options.label_smoothing"),
    ("label_smoothing > 1 probabilities", with_(both(set_tensor(tgt, P), attr("options.label_smoothing", 2.0))), "options.label_smoothing"),
    ("label_smoothing for nll", with_(both(attr("options.loss", pb.NLL), attr("options.label_smoothing", 0.1))), "options.label_smoothing"),
    ("ignore_index >= 0 with probabilities", with_(both(set_tensor(tgt, P), attr("options.ignore_index", 0))), "options.ignore_index"),
    ("bce target shape", with_(both(attr("options.loss", pb.BINARY_CROSS_ENTROPY_WITH_LOGITS), set_tensor(tgt, P[:, :2]))), "target"),
    ("bce target transposed shape", with_(both(attr("options.loss", pb.BINARY_CROSS_ENTROPY_WITH_LOGITS), set_tensor(tgt, P.T.copy()))), "target"),
    ("bce weight not broadcastable", with_(both(attr("options.loss", pb.BINARY_CROSS_ENTROPY_WITH_LOGITS), set_tensor(tgt, P), set_tensor(wgt, np.ones(2, np.float32)))), "options.weight"),
    ("bce pos_weight not broadcastable", with_(both(attr("options.loss", pb.BINARY_CROSS_ENTROPY_WITH_LOGITS), set_tensor(tgt, P), set_tensor(lambda m: m.options.pos_weight, np.ones((3, 2, 3), np.float32)))), "options.pos_weight"),
    ("bce ignore_index", with_(both(attr("options.loss", pb.BINARY_CROSS_ENTROPY_WITH_LOGITS), set_tensor(tgt, P), attr("options.ignore_index", 3))), "options.ignore_index: binary_cross_entropy_with_logits() got an unexpected keyword argument 'ignore_index'"),
    ("bce ignore_index 0", with_(both(attr("options.loss", pb.BINARY_CROSS_ENTROPY_WITH_LOGITS), set_tensor(tgt, P), attr("options.ignore_index", 0))), "options.ignore_index"),
    ("pos_weight for cross_entropy", with_(set_tensor(lambda m: m.options.pos_weight, np.ones(3, np.float32))), "options.pos_weight"),
    ("input with a million dimensions", with_(shape(inp, [1] * 1_000_000)), "input.shape: expected at most 32 dimensions, got 1000000"),
    ("weight with a million dimensions", with_(shape(wgt, [1] * 1_000_000)), "options.weight.shape: expected at most 32 dimensions, got 1000000"),
    ("a million extras", with_(lambda m: m.options.extras.extend([1] * 1_000_000)), "options.extras: 1000000 values, more than MAX_EXTRA_VALUES=64"),
    ("missing input", with_(lambda m: m.ClearField("input")), "input"),
    ("missing target", with_(lambda m: m.ClearField("target")), "target"),
    ("data together with shm", with_(lambda m: m.input.shm.CopyFrom(pb.SharedMemoryRef(name="x", length=24))), "input.data"),
    ("id over max_id_bytes", with_(attr("id", "x" * 1025)), "id: takes 1025 bytes (UTF-8), over this server's max_id_bytes (1024)"),
    ("id over max_id_bytes in UTF-8", with_(attr("id", "é" * 513)), "id: takes 1026 bytes (UTF-8), over this server's max_id_bytes (1024)"),
    ("a 10 MB id", with_(attr("id", "x" * 10_000_000)), "id: takes 10000000 bytes (UTF-8), over this server's max_id_bytes (1024)"),
    ("a 10 MB id with an emoji", with_(attr("id", "x" * 10_000_000 + "\U0001f600")), "id: takes 10000004 bytes (UTF-8), over this server's max_id_bytes (1024)"),
    ("shm on a server without --allow-client-shm", with_(both(attr("input.data", b""), lambda m: m.input.shm.CopyFrom(pb.SharedMemoryRef(name="lossd-none", length=24)))), "input.shm"),
]


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.LossServiceStub(channel)


def expected_good() -> float:
    return float(F.cross_entropy(torch.from_numpy(X), torch.from_numpy(T)))


@pytest.mark.parametrize("name,request_msg,field", BAD, ids=[row[0] for row in BAD])
def test_bad_request_is_invalid_argument_naming_the_field(stub, name: str, request_msg: pb.EvaluateRequest, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Evaluate(request_msg, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    details = info.value.details()
    assert field in details, details
    reply = stub.Evaluate(good_request(), timeout=30)
    assert reply.loss.dtype == pb.FLOAT32
    assert np.frombuffer(reply.loss.data, "<f4")[0] == pytest.approx(expected_good(), rel=1e-6)


def as_chunked(msg: pb.EvaluateRequest) -> pb.EvaluateChunk:
    """A unary request as one EvaluateChunk: its header (id, options, the input's dtype and shape,
    the target) and the input's rows."""
    header = pb.ChunkHeader(id=msg.id, options=msg.options, input_dtype=msg.input.dtype, input_shape=msg.input.shape, target=msg.target)
    return pb.EvaluateChunk(header=header, input_rows=msg.input.data)


# (row id, request, field the unary request's error names, field the chunk header's names)
BAD_HEADERS = [
    ("class target batch mismatch", with_(set_tensor(tgt, np.array([0, 1, 2]))), "target", "header.target"),
    ("class target >= C", with_(set_tensor(tgt, np.array([3, 0]))), "target", "header.target"),
    ("int32 class target", with_(set_tensor(tgt, T.astype(np.int32))), "target", "header.target"),
    ("probability target wrong shape", with_(set_tensor(tgt, np.full((2, 4), 0.25, np.float32))), "target", "header.target"),
    ("integer input", with_(set_tensor(inp, X.astype(np.int64))), "input", "header.input_dtype"),
    ("3-d input with 0 classes", with_(both(set_tensor(inp, np.zeros((2, 0, 4), np.float32)), set_tensor(tgt, np.zeros((2, 4), np.int64)))), "input", "header.input_shape"),
    ("weight wrong length", with_(set_tensor(wgt, np.ones(4, np.float32))), "options.weight", "header.options.weight"),
    ("weight wrong dtype", with_(set_tensor(wgt, np.ones(3, np.float64))), "options.weight", "header.options.weight"),
    ("weight dtype 99", with_(both(set_tensor(wgt, np.ones(3, np.float32)), attr("options.weight.dtype", 99))), "options.weight.dtype", "header.options.weight.dtype"),
    ("pos_weight for cross_entropy", with_(set_tensor(lambda m: m.options.pos_weight, np.ones(3, np.float32))), "options.pos_weight", "header.options.pos_weight"),
    ("class_axis out of range", with_(attr("options.class_axis", 5)), "options.class_axis", "header.options.class_axis"),
    ("label_smoothing > 1", with_(attr("options.label_smoothing", 1.5)), "options.label_smoothing", "header.options.label_smoothing"),
    ("loss 99", with_(attr("options.loss", 99)), "options.loss", "header.options.loss"),
    ("bce target shape", with_(both(attr("options.loss", pb.BINARY_CROSS_ENTROPY_WITH_LOGITS), set_tensor(tgt, P[:, :2]))), "target", "header.target"),
]


@pytest.mark.parametrize("name,request_msg,field,header_field", BAD_HEADERS, ids=[row[0] for row in BAD_HEADERS])
def test_a_bad_chunk_header_names_the_headers_field(stub, name: str, request_msg: pb.EvaluateRequest, field: str, header_field: str) -> None:
    """EvaluateChunked refuses what Evaluate refuses, with the same message, naming the header's
    field (header.target, header.input_dtype / header.input_shape, header.options.weight), not the
    EvaluateRequest's, which the chunked call does not have."""
    errors = []
    for call in (lambda: stub.Evaluate(request_msg, timeout=30), lambda: stub.EvaluateChunked(iter([as_chunked(request_msg)]), timeout=30)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        errors.append(info.value.details())
    unary, chunked = errors
    assert unary.startswith(field + ": "), unary
    assert chunked == header_field + unary.removeprefix(field), chunked
    assert stub.Evaluate(good_request(), timeout=30).id == "good"


@pytest.mark.parametrize("ls", [-0.5, -1e-3, 0.0, 1.0, math.nan, -math.inf])
@pytest.mark.parametrize("probabilities", [False, True])
def test_label_smoothing_accepted_as_torch_accepts_it(stub, ls: float, probabilities: bool) -> None:
    """Negative, NaN and -inf label_smoothing are not errors in torch 2.13 (it ignores them); lossd agrees."""
    target = P if probabilities else T
    msg = good_request()
    tensors.to_proto(target, msg.target)
    msg.options.label_smoothing = ls
    reply = stub.Evaluate(msg, timeout=30)
    expected = F.cross_entropy(torch.from_numpy(X), torch.from_numpy(target), label_smoothing=ls)
    assert np.frombuffer(reply.loss.data, "<f4")[0] == pytest.approx(float(expected), rel=1e-6)


def test_stream_answers_a_bad_item_alone(stub) -> None:
    good = [good_request() for _ in range(4)]
    bad = with_(set_tensor(tgt, np.array([7, 0])))
    items = [*good[:2], bad, *good[2:]]
    for i, item in enumerate(items):
        item.id = f"item-{i}"
    replies = {r.id: r for r in stub.EvaluateStream(iter(items), timeout=30)}
    assert set(replies) == {f"item-{i}" for i in range(5)}
    bad_reply = replies.pop("item-2")
    assert bad_reply.HasField("error")
    assert bad_reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] == 3
    assert "target" in bad_reply.error.message
    for reply in replies.values():
        assert not reply.HasField("error")
        assert np.frombuffer(reply.loss.data, "<f4")[0] == pytest.approx(expected_good(), rel=1e-6)


def test_ids_are_bounded_on_every_rpc_and_never_echoed_when_too_long(stub, client) -> None:
    """Every id field of the contract (EvaluateRequest, stream and packed items, ChunkHeader,
    CompareRequest, CompareHeader) is refused over --max-id-bytes naming it: the answer echoes the
    id, so an unbounded one held answers no limit counted. A refused stream item echoes no id."""
    limit = client.server_info().max_id_bytes
    assert limit == 1024
    fits, long_id = "é" * (limit // 2), "x" * (limit + 1)  # 1024 bytes of UTF-8, then one byte over
    assert stub.Evaluate(with_(attr("id", fits)), timeout=30).id == fits

    def refused(call, field: str) -> None:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert f"{field}: takes {limit + 1} bytes (UTF-8), over this server's max_id_bytes ({limit})" in info.value.details()

    header = pb.ChunkHeader(id=long_id, input_dtype=pb.FLOAT32, input_shape=list(X.shape), options=pb.LossOptions())
    tensors.to_proto(T, header.target)
    refused(lambda: stub.EvaluateChunked(iter([pb.EvaluateChunk(header=header, input_rows=X.tobytes())]), timeout=30), "header.id")
    logits = tensors.to_proto(X)
    refused(lambda: stub.Compare(pb.CompareRequest(id=long_id, reference=logits, candidate=logits), timeout=30), "id")
    compare_header = pb.CompareHeader(id=long_id, reference_dtype=pb.FLOAT32, reference_shape=X.shape, candidate_dtype=pb.FLOAT32, candidate_shape=X.shape)
    rows = pb.CompareChunk(header=compare_header, reference_rows=X.tobytes(), candidate_rows=X.tobytes())
    refused(lambda: stub.CompareChunked(iter([rows]), timeout=30), "header.id")

    items = [with_(attr("id", "first")), with_(attr("id", long_id)), with_(attr("id", "last"))]
    streamed = list(stub.EvaluateStream(iter(items), timeout=30))
    packed = [r for batch in stub.EvaluatePacked(iter([pb.EvaluateBatch(requests=items)]), timeout=30) for r in batch.responses]
    for replies in (streamed, packed):
        assert sorted(r.id for r in replies) == ["", "first", "last"]
        (bad,) = [r for r in replies if r.HasField("error")]
        assert bad.id == "" and bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert f"id: takes {limit + 1} bytes" in bad.error.message
    assert stub.Evaluate(good_request(), timeout=30).id == "good"


def test_the_client_reports_a_long_id_and_evaluate_many_keeps_callers_ids_off_the_wire(client) -> None:
    from lossd_client import LossRequest
    from lossd_client.errors import InvalidArgumentError

    long_id = "x" * 5000
    with pytest.raises(InvalidArgumentError, match=r"id: takes 5000 bytes \(UTF-8\), over this server's max_id_bytes \(1024\)"):
        client.evaluate(LossRequest(X, T, id=long_id))
    # evaluate_many numbers its items on the wire: a caller's id of any length comes back as given
    results = list(client.evaluate_many([LossRequest(X, T, id=long_id), LossRequest(X, T, id="short")]))
    assert [r.id for r in results] == [long_id, "short"]


# ---------------------------------------------------------------------------- client-side arguments
MIRRORS = ("cross_entropy", "nll_loss", "binary_cross_entropy_with_logits", "kl_div")


def _params(fn) -> list[tuple[str, object, object]]:
    """(name, kind, default) of each parameter but ``self`` and the client's own ``timeout_s``."""
    import inspect

    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name not in ("self", "timeout_s")]


@pytest.mark.parametrize("fn", MIRRORS)
def test_client_methods_mirror_torch_signatures(fn: str) -> None:
    """Names, order, kinds and defaults are torch's, on both clients: a positional call means the same."""
    from lossd_client import AsyncLossClient, LossClient

    assert _params(getattr(LossClient, fn)) == _params(getattr(F, fn))
    assert _params(getattr(AsyncLossClient, fn)) == _params(getattr(F, fn))


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, "batchmean"])
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss", "binary_cross_entropy_with_logits"])
def test_invalid_reduction_is_invalid_argument_and_value_error(client, fn: str, reduction) -> None:
    from lossd_client import InvalidArgumentError

    x = torch.from_numpy(X)
    t = torch.from_numpy(P) if fn == "binary_cross_entropy_with_logits" else torch.from_numpy(T)
    with pytest.raises(ValueError):
        getattr(F, fn)(x, t, reduction=reduction)
    with pytest.raises(InvalidArgumentError) as info:
        getattr(client, fn)(x, t, reduction=reduction)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss", "binary_cross_entropy_with_logits"])
def test_legacy_size_average_and_reduce_map_as_torch(client, fn: str, size_average, reduce) -> None:
    x = torch.from_numpy(X)
    t = torch.from_numpy(P) if fn == "binary_cross_entropy_with_logits" else torch.from_numpy(T)
    with pytest.warns(UserWarning) if (size_average, reduce) != (None, None) else _no_warning_check():
        expected = getattr(F, fn)(x, t, size_average=size_average, reduce=reduce, reduction="sum")
    got = getattr(client, fn)(x, t, size_average=size_average, reduce=reduce, reduction="sum")
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)


def _no_warning_check():
    import contextlib

    return contextlib.nullcontext()


def _positional_calls() -> list[tuple[str, tuple]]:
    """Calls that give every argument by position, legacy ``size_average``/``reduce`` included (torch's order)."""
    x, t, p = torch.from_numpy(X), torch.from_numpy(T), torch.from_numpy(P)
    w = torch.tensor([0.2, 1.0, 3.0])
    lp = F.log_softmax(x, 1)
    return [
        ("cross_entropy", (x, t, w, None, 0, None, "sum", 0.25)),
        ("cross_entropy", (x, t, None, 0)),  # size_average=0 ('sum'), not ignore_index=0
        ("cross_entropy", (x, t, None, None, 2, False)),  # reduce=False: 'none'
        ("nll_loss", (lp, t, w, None, 2, None, "none")),
        ("nll_loss", (lp, t, None, 1)),
        ("binary_cross_entropy_with_logits", (x, p, w, None, None, "sum", w.flip(0))),
        ("binary_cross_entropy_with_logits", (x, p, w, False)),
        ("kl_div", (lp, lp.flip(0), None, False, "mean", True)),
    ]


def _torch(fn: str, args: tuple) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():  # torch warns that size_average and reduce are deprecated
        warnings.simplefilter("ignore")
        return getattr(F, fn)(*args)


def test_positional_arguments_match_torch(client) -> None:
    for fn, args in _positional_calls():
        torch.testing.assert_close(getattr(client, fn)(*args), _torch(fn, args), msg=lambda m, fn=fn, args=args: f"{fn}{args[2:]}: {m}")


def test_positional_arguments_match_torch_async(server) -> None:
    import asyncio

    from lossd_client import AsyncLossClient

    async def main() -> list[torch.Tensor]:
        async with AsyncLossClient(server.address, timeout_s=60) as c:
            return [await getattr(c, fn)(*args) for fn, args in _positional_calls()]

    for (fn, args), got in zip(_positional_calls(), asyncio.run(asyncio.wait_for(main(), 60)), strict=True):
        torch.testing.assert_close(got, _torch(fn, args), msg=lambda m, fn=fn, args=args: f"{fn}{args[2:]}: {m}")


def _weights_requiring_grad() -> list[tuple[str, str, tuple, dict]]:
    """(id, function, positional arguments, weight keywords) with weights that require grad."""
    x, t, p = torch.from_numpy(X), torch.from_numpy(T), torch.from_numpy(P)
    w = torch.tensor([0.2, 1.0, 3.0], requires_grad=True)
    x3, t3 = torch.randn(2, 3, 4), torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    return [
        ("ce", "cross_entropy", (x, t), {"weight": w}),
        ("ce_smoothing", "cross_entropy", (x, t), {"weight": w, "label_smoothing": 0.1}),
        ("ce_kdim", "cross_entropy", (x3, t3), {"weight": w}),
        ("ce_one_sample", "cross_entropy", (x[0], t[0]), {"weight": w}),
        ("ce_all_ignored", "cross_entropy", (x, torch.tensor([-100, -100])), {"weight": w}),
        ("ce_probabilities", "cross_entropy", (x, p), {"weight": w}),  # differentiable: torch answers
        ("nll", "nll_loss", (F.log_softmax(x, 1), t), {"weight": w}),
        ("nll_kdim", "nll_loss", (F.log_softmax(x3, 1), t3), {"weight": w}),
        ("nll_empty", "nll_loss", (torch.empty(0, 3), torch.empty(0, dtype=torch.long)), {"weight": w}),
        ("bce_weight", "binary_cross_entropy_with_logits", (x, p), {"weight": w}),
        ("bce_pos_weight", "binary_cross_entropy_with_logits", (x, p), {"pos_weight": w}),
        ("bce_both", "binary_cross_entropy_with_logits", (x, p), {"weight": w, "pos_weight": w}),
        ("bce_target", "binary_cross_entropy_with_logits", (x, p.clone().requires_grad_()), {}),
        ("kl_target", "kl_div", (F.log_softmax(x, 1), p.clone().requires_grad_()), {}),
        ("ce_input", "cross_entropy", (x.clone().requires_grad_(), t), {}),
    ]


def _torch_or_error(fn: str, args: tuple, kwargs: dict) -> torch.Tensor | Exception:
    try:
        return getattr(F, fn)(*args, **kwargs).detach()
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize(("fn", "args", "kwargs"), [c[1:] for c in _weights_requiring_grad()], ids=[c[0] for c in _weights_requiring_grad()])
def test_a_weight_requiring_grad_is_refused_where_torch_refuses_it(client, mode: str, fn: str, args: tuple, kwargs: dict) -> None:
    """In grad mode torch's autograd refuses a class weight that requires grad (nll_loss and
    cross_entropy with class indices) and BCE's weight / pos_weight: InvalidArgumentError naming
    the option, with torch's message. Under no_grad / inference_mode, or with probabilities,
    torch answers, and so does the client (probe 14 F5: it always answered)."""
    from lossd_client import InvalidArgumentError

    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with context():
        want = _torch_or_error(fn, args, kwargs)
        if isinstance(want, Exception):
            name = "pos_weight" if "'pos_weight'" in str(want) else "weight"
            with pytest.raises(InvalidArgumentError) as info:
                getattr(client, fn)(*args, **kwargs)
            assert str(info.value) == f"options.{name}: {want}"
        else:
            torch.testing.assert_close(getattr(client, fn)(*args, **kwargs), want, equal_nan=True)
    # torch 2.13 refuses every weight here but cross_entropy's with probabilities, in grad mode only
    refused = mode == "grad" and bool(kwargs) and (fn == "binary_cross_entropy_with_logits" or args[1].shape != args[0].shape)
    assert isinstance(want, Exception) == refused


def test_the_async_client_takes_the_grad_mode_of_the_call(server) -> None:
    """torch decides at the call: a coroutine made under no_grad and awaited outside it answers,
    one made in grad mode and awaited under no_grad is refused."""
    import asyncio

    from lossd_client import AsyncLossClient, InvalidArgumentError

    x, t, w = torch.from_numpy(X), torch.from_numpy(T), torch.tensor([0.2, 1.0, 3.0], requires_grad=True)

    async def main() -> None:
        async with AsyncLossClient(server.address, timeout_s=60) as c:
            with torch.no_grad():
                answered = c.cross_entropy(x, t, weight=w)
            refused = c.cross_entropy(x, t, weight=w)
            torch.testing.assert_close(await answered, F.cross_entropy(x, t, weight=w.detach()))
            with torch.no_grad(), pytest.raises(InvalidArgumentError, match="^options.weight: The function 'nll_loss_forward'"):
                await refused

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("value", [True, False, 1, 0, None, "False", "", [0], 1.0, np.bool_(True), np.array(True), torch.tensor(True), torch.tensor(1)], ids=repr)
def test_log_target_is_a_bool_as_torch_takes_it(client, value) -> None:
    """torch's kl_div takes a Python bool only ("kl_div(): argument 'log_target' must be bool, not
    int"); the client took any value's truth (log_target="False" was True: probe 14 F6)."""
    from lossd_client import InvalidArgumentError, LossRequest

    x, t = F.log_softmax(torch.from_numpy(X), 1), torch.from_numpy(P)
    try:
        want = F.kl_div(x, t, log_target=value)
    except TypeError as exc:
        torch_type = str(exc).rsplit("not ", 1)[1]
        client_type = "ndarray" if torch_type == "numpy.ndarray" else torch_type  # the client's text for arrays, as before
        message = f"^options.log_target: argument 'log_target' must be bool, not {client_type}$"
        with pytest.raises(InvalidArgumentError, match=message.replace(".", r"\.")):
            client.kl_div(x, t, log_target=value)
        with pytest.raises(InvalidArgumentError, match=message.replace(".", r"\.")):
            client.evaluate(LossRequest(x, t, "kl_div", log_target=value))
        assert not isinstance(value, bool)
        return
    assert isinstance(value, bool)
    torch.testing.assert_close(client.kl_div(x, t, log_target=value), want)
