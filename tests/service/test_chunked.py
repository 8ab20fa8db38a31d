"""Requests larger than one message: a server with a 64 KiB --max-message-bytes, a client that
switches to EvaluateChunked by itself, and results equal to the unchunked run on a server
without the small limit (the session ``client``)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import AsyncLossClient, LossClient, LossRequest, core
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from lossd_client.errors import InvalidArgumentError
from serverproc import start_server

LIMIT = 65536
EXTRAS = ("target_logprob", "entropy", "target_rank", "argmax_correct")


@pytest.fixture(scope="module")
def small_server():
    proc = start_server("--max-message-bytes", str(LIMIT), "--max-chunks-in-flight", "2")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def small(small_server):
    with LossClient(small_server.address, timeout_s=120) as c:
        yield c


def assert_same(chunked, whole) -> None:
    """Equal results: tensors bit for bit (except float64 totals summed in another order)."""
    assert chunked.loss.dtype == whole.loss.dtype and chunked.loss.shape == whole.loss.shape
    if chunked.loss.dim() == 0:
        torch.testing.assert_close(chunked.loss, whole.loss, rtol=1e-6, atol=0, equal_nan=True)
    else:
        assert torch.equal(chunked.loss, whole.loss)
    assert math.isclose(chunked.loss_sum, whole.loss_sum, rel_tol=1e-12, abs_tol=1e-9)
    assert math.isclose(chunked.weight_sum, whole.weight_sum, rel_tol=1e-12, abs_tol=1e-9)
    assert chunked.counted == whole.counted
    assert set(chunked.extras) == set(whole.extras)
    for name, value in whole.extras.items():
        assert torch.equal(chunked.extras[name], value), name
    assert (chunked.sequences is None) == (whole.sequences is None)
    if whole.sequences is not None:
        for name in ("nll_sum", "tokens", "mean_nll", "perplexity", "is_greedy"):
            np.testing.assert_allclose(getattr(chunked.sequences, name), getattr(whole.sequences, name), rtol=1e-12, err_msg=name)


def unary_is_rejected(address: str, req: LossRequest) -> grpc.RpcError:
    msg, _ = core.build(req)
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.LossServiceStub(channel).Evaluate(msg, timeout=60)
    return info.value


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_request_several_times_the_limit(client, small, small_server, reduction, dtype):
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(4, 96, 200, generator=gen) * 3).to(dtype)  # 300 KB in fp32, 150 KB in bf16
    tokens = torch.randint(0, 200, (4, 96), generator=gen)
    tokens[1, 50:] = -100
    req = LossRequest(logits, tokens, reduction=reduction, class_axis=-1, shift_targets=True, extras=EXTRAS, sequence_stats=True)
    assert core.request_nbytes(req) > 2 * LIMIT
    assert_same(small.evaluate(req), client.evaluate(req))
    err = unary_is_rejected(small_server.address, req)  # so the client above cannot have sent it whole
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_layout_with_class_weights(client, small, reduction):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(300, 10, 5, generator=gen, dtype=torch.float64)  # (N, C, d): one row is 400 bytes
    t = torch.randint(0, 10, (300, 5), generator=gen)
    t[::7] = 3
    w = torch.rand(10, generator=gen, dtype=torch.float64)
    req = LossRequest(x, t, weight=w, ignore_index=3, reduction=reduction, label_smoothing=0.1)
    assert_same(small.evaluate(req), client.evaluate(req))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_are_streamed(client, small, reduction):
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(3000, 12, generator=gen)
    p = torch.rand(3000, 12, generator=gen).softmax(1)
    req = LossRequest(x, p, reduction=reduction, label_smoothing=0.05)
    assert core.request_nbytes(req) > 4 * LIMIT
    assert_same(small.evaluate(req), client.evaluate(req))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_targets_are_streamed(client, small, reduction):
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(3000, 3, 4, generator=gen)
    y = torch.rand(3000, 3, 4, generator=gen)
    req = LossRequest(
        x, y, loss="binary_cross_entropy_with_logits", reduction=reduction,
        weight=torch.rand(3, 4, generator=gen), pos_weight=torch.rand(4, generator=gen) + 0.5,
    )
    assert core.request_nbytes(req) > 4 * LIMIT
    assert_same(small.evaluate(req), client.evaluate(req))


def test_numpy_and_async_clients(client, small_server):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((600, 64)).astype(np.float32)
    t = rng.integers(0, 64, 600)
    whole = client.evaluate(LossRequest(x, t, reduction="none", extras=("entropy",)))

    async def chunked():
        async with AsyncLossClient(small_server.address, timeout_s=60) as c:
            return await c.evaluate(LossRequest(x, t, reduction="none", extras=("entropy",)))

    got = asyncio.run(chunked())
    assert isinstance(got.loss, np.ndarray)
    np.testing.assert_array_equal(got.loss, whole.loss)
    np.testing.assert_array_equal(got.extras["entropy"], whole.extras["entropy"])


def test_unary_over_the_limit_names_the_limit_and_the_streaming_rpc(small_server):
    req = LossRequest(np.zeros((100, 200), np.float32), np.zeros(100, np.int64))
    err = unary_is_rejected(small_server.address, req)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(LIMIT) in err.details() and "EvaluateChunked" in err.details()


def test_a_row_larger_than_the_limit_is_refused_clearly(small):
    x = np.zeros((3, LIMIT // 4 + 1), np.float32)
    with pytest.raises(InvalidArgumentError, match="one row"):
        small.evaluate(LossRequest(x, np.zeros(3, np.int64)))


def test_validation_errors_still_name_the_field(small):
    x = torch.randn(4, 100, 200)
    t = torch.randint(0, 200, (4, 100))
    t[2, 7] = 200
    with pytest.raises(InvalidArgumentError, match="target"):
        small.evaluate(LossRequest(x, t, class_axis=-1))
    with pytest.raises(InvalidArgumentError, match="class-index"):
        small.evaluate(LossRequest(x, torch.rand(4, 100, 200), class_axis=-1, shift_targets=True))


def test_chunk_payloads_cut_whole_rows():
    x = np.arange(10 * 7, dtype=np.float32).reshape(10, 7)
    chunks = list(core.chunk_payloads(LossRequest(x, np.zeros(10, np.int64)), chunk_bytes=3 * 28))
    from lossd_client._proto.lossd.v1 import loss_pb2 as pb

    msgs = [pb.EvaluateChunk.FromString(c) for c in chunks]
    assert msgs[0].HasField("header") and list(msgs[0].header.input_shape) == [10, 7]
    rows = [np.frombuffer(m.input_rows, np.float32).reshape(-1, 7) for m in msgs[1:]]
    assert [len(r) for r in rows] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(rows), x)


@pytest.mark.parametrize(
    "loss, shape",
    [("cross_entropy", (3, 10, 1000)), ("kl_div", (3, 6000)), ("binary_cross_entropy_with_logits", (3, 6000))],
)
def test_rows_bigger_than_the_clients_chunk_bytes_travel_one_per_message(client, small_server, loss, shape):
    """chunk_bytes is the client's send granularity, not a limit: a row over it (40, 48 and 48 KB
    here, with its target) but within the server's max_message_bytes travels alone, and the result
    equals the unchunked one; only a row over max_message_bytes is refused, naming that limit."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(shape, generator=gen)
    if loss == "cross_entropy":
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    elif loss == "kl_div":
        x, t = x.log_softmax(-1), torch.rand(shape, generator=gen).softmax(-1)
    else:
        t = torch.rand(shape, generator=gen)
    req = LossRequest(x, t, loss=loss, reduction="none")
    with LossClient(small_server.address, timeout_s=120, chunk_bytes=4096) as c:
        assert len(list(core.chunk_payloads(req, chunk_bytes=4096, max_message_bytes=LIMIT))) == 1 + shape[0]
        assert_same(c.evaluate(req), client.evaluate(req))
    big = torch.randn(2, 20_000)
    with LossClient(small_server.address, timeout_s=120) as c, pytest.raises(InvalidArgumentError, match="max_message_bytes"):
        c.evaluate(LossRequest(big, torch.zeros(2, dtype=torch.int64)))  # one row: 80 KB, over the server's 64 KiB


@pytest.mark.parametrize("class_axis", [3, -4])
def test_an_out_of_range_class_axis_is_sent_and_the_server_names_it(small, class_axis):
    """The client lays the rows out without failing; the server answers INVALID_ARGUMENT, as for a unary request."""
    x = torch.randn(40, 30, 20)  # 96 KB: chunked
    with pytest.raises(InvalidArgumentError, match=rf"options.class_axis: axis {class_axis} is out of range"):
        small.evaluate(LossRequest(x, torch.zeros(40, 20, dtype=torch.int64), class_axis=class_axis))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_header_too_big_for_one_message_is_cut_by_rows(client, small, dtype, reduction):
    """Weights shaped like the input's rows, and class-index targets, travel in the chunk header:
    when it would not fit in one message, the request is cut by rows into parts whose headers fit
    (here 80 KB of BCE weights and 160 KB of class indices against a 64 KiB server limit)."""
    gen = torch.Generator().manual_seed(16)
    x, y = torch.randn(100, 200, generator=gen).to(dtype), torch.rand(100, 200, generator=gen).to(dtype)
    weight, pos_weight = torch.rand(100, 200, generator=gen), torch.rand(100, 1, 200, generator=gen).squeeze(1)
    bce = LossRequest(x, y, loss="binary_cross_entropy_with_logits", weight=weight, pos_weight=pos_weight, reduction=reduction)
    assert core.header_parts(bce, LIMIT) > 1
    got = small.evaluate(bce)
    want = F.binary_cross_entropy_with_logits(x, y, weight=weight, pos_weight=pos_weight, reduction=reduction)
    assert got.loss.dtype == want.dtype and got.loss.shape == want.shape
    # 16-bit inputs are computed with float32 accumulation (README, "What the server computes")
    exact = F.binary_cross_entropy_with_logits(x.float(), y.float(), weight=weight, pos_weight=pos_weight, reduction=reduction)
    torch.testing.assert_close(got.loss, exact.to(want.dtype))
    assert_same(got, client.evaluate(bce))  # the same answer as the request sent whole
    for target in (torch.randint(0, 2, (20_000,), generator=gen), torch.randint(0, 2, (80_000,), generator=gen).to(torch.uint8)):
        ce = LossRequest(
            torch.randn(len(target), 2, generator=gen).to(dtype), target, reduction=reduction, weight=torch.tensor([0.3, 2.0]).to(dtype)
        )
        assert core.header_parts(ce, LIMIT) > 1
        assert_same(small.evaluate(ce), client.evaluate(ce))


def test_a_header_that_no_cut_makes_fit_names_what_makes_it_big(small):
    """Weights that broadcast along the rows go whole with every part, one row's weights may alone
    be too big, and a label-smoothed mean over class indices is never cut: the error names the field."""
    gen = torch.Generator().manual_seed(17)
    x, y = torch.randn(2, 20, 2_000, generator=gen), torch.rand(2, 20, 2_000, generator=gen)  # 640 KB with its target
    for weight, why in ((torch.rand(1, 20, 2_000, generator=gen), "broadcast"), (torch.rand(2, 20, 2_000, generator=gen), "one row")):
        bce = LossRequest(x, y, loss="binary_cross_entropy_with_logits", weight=weight)
        assert core.header_parts(bce, LIMIT) == 1, why
        with pytest.raises(InvalidArgumentError, match=r"^options.weight: the chunk header .* even with the request cut by rows"):
            small.evaluate(bce)
    ce = LossRequest(torch.randn(20_000, 2, generator=gen), torch.zeros(20_000, dtype=torch.int64), label_smoothing=0.1)
    with pytest.raises(InvalidArgumentError, match=r"^target: the chunk header"):
        small.evaluate(ce)
    summed = small.evaluate(replace(ce, reduction="sum"))  # a sum of label-smoothed losses is cut
    torch.testing.assert_close(summed.loss, F.cross_entropy(ce.input, ce.target, reduction="sum", label_smoothing=0.1))


def test_a_one_dimensional_bce_request_is_cut_into_rows(client, small):
    """BCE has no class axis: an (N,) input is N rows (as the server counts them), so it streams in several chunks."""
    gen = torch.Generator().manual_seed(15)
    x, y = torch.randn(50_000, generator=gen), torch.rand(50_000, generator=gen)  # 400 KB with its target
    req = LossRequest(x, y, loss="binary_cross_entropy_with_logits", reduction="none")
    assert len(list(core.chunk_payloads(req, max_message_bytes=LIMIT))) > 4
    assert_same(small.evaluate(req), client.evaluate(req))


@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"weight": torch.linspace(0.5, 2.0, 21)}])
def test_kdim_per_element_losses_are_torchs_own_whole_and_chunked(client, small, options, probabilities):
    """(N, C, H, W) segmentation logits: reduction='none' gives torch's own kernel's losses bit for
    bit, sent whole and in row chunks (computed as (rows, C) they were an ulp off in about a fifth
    of the elements)."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(6, 21, 16, 16, generator=gen) * 4  # 129 KB: chunked on the small server
    if probabilities:
        y = torch.rand(6, 21, 16, 16, generator=gen).softmax(1)
    else:
        y = torch.randint(0, 21, (6, 16, 16), generator=gen)
        y[0, 0, :3] = -100
    want = F.cross_entropy(x, y, reduction="none", **options)
    for c in (client, small):
        got = c.cross_entropy(x, y, reduction="none", **options)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_the_async_client_raises_the_servers_refusal_of_a_chunked_header_as_the_blocking_one_does(small_server):
    """The server refuses a chunked call at its header while the client still writes rows; when
    grpc.aio's next write failed before it read that answer, the call ended INTERNAL "Internal error
    from Core" (1 of 6 calls here, 5 of 5 on a probe's server) where the blocking client raised the
    server's InvalidArgumentError. Repeated: the race does not lose every time. The refusal names
    the caller's fields (``target``, not the header's ``header.target``), as for a request sent whole."""
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((2000, 50), dtype=np.float32), rng.integers(0, 50, 2000)
    bad_target = t.copy()
    bad_target[5] = 77
    cases = [
        (LossRequest(x, t, id="x" * 2000), r"^id: takes 2000 bytes"),
        (LossRequest(x, bad_target), r"^target: Target 77 is out of bounds"),
        (LossRequest(x, t, weight=np.ones(7, np.float32)), r"^options\.weight: "),
    ]

    async def main():
        async with AsyncLossClient(small_server.address, timeout_s=60) as client:
            for _ in range(30):
                for request, refusal in cases:
                    with pytest.raises(InvalidArgumentError, match=refusal):
                        await client.evaluate(request)
            assert (await client.evaluate(LossRequest(x, t))).counted == 2000  # the client still works

    asyncio.run(main())


def test_evaluate_many_names_the_callers_field_for_an_item_it_sends_chunked(client, small, small_server):
    """An item over the server's message limit goes alone through EvaluateChunked (blocking and
    async evaluate_many): its error reads as the same item's sent whole (``target: ...``, not the
    header's ``header.target: ...``), as a small item's stream error does."""
    rng = np.random.default_rng(3)
    x, t = rng.standard_normal((2000, 50), dtype=np.float32), rng.integers(0, 50, 2000)  # 400 KB
    t[5] = 77
    big, small_item = LossRequest(x, t), LossRequest(x[:4], t[2:6])
    assert core.request_nbytes(big) > LIMIT > core.request_nbytes(small_item)
    with pytest.raises(InvalidArgumentError) as info:
        client.evaluate(big)  # whole, on the server without the small limit
    unary = info.value.details
    assert unary.startswith("target: Target 77 is out of bounds"), unary

    async def many():
        async with AsyncLossClient(small_server.address, timeout_s=120) as c:
            return [r async for r in c.evaluate_many([big, small_item], return_exceptions=True)]

    for results in (list(small.evaluate_many([big, small_item], return_exceptions=True)), asyncio.run(many())):
        assert [type(r) for r in results] == [InvalidArgumentError, InvalidArgumentError], results
        assert results[0].details == unary, results[0].details
        assert results[1].details.startswith("target: Target 77 is out of bounds"), results[1].details


@pytest.mark.parametrize("timeout_s", [0.45, 0.3])
def test_a_chunked_call_missing_rows_with_a_short_deadline_is_told_what_it_lacks(small_server, timeout_s):
    """A chunked call that ends before its header's rows did is answered INVALID_ARGUMENT naming
    them, also with a deadline under half a second: the server's wait for a cancel that might
    have looked like that end of stream ran to such a deadline (DEADLINE_EXCEEDED at 0.3 / 0.45 s)."""
    msg, _ = core.build(LossRequest(np.zeros((4, 3), np.float32), np.zeros(4, np.int64)))
    header = next(iter(core.chunk_messages(msg, chunk_bytes=12)))  # at most one 3-class float32 row a message
    with grpc.insecure_channel(small_server.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)  # the connection's set-up is not the call's time
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.LossServiceStub(channel).EvaluateChunked(iter([header]), timeout=timeout_s)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith("input_rows: received ") and " of 4 rows" in info.value.details(), info.value.details()
