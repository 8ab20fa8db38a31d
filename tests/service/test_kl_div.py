"""kl_div through a real server: ``client.kl_div`` against ``torch.nn.functional.kl_div`` on the
unary, stream, packed and chunked paths (checks: tests/kl_cases.py), totals that combine exactly,
and bad input answered INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import asyncio
import math
import time
import warnings
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from kl_cases import cases, check_values, torch_kl_div
from lossd_client import AsyncLossClient, LossClient, LossRequest, combine, core
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from lossd_client.errors import InvalidArgumentError, ResourceExhaustedError
from serverproc import start_server

LIMIT = 65536
ANSWER_LIMIT = 300_000


@pytest.fixture(scope="module")
def small_server():
    """Small messages (requests stream in chunks) and a small answer limit."""
    with start_server("--max-message-bytes", str(LIMIT), "--max-send-message-bytes", str(ANSWER_LIMIT), "--max-chunks-in-flight", "2") as proc:
        yield proc


@pytest.fixture(scope="module")
def small(small_server):
    with LossClient(small_server.address, timeout_s=120) as c:
        yield c


def kl_data(shape: tuple[int, ...], target_shape: tuple[int, ...] | None = None, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).log_softmax(-1).to(dtype)
    t = torch.rand(target_shape if target_shape is not None else shape, generator=gen).to(dtype)
    return x, t


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cases())
def test_matches_torch_through_the_server(client, case: tuple[torch.Tensor, torch.Tensor, dict[str, Any]]) -> None:
    x, t, options = case
    try:
        torch_kl_div(x, t, **options)
    except Exception:  # noqa: BLE001 - torch rejects it: so does lossd (the client or the server), naming the problem
        with pytest.raises(InvalidArgumentError):
            client.kl_div(x, t, **options)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = client.kl_div(x, t, **options)
    check_values(got, x, t, options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
@pytest.mark.parametrize(
    ("shape", "target_shape", "dtype"),
    [
        ((3000, 12), None, torch.float32),  # the target streams with the rows
        ((1000, 3, 10), (10,), torch.float64),  # the target, broadcast along the rows, travels whole in the header
        ((4000, 9), None, torch.bfloat16),
        ((60_000,), None, torch.float16),  # a 1-d input: one element per row
    ],
)
def test_chunked_equals_unary(client, small, shape, target_shape, dtype, reduction):
    x, t = kl_data(shape, target_shape, dtype)
    req = LossRequest(x, t, "kl_div", reduction=reduction, log_target=False)
    assert core.request_nbytes(req) > 2 * LIMIT
    whole, chunked = client.evaluate(req), small.evaluate(req)
    assert (chunked.counted, chunked.weight_sum) == (whole.counted, whole.weight_sum)
    if reduction == "none":
        assert torch.equal(chunked.loss, whole.loss) and chunked.loss.dtype == dtype
    else:
        torch.testing.assert_close(chunked.loss, whole.loss, rtol=1e-6, atol=0)
    assert math.isclose(chunked.loss_sum, whole.loss_sum, rel_tol=1e-12)
    with grpc.insecure_channel(small.target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.LossServiceStub(channel).Evaluate(core.build(req)[0], timeout=60)  # so `small` cannot have sent it whole
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_log_target_and_legacy_keywords(client, small):
    x, t = kl_data((3000, 16), seed=1)
    log_t = t.clamp_min(1e-6).log()
    for c in (client, small):
        torch.testing.assert_close(c.kl_div(x, log_t, reduction="sum", log_target=True), F.kl_div(x, log_t, reduction="sum", log_target=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for size_average, reduce in [(False, None), (None, False), (True, True)]:
                want = F.kl_div(x, t, size_average, reduce, reduction="batchmean")
                got = c.kl_div(x, t, size_average, reduce, reduction="batchmean")
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_stream_and_packed_items_combine_into_the_whole_batchmean(client):
    x, t = kl_data((40, 6, 20), seed=2)
    pieces = [LossRequest(x[i : i + 5], t[i : i + 5], "kl_div", reduction="batchmean") for i in range(0, 40, 5)]
    whole = float(F.kl_div(x.double(), t.double(), reduction="batchmean"))
    for pack in (1, 4):
        results = list(client.evaluate_many(pieces, window=8, pack=pack))
        assert [r.weight_sum for r in results] == [5.0] * 8
        for piece, r in zip(pieces, results, strict=True):
            torch.testing.assert_close(r.loss, F.kl_div(piece.input, piece.target, reduction="batchmean"), rtol=1e-6, atol=0)
        assert combine(results) == pytest.approx(whole, rel=1e-6)


def test_async_twin_with_numpy(server):
    rng = np.random.default_rng(3)
    x = np.log(rng.dirichlet(np.ones(7), size=11)).astype(np.float32)
    t = rng.dirichlet(np.ones(7), size=11).astype(np.float32)

    async def run():
        async with AsyncLossClient(server.address, timeout_s=60) as c:
            return await c.kl_div(x, t, reduction="none"), await c.kl_div(x, t, reduction="batchmean")

    none, batchmean = asyncio.run(run())
    assert isinstance(none, np.ndarray) and none.dtype == np.float32 and none.shape == (11, 7)
    np.testing.assert_array_equal(none, F.kl_div(torch.from_numpy(x), torch.from_numpy(t), reduction="none").numpy())
    assert batchmean.shape == () and float(batchmean) == pytest.approx(float(F.kl_div(torch.from_numpy(x), torch.from_numpy(t), reduction="batchmean")), rel=1e-6)


def _status(address: str, request: pb.EvaluateRequest) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=30)
    return info.value


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"target": np.zeros((4, 3), np.float32)}, "target"),  # does not broadcast with (4, 5)
        ({"target": np.zeros((4, 5), np.int64)}, "target"),  # torch rejects the dtype
        ({"input": np.zeros((4, 5), np.int64)}, "input"),
        ({"weight": np.ones(5, np.float32)}, "options.weight"),
        ({"class_axis": -1}, "options.class_axis"),
        ({"label_smoothing": 0.2}, "options.label_smoothing"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(server, fields, field):
    base = {"input": np.zeros((4, 5), np.float32), "target": np.zeros((4, 5), np.float32), "loss": "kl_div"}
    msg, _ = core.build(LossRequest(**{**base, **fields}))
    err = _status(server.address, msg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(field + ":"), err.details()


def test_wire_only_mistakes_are_invalid_argument(server):
    msg, _ = core.build(LossRequest(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), "kl_div"))
    msg.options.ignore_index = 1
    assert _status(server.address, msg).details().startswith("options.ignore_index:")
    msg, _ = core.build(LossRequest(np.zeros((2, 3), np.float32), np.array([0, 1])))
    msg.options.log_target = True
    assert _status(server.address, msg).details().startswith("options.log_target:")


def test_an_answer_over_the_send_limit_is_refused_before_compute(small):
    x, t = kl_data((100_000,), seed=4)  # 'none': 400 KB of float32 losses
    with pytest.raises(ResourceExhaustedError, match="max_send_message_bytes"):
        small.kl_div(x, t, reduction="none")
    assert float(small.kl_div(x, t, reduction="sum")) == pytest.approx(float(F.kl_div(x.double(), t.double(), reduction="sum")), rel=1e-6)


def test_an_input_broadcast_along_the_rows_travels_whole(client, small):
    x, t = kl_data((1, 50), (25_000, 50), seed=5)  # 5 MB: the client streams requests this large, but the input has no rows
    torch.testing.assert_close(client.kl_div(x, t, reduction="sum"), F.kl_div(x, t, reduction="sum"), rtol=1e-6, atol=0)
    with pytest.raises(InvalidArgumentError, match="does not fit in one message"):
        small.kl_div(x, t, reduction="sum")


# ---------------------------------------------------------------------------- broadcast work
BROADCAST_LIMIT = 4096


@pytest.fixture(scope="module")
def bounded():
    """A small broadcast limit, and small messages (requests over 768 bytes stream in chunks)."""
    with start_server("--max-broadcast-elements", str(BROADCAST_LIMIT), "--max-message-bytes", "1024") as proc:
        with LossClient(proc.address, timeout_s=120) as c:
            yield c


def test_a_broadcast_past_max_broadcast_elements_is_refused_before_compute(client):
    """[2**20, 1] against [1, 2**20] is 1.1e12 elements from 8 MiB: it used to hold the engine for
    hours; it is refused at once, naming the limit and the count."""
    n = 2**20
    x, t = torch.zeros(n, 1), torch.full((1, n), 0.5)
    t0 = time.monotonic()
    with pytest.raises(ResourceExhaustedError) as info:
        client.kl_div(x, t, reduction="batchmean")
    assert time.monotonic() - t0 < 20
    assert f"makes {n * n} elements, over this server's max_broadcast_elements ({client.server_info().max_broadcast_elements})" in str(info.value)
    assert client.server_info().max_broadcast_elements == 2**27
    x, t = kl_data((64, 1), (1, 64), seed=7)  # a broadcast within the limit still works
    torch.testing.assert_close(client.kl_div(x, t, reduction="sum"), F.kl_div(x, t, reduction="sum"), rtol=1e-6, atol=0)


def test_max_broadcast_elements_counts_only_what_the_broadcast_adds(bounded):
    side = int(math.isqrt(BROADCAST_LIMIT))
    x, t = kl_data((side, 1), (1, side), seed=8)  # exactly the limit
    torch.testing.assert_close(bounded.kl_div(x, t, reduction="sum"), F.kl_div(x, t, reduction="sum"), rtol=1e-6, atol=0)
    x, t = kl_data((side + 1, 1), (1, side + 1), seed=8)
    with pytest.raises(ResourceExhaustedError, match=rf"makes {(side + 1) ** 2} elements, over this server's max_broadcast_elements \({BROADCAST_LIMIT}\)"):
        bounded.kl_div(x, t, reduction="sum")
    x, t = kl_data((200, 1), (1, 30), seed=9)  # 920 bytes: EvaluateChunked, the target whole in the header
    with pytest.raises(ResourceExhaustedError, match="max_broadcast_elements"):
        bounded.kl_div(x, t, reduction="sum")
    for shapes in [((300, 20), (1, 20)), ((300, 20), (300, 20)), ((300, 20), (20,))]:  # no more elements than an operand
        x, t = kl_data(*shapes, seed=10)
        torch.testing.assert_close(bounded.kl_div(x, t, reduction="sum"), F.kl_div(x, t, reduction="sum"), rtol=1e-5, atol=0)
