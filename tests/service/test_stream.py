"""EvaluateStream through evaluate_many (sync and async): order, per-item errors, window."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
import weakref

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossd_client import AsyncLossClient, InvalidArgumentError, LossClient, LossdError, LossRequest, core, tensors
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc
from lossd_client.layout import MAX_PACKED_ITEMS
from serverproc import HOG_FLAGS, EngineHog, start_server


def cases(n: int, seed: int = 0, bad: frozenset[int] = frozenset()):
    """Requests of varied sizes (so answers can come back out of order) and torch's answers."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rows = 1 + (i * 37) % 50
        x = rng.standard_normal((rows, 6)).astype(np.float32)
        t = rng.integers(0, 6, rows)
        if i in bad:
            t[0] = 6  # out of bounds: INVALID_ARGUMENT for this item only
        reduction = ("mean", "sum", "none")[i % 3]
        want = None if i in bad else F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), reduction=reduction)
        out.append((LossRequest(x, t, reduction=reduction, loss="nll_loss" if i % 7 == 0 else "cross_entropy"), want))
        if i % 7 == 0 and want is not None:
            out[-1] = (out[-1][0], F.nll_loss(torch.from_numpy(x), torch.from_numpy(t), reduction=reduction))
    return out


def check(results, expected) -> None:
    assert len(results) == len(expected)
    for i, (got, (_, want)) in enumerate(zip(results, expected, strict=True)):
        if want is None:
            assert isinstance(got, InvalidArgumentError) and "target" in str(got), i
        else:
            torch.testing.assert_close(torch.as_tensor(got.loss), want, msg=lambda m, i=i: f"item {i}: {m}")


@pytest.fixture(scope="module")
def stream_server():
    server = start_server("--max-wait-ms", "2")
    yield server
    server.stop()


@pytest.mark.parametrize("pack", [None, 1, 5, 32])
def test_sync_results_in_input_order(stream_server, pack):
    """pack=1 is EvaluateStream (one request per message); otherwise EvaluatePacked."""
    expected = cases(300)
    with LossClient(stream_server.address, timeout_s=120) as client:
        results = list(client.evaluate_many((req for req, _ in expected), window=32, pack=pack))
    check(results, expected)


@pytest.mark.parametrize("pack", [1, 7])
def test_async_packing_matches_torch_with_errors(stream_server, pack):
    expected = cases(90, seed=5, bad=frozenset({3, 44}))

    async def main():
        async with AsyncLossClient(stream_server.address, timeout_s=120) as client:
            return [r async for r in client.evaluate_many([r for r, _ in expected], window=16, pack=pack, return_exceptions=True)]

    check(asyncio.run(asyncio.wait_for(main(), 120)), expected)


def test_undecodable_packed_message_is_invalid_argument(stream_server):
    with grpc.insecure_channel(stream_server.address) as channel:
        call = channel.stream_stream(
            "/lossd.v1.LossService/EvaluatePacked", request_serializer=None, response_deserializer=pb.EvaluateBatchResults.FromString
        )
        answers = list(call(iter([b"\xff\xff\xff"]), timeout=30))
    assert len(answers) == 1 and len(answers[0].responses) == 1
    error = answers[0].responses[0].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "request" in error.message


def test_async_results_in_input_order_from_an_async_iterable(stream_server):
    expected = cases(300, seed=1)

    async def source():
        for req, _ in expected:
            yield req

    async def main():
        async with AsyncLossClient(stream_server.address, timeout_s=120) as client:
            return [r async for r in client.evaluate_many(source(), window=16)]

    check(asyncio.run(asyncio.wait_for(main(), 120)), expected)


def test_per_item_errors_fail_alone_with_return_exceptions(stream_server):
    expected = cases(60, seed=2, bad=frozenset({0, 17, 59}))
    with LossClient(stream_server.address, timeout_s=120) as client:
        check(list(client.evaluate_many([r for r, _ in expected], return_exceptions=True)), expected)

    async def main():
        async with AsyncLossClient(stream_server.address, timeout_s=120) as client:
            return [r async for r in client.evaluate_many([r for r, _ in expected], return_exceptions=True)]

    check(asyncio.run(asyncio.wait_for(main(), 120)), expected)


def test_without_return_exceptions_the_first_error_raises_in_order(stream_server):
    expected = cases(20, seed=3, bad=frozenset({5}))
    got = []
    with LossClient(stream_server.address, timeout_s=120) as client:
        with pytest.raises(InvalidArgumentError, match="target"):
            for r in client.evaluate_many([r for r, _ in expected]):
                got.append(r)
    check(got, expected[:5])


def test_a_request_the_client_cannot_build_raises_instead_of_hanging(stream_server):
    reqs = [LossRequest(np.zeros((2, 3), np.float32), np.array([0, 1])), LossRequest(np.array(["a"]), np.array([0]))]
    with LossClient(stream_server.address, timeout_s=60) as client:
        with pytest.raises(InvalidArgumentError, match="unsupported numpy dtype"):
            list(client.evaluate_many(reqs))

    async def main():
        async with AsyncLossClient(stream_server.address, timeout_s=60) as client:
            return [r async for r in client.evaluate_many(reqs)]

    with pytest.raises(InvalidArgumentError, match="unsupported numpy dtype"):
        asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("pack", [1, None])
def test_items_the_client_rejects_fail_alone_with_return_exceptions(stream_server, pack):
    """An item the client itself rejects (an unknown reduction, a dtype no server takes) is
    answered in its place like one the server rejects, first, in a row or last, and the rest are
    evaluated; without return_exceptions it still raises after the results before it."""
    expected = cases(40, seed=4, bad=frozenset({9}))
    items = [r for r, _ in expected]
    rejected = {0: "reduction", 1: "reduction", 20: "unsupported numpy dtype", 39: "reduction"}
    for i, what in rejected.items():
        items[i] = LossRequest(np.zeros((2, 3), np.float32), np.array([0, 1]), reduction="bogus")
        if what != "reduction":
            items[i] = LossRequest(np.array(["a"]), np.array([0]))

    def check_all(results) -> None:
        assert len(results) == len(items)
        for i, what in rejected.items():
            assert isinstance(results[i], InvalidArgumentError) and what in str(results[i]), (i, results[i])
        keep = [i for i in range(len(items)) if i not in rejected]
        check([results[i] for i in keep], [expected[i] for i in keep])

    with LossClient(stream_server.address, timeout_s=120) as client:
        check_all(list(client.evaluate_many(items, window=8, pack=pack, return_exceptions=True)))
        with pytest.raises(InvalidArgumentError, match="reduction"):
            list(client.evaluate_many(items, pack=pack))

    async def main():
        async with AsyncLossClient(stream_server.address, timeout_s=120) as client:
            return [r async for r in client.evaluate_many(items, window=8, pack=pack, return_exceptions=True)]

    check_all(asyncio.run(asyncio.wait_for(main(), 120)))


def _unsendable() -> dict[str, tuple[LossRequest, str]]:
    """Requests whose values the client cannot put on the wire (torch rejects each of them too;
    ``class_axis`` is lossd's own), and the field its InvalidArgumentError names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR is 'beta'
        return _unsendable_requests()


def _unsendable_requests() -> dict[str, tuple[LossRequest, str]]:
    g = torch.Generator().manual_seed(9)
    x, t, p = torch.randn(4, 5, generator=g), torch.tensor([0, 1, 2, 3]), torch.rand(4, 5, generator=g)
    big = torch.randn(64, 1000, generator=g)  # past SMALL_REQUEST_BYTES: the routing looks at it first
    w = torch.rand(5, generator=g)
    bce = "binary_cross_entropy_with_logits"
    return {
        "ignore_index=2**63": (LossRequest(x, t, ignore_index=2**63), "options.ignore_index: 9223372036854775808 is out of int64 range"),
        "ignore_index=-2**63-1": (LossRequest(x, t, ignore_index=-(2**63) - 1), "options.ignore_index: .* out of int64 range"),
        "label_smoothing=10**400": (LossRequest(x, t, label_smoothing=10**400), "options.label_smoothing: .* too large"),
        "class_axis=2**31": (LossRequest(x, t, class_axis=2**31), "options.class_axis: 2147483648 is out of int32 range"),
        "size_average=[True, False]": (LossRequest(x, t, size_average=torch.tensor([True, False])), "options.size_average: argument"),
        "ragged target list": (LossRequest(x, [[0, 1], [2]]), "target: cannot be read as an array"),
        "sparse input": (LossRequest(x.to_sparse(), t), "input: sparse tensors are not supported"),
        "large sparse input": (LossRequest(big.to_sparse(), torch.zeros(64, dtype=torch.long)), "input: sparse tensors are not supported"),
        "csr input": (LossRequest(x.to_sparse_csr(), t), "input: sparse tensors are not supported"),
        "sparse target": (LossRequest(x, t.to_sparse()), "target: sparse tensors are not supported"),
        "sparse bce target": (LossRequest(x, p.to_sparse(), bce), "target: sparse tensors are not supported"),
        "mkldnn input": (LossRequest(x.to_mkldnn(), t), "input: mkldnn tensors are not supported"),
        "sparse weight": (LossRequest(x, t, weight=w.to_sparse()), "options.weight: sparse tensors are not supported"),
        "sparse pos_weight": (LossRequest(x, p, bce, pos_weight=w.to_sparse()), "options.pos_weight: sparse tensors are not supported"),
        "csr bce weight": (LossRequest(x, p, bce, weight=p.to_sparse_csr()), "options.weight: sparse tensors are not supported"),
    }


def _torch_of(req: LossRequest) -> torch.Tensor:
    kwargs = {"weight": req.weight, "size_average": req.size_average}
    if req.loss == "cross_entropy":
        kwargs.update(ignore_index=req.ignore_index, label_smoothing=req.label_smoothing)
    else:
        kwargs.update(pos_weight=req.pos_weight)
    return getattr(F, req.loss)(req.input, req.target, **kwargs)


@pytest.mark.parametrize("name", list(_unsendable()))
def test_values_the_client_cannot_send_are_invalid_arguments_answered_in_place(stream_server, name):
    """An option out of its wire field's range or a tensor with no dense data (sparse, CSR,
    mkldnn) as input, target, weight or pos_weight: torch rejects it, and the client rejects it
    before sending, as InvalidArgumentError naming the field (not protobuf's ValueError or
    torch's RuntimeError); evaluate_many(return_exceptions=True) answers it in its place."""
    bad, what = _unsendable()[name]
    if bad.class_axis is None:
        with warnings.catch_warnings(), pytest.raises(Exception):  # noqa: B017 - torch's errors vary (ValueError, RuntimeError, ...)
            warnings.simplefilter("ignore")  # sparse CSR is 'beta'
            _torch_of(bad)
    expected = cases(6, seed=5)
    items = [r for r, _ in expected]
    items[2:2] = [bad]
    with LossClient(stream_server.address, timeout_s=60) as client:
        with pytest.raises(InvalidArgumentError, match=f"^{what}"):
            client.evaluate(bad)
        results = list(client.evaluate_many(items, window=4, return_exceptions=True))
    assert isinstance(results[2], InvalidArgumentError) and results.pop(2).details.startswith(what.split(" .*")[0]), results[2]
    check(results, expected)

    async def main():
        async with AsyncLossClient(stream_server.address, timeout_s=60) as client:
            return [r async for r in client.evaluate_many(items, window=4, return_exceptions=True)]

    results = asyncio.run(asyncio.wait_for(main(), 60))
    assert isinstance(results.pop(2), InvalidArgumentError)
    check(results, expected)


def test_empty_input(stream_server):
    with LossClient(stream_server.address, timeout_s=30) as client:
        assert list(client.evaluate_many([])) == []


def test_window_is_filled_and_never_exceeded():
    """While the engine is busy, evaluate_many keeps exactly `window` requests queued (the queue
    holds at most `window`: one more would be answered RESOURCE_EXHAUSTED and fail the check)."""
    window, rows = 8, 3
    server = start_server(*HOG_FLAGS, "--max-queue-requests", str(window), metrics=True)
    try:
        rng = np.random.default_rng(4)
        expected = []
        for _ in range(window * 12):
            x = rng.standard_normal((rows, 4)).astype(np.float32)
            t = rng.integers(0, 4, rows)
            expected.append((LossRequest(x, t), F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t))))
        with LossClient(server.address, timeout_s=120) as client:
            with EngineHog(server):
                results = []
                reader = threading.Thread(target=lambda: results.extend(client.evaluate_many([r for r, _ in expected], window=window)))
                reader.start()
                depth = 0
                for _ in range(600):  # bounded: the window fills within seconds
                    depth = server.metrics().get("lossd_queue_depth", 0)
                    if depth == window:
                        break
                    time.sleep(0.05)
                assert depth == window
            reader.join(120)
            check(results, expected)

        async def main():
            async with AsyncLossClient(server.address, timeout_s=120) as client:
                return [r async for r in client.evaluate_many([r for r, _ in expected], window=window)]

        check(asyncio.run(asyncio.wait_for(main(), 120)), expected)
    finally:
        server.stop()


def accepted_forms():
    """The same four evaluations as a LossRequest, a mapping with its field names and an (input, target) pair."""
    rng = np.random.default_rng(6)
    x = [rng.standard_normal((3 + i, 5)).astype(np.float32) for i in range(4)]
    t = [rng.integers(0, 5, 3 + i) for i in range(4)]
    items = [
        LossRequest(x[0], t[0], reduction="sum"),
        {"input": x[1], "target": t[1], "reduction": "none", "label_smoothing": 0.1},
        (x[2], t[2]),
        {"input": torch.from_numpy(x[3]), "target": torch.from_numpy(t[3]), "loss": "nll_loss"},
    ]
    want = [
        F.cross_entropy(torch.from_numpy(x[0]), torch.from_numpy(t[0]), reduction="sum"),
        F.cross_entropy(torch.from_numpy(x[1]), torch.from_numpy(t[1]), reduction="none", label_smoothing=0.1),
        F.cross_entropy(torch.from_numpy(x[2]), torch.from_numpy(t[2])),
        F.nll_loss(torch.from_numpy(x[3]), torch.from_numpy(t[3])),
    ]
    return items, want


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pack", [1, None])
def test_evaluate_many_takes_requests_mappings_and_pairs(stream_server, pack):
    items, want = accepted_forms()
    with LossClient(stream_server.address, timeout_s=60) as client:
        got = list(client.evaluate_many(items, window=4, pack=pack))

    async def main():
        async with AsyncLossClient(stream_server.address, timeout_s=60) as client:
            return [r async for r in client.evaluate_many(items, window=4, pack=pack)]

    for results in (got, asyncio.run(asyncio.wait_for(main(), 60))):
        assert [type(r.loss) for r in results] == [np.ndarray, np.ndarray, np.ndarray, torch.Tensor]
        for result, expected in zip(results, want, strict=True):
            torch.testing.assert_close(torch.as_tensor(result.loss), expected)


NOT_ACCEPTED = [
    ([1.0, 2.0], "item 1 is builtins.list"),
    ("logits", "item 1 is builtins.str"),
    (None, "item 1 is builtins.NoneType"),
    ((np.zeros((2, 3), np.float32),), "item 1 is a tuple of 1 items"),
    ({"inputs": np.zeros((2, 3), np.float32), "target": np.array([0, 1])}, r"item 1 is a mapping that does not fit LossRequest \(.*'inputs'"),
    ({"input": np.zeros((2, 3), np.float32)}, r"item 1 is a mapping that does not fit LossRequest \(.*'target'"),
]
ACCEPTS = r"expected a LossRequest, a mapping with LossRequest's field names, or an \(input, target\) pair"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("bad", "named"), NOT_ACCEPTED, ids=["list", "str", "None", "1-tuple", "unknown-key", "missing-key"])
def test_evaluate_many_names_what_it_cannot_take_and_closes_the_stream(stream_server, bad, named):
    """TypeError naming the item and what is accepted, after the results before it; nothing hangs
    (a deadline bounds every call) and the client still works afterwards."""
    good = LossRequest(np.zeros((2, 3), np.float32), np.array([0, 1]))
    items = [good, bad, good]
    with LossClient(stream_server.address, timeout_s=30) as client:
        got = []
        with pytest.raises(TypeError, match=f"evaluate_many: {named}.*; {ACCEPTS}$"):
            for result in client.evaluate_many(items, window=4):
                got.append(result)
        assert len(got) == 1 and float(got[0].loss) == pytest.approx(np.log(3))
        assert len(list(client.evaluate_many([good, good], window=4))) == 2

    async def main():
        async with AsyncLossClient(stream_server.address, timeout_s=30) as client:
            seen = []
            with pytest.raises(TypeError, match=f"evaluate_many: {named}.*; {ACCEPTS}$"):
                async for result in client.evaluate_many(items, window=4, pack=1):
                    seen.append(result)
            assert len(seen) == 1
            return [r async for r in client.evaluate_many(iter([good, good]), window=4)]

    assert len(asyncio.run(asyncio.wait_for(main(), 60))) == 2


@pytest.mark.timeout(120)
def test_a_failing_source_raises_its_own_error_after_the_results_before_it(stream_server):
    good = LossRequest(np.zeros((2, 3), np.float32), np.array([0, 1]))

    def source():
        yield good
        raise RuntimeError("the caller's generator failed")

    async def asource():
        yield good
        raise RuntimeError("the caller's generator failed")

    with LossClient(stream_server.address, timeout_s=30) as client:
        got = []
        with pytest.raises(RuntimeError, match="generator failed"):
            for result in client.evaluate_many(source()):
                got.append(result)
        assert len(got) == 1

    async def main():
        async with AsyncLossClient(stream_server.address, timeout_s=30) as client:
            return [r async for r in client.evaluate_many(asource())]

    with pytest.raises(RuntimeError, match="generator failed"):
        asyncio.run(asyncio.wait_for(main(), 60))


def test_a_packed_message_over_the_item_limit_is_refused_as_a_whole_and_the_stream_goes_on(stream_server):
    item = pb.EvaluateRequest(id="i")
    tensors.to_proto(np.zeros((1, 2), np.float32), item.input)
    tensors.to_proto(np.zeros(1, np.int64), item.target)
    too_many = pb.EvaluateBatch(requests=[item] * (MAX_PACKED_ITEMS + 1))
    full = pb.EvaluateBatch(requests=[item] * MAX_PACKED_ITEMS)
    with grpc.insecure_channel(stream_server.address) as channel:
        answers = list(pb_grpc.LossServiceStub(channel).EvaluatePacked(iter([too_many, full]), timeout=120))
    refused = [a for a in answers if len(a.responses) == 1]
    assert len(answers) == 2 and len(refused) == 1
    error = refused[0].responses[0].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and f"MAX_PACKED_ITEMS={MAX_PACKED_ITEMS}" in error.message
    (served,) = [a for a in answers if len(a.responses) == MAX_PACKED_ITEMS]
    assert not any(r.HasField("error") for r in served.responses)


def test_evaluate_many_packs_at_most_the_item_limit_per_message(stream_server):
    n = 2 * MAX_PACKED_ITEMS + 5
    x = np.random.default_rng(1).standard_normal((n, 1, 3)).astype(np.float32)
    t = np.random.default_rng(2).integers(0, 3, (n, 1))
    with LossClient(stream_server.address, timeout_s=120) as client:
        got = list(client.evaluate_many(((x[i], t[i]) for i in range(n)), window=n, pack=n))
    want = F.cross_entropy(torch.from_numpy(x).flatten(0, 1), torch.from_numpy(t).flatten(), reduction="none")
    torch.testing.assert_close(torch.stack([torch.as_tensor(r.loss) for r in got]), want)


def test_a_server_that_dies_mid_stream_ends_evaluate_many_with_a_lossd_error():
    """The server process is killed while evaluate_many streams: both clients raise a LossdError
    (the async one raised gRPC's raw AioRpcError, INTERNAL, from its writing side)."""

    def endless():
        rng = np.random.default_rng(0)
        for _ in range(10**6):
            yield LossRequest(rng.standard_normal((64, 100), dtype=np.float32), rng.integers(0, 100, 64))

    async def main(address):
        async with AsyncLossClient(address, timeout_s=120) as client:
            async for _ in client.evaluate_many(endless()):
                pass

    for run in ("sync", "async"):
        server = start_server()
        try:
            killer = threading.Timer(1.0, server.proc.kill)
            killer.start()
            with pytest.raises(LossdError):
                if run == "sync":
                    with LossClient(server.address, timeout_s=120) as client:
                        for _ in client.evaluate_many(endless()):
                            pass
                else:
                    asyncio.run(asyncio.wait_for(main(server.address), 120))
            killer.join()
        finally:
            server.stop()


def test_a_rejected_item_is_kept_without_its_arrays():
    """A rejection waits for the answers before it; kept with its traceback it held the item's
    arrays (20,000 rejected 25 KB items: 569 MiB until they were yielded, now 10 MiB)."""
    stream = core.Stream(window=4, pack=None, return_exceptions=True)
    x = np.zeros((64, 100), np.float32)
    alive = weakref.ref(x)
    assert stream.add(LossRequest(x, np.zeros(64, np.int64), reduction="bogus")) is core.REJECTED
    del x
    gc.collect()
    assert alive() is None
    (rejection,) = stream.ready()
    assert isinstance(rejection, InvalidArgumentError) and "reduction" in str(rejection)
